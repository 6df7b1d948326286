"""ROS-facing code: only the node, icnet_ros/ros/segment_node.py, imports rclpy; the rest is ROS-free."""
