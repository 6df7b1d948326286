"""icnet_ros: ICNet real-time semantic segmentation for ROS 2.

Everything importable from here without ROS is the core (model, data, training, inference,
visualization, bag tools); only `icnet_ros.ros.node` needs rclpy.
"""

__version__ = "0.1.0"
