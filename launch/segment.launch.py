"""ros2 launch icnet_ros segment.launch.py [image_topic:=/camera/image_raw] [dataset:=camvid] [demo:=true] ...

Starts the segmentation node (a lifecycle node, brought to active: configure loads the model and
prepares the engine, activate subscribes and publishes) with its parameter file and the launch
arguments the user gave on top; optionally RViz with the package's view, and `ros2 bag play --loop`
of a recording (bag:=) or of the embedded synthetic drive (demo:=true). Every decision and check
lives in icnet_ros.ros.launch_plan (tested without ROS) and runs before anything starts; this file
only turns the plan into launch actions. `ros2 launch icnet_ros segment.launch.py --show-args`
lists the arguments.
"""
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from icnet_ros.ros.launch_plan import LAUNCH_ARGUMENTS, plan_launch
from icnet_ros.ros.node_config import NODE_NAME
from launch import LaunchDescription


def generate_launch_description():
    # Choices are checked by plan_launch (so an empty "not given" passes and errors name every choice).
    arguments = [DeclareLaunchArgument(argument.name, default_value=argument.default,
                                       description=argument.description) for argument in LAUNCH_ARGUMENTS]
    return LaunchDescription([*arguments, OpaqueFunction(function=launch_setup)])


def launch_setup(context):
    values = {argument.name: LaunchConfiguration(argument.name).perform(context) for argument in LAUNCH_ARGUMENTS}
    plan = plan_launch(values)  # raises before any process starts when the launch cannot complete
    node = LifecycleNode(package="icnet_ros", executable="segment_node", name=NODE_NAME, namespace=plan.namespace,
                         output="screen", parameters=[str(plan.params_file), plan.node_parameters],
                         remappings=plan.remappings, additional_env=plan.environment)
    actions = [LogInfo(msg=note) for note in plan.notes] + [node, *_lifecycle(node, plan.autostart)]
    if plan.bag_command:
        actions.append(ExecuteProcess(cmd=plan.bag_command, output="screen", additional_env=plan.environment))
    if plan.rviz_config is not None:
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=["-d", str(plan.rviz_config)],
                            parameters=[{"use_sim_time": plan.use_sim_time}]))
    return actions


def _lifecycle(node, autostart: bool):
    """configure -> activate; a failed configure (bad model, missing CUDA) ends the launch with its reason."""
    if not autostart:
        return []

    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is node,
                                           transition_id=transition_id))

    return [
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                               goal_state="inactive", entities=[change(Transition.TRANSITION_ACTIVATE)])),
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, start_state="configuring", goal_state="unconfigured",
            entities=[LogInfo(msg="icnet_ros: the segmentation node could not configure (its log says why); "
                                  "stopping the launch"),
                      EmitEvent(event=Shutdown(reason="segmentation node failed to configure"))])),
        change(Transition.TRANSITION_CONFIGURE),
    ]
