"""ros2 launch icnet_ros segment.launch.py [dataset:=...] [compression:=...] [rviz:=true] [demo:=true] ...

Starts the segmentation node with config/segment.yaml and the launch arguments on top; optionally
RViz with the package's view, and `ros2 bag play --loop` of a recording (bag:=) or of the embedded
synthetic drive (demo:=true). Every decision lives in icnet_ros.ros.launch_plan (tested without
ROS); this file only turns the plan into launch actions. `ros2 launch icnet_ros segment.launch.py
--show-args` lists the arguments.
"""
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from icnet_ros.ros.launch_plan import LAUNCH_ARGUMENTS, plan_launch
from icnet_ros.ros.node_config import NODE_NAME
from launch import LaunchDescription


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(argument.name, default_value=argument.default, description=argument.description,
                              choices=list(argument.choices) if argument.choices else None)
        for argument in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=launch_setup)])


def launch_setup(context):
    values = {argument.name: LaunchConfiguration(argument.name).perform(context) for argument in LAUNCH_ARGUMENTS}
    plan = plan_launch(values)
    actions = [Node(package="icnet_ros", executable="segment_node", name=NODE_NAME, output="screen",
                    parameters=[str(plan.params_file), plan.node_parameters])]
    if plan.bag_command:
        actions.append(ExecuteProcess(cmd=plan.bag_command, output="screen"))
    if plan.rviz_config is not None:
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=["-d", str(plan.rviz_config)],
                            parameters=[{"use_sim_time": plan.use_sim_time}]))
    return actions
