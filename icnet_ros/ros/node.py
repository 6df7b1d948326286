"""The icnet_ros segmentation node: `ros2 run icnet_ros segment_node`. A thin rclpy layer over session.py.

A lifecycle node (rclpy.lifecycle): configure loads the checkpoint the parameters select and
prepares the engine for the camera size; activate subscribes and publishes; deactivate stops;
cleanup frees the model and the GPU memory. With autostart (the default) it configures and
activates itself, so `ros2 run` gives a working node; the launch file and lifecycle managers set
autostart false and drive the transitions. Per camera (names relative to the node's namespace):

    <camera ns>/segmentation/labels       sensor_msgs/Image (mono8, mono16 beyond 255 classes)
    <camera ns>/segmentation/color        sensor_msgs/Image (rgb8)
    <camera ns>/segmentation/overlay      sensor_msgs/Image (the input's encoding; rgb8 for mono/Bayer/YUV)
    <camera ns>/segmentation/{color,overlay}/compressed
                                          sensor_msgs/CompressedImage (JPEG, as image_transport's plugin)
    <camera ns>/segmentation/camera_info  sensor_msgs/CameraInfo (the camera's, relayed)
    <camera ns>/segmentation/timing       icnet_ros/SegmentationTiming
    <camera ns>/segmentation/label_info   vision_msgs/LabelInfo (transient local: latched)
    /diagnostics                          diagnostic_msgs/DiagnosticArray (diagnostic_updater)

Every output carries the input's header. An image output nobody subscribes to is not computed, nor
is a JPEG encoded for a compressed topic nobody subscribes to.
Only this module (and the launch file) imports ROS.
"""
from __future__ import annotations

import signal
import sys
import threading
from functools import partial

import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_updater import Updater
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from icnet_ros.config import ConfigError
from icnet_ros.model.icnet import check_branch
from icnet_ros.msg import SegmentationTiming
from icnet_ros.ros.health import ERROR, OK, WARN, Thresholds
from icnet_ros.ros.log_throttle import LogThrottle
from icnet_ros.ros.node_config import (
    NODE_NAME,
    NodeConfig,
    dynamic_parameters,
    node_config_from_dict,
    parameter_specs,
    with_changes,
)
from icnet_ros.ros.processor import PUBLISHED_OUTPUTS, output_messages
from icnet_ros.ros.publisher import MessageTypes
from icnet_ros.ros.session import STARTUP_ERRORS, SegmentationSession, create_engine, startup_error_message
from icnet_ros.ros.topics import COMPRESSED_SUFFIX, camera_info_topic, output_topics, subscription_topic

PARAMETER_TYPES = {
    "string": ParameterType.PARAMETER_STRING,
    "double": ParameterType.PARAMETER_DOUBLE,
    "integer": ParameterType.PARAMETER_INTEGER,
    "bool": ParameterType.PARAMETER_BOOL,
    "string_array": ParameterType.PARAMETER_STRING_ARRAY,
}
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
DIAGNOSTIC_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}
CONFIG_FIELDS = frozenset(spec.name for spec in parameter_specs())
SHUTDOWN_WAIT_S = 2.0  # well inside launch's 5 s before it escalates SIGINT to SIGTERM
SPIN_TIMEOUT_S = 0.1  # main loop wake-up: how soon a SIGINT/SIGTERM is acted on
CAMERA_INFO_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


class SegmentationNode(LifecycleNode):
    """ICNet on every camera frame; see the module docstring for topics and config/segment.yaml for parameters."""

    def __init__(self, **node_options) -> None:
        super().__init__(NODE_NAME, **node_options)
        self.config = self._declare_parameters()
        self.session: SegmentationSession | None = None
        self.failure = ""  # why the last configure failed, for the log, main() and /diagnostics
        self._publishers: list[dict] = []
        self._camera_subscriptions: list = []  # not self._subscriptions: rclpy's Node keeps its own list
        self._diagnostics = Updater(self)  # positional only: older releases take no period
        self._diagnostics.setHardwareID("icnet_ros")
        self._diagnostics.add("segmentation node", self._diagnose_node)
        if getattr(self._diagnostics, "timer", None) is None:  # releases without their own timer
            self._diagnostics_timer = self.create_timer(1.0, self._diagnostics.force_update)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> bool:
        """configure + activate (autostart); False with self.failure set when configure fails."""
        return (self.trigger_configure() == TransitionCallbackReturn.SUCCESS
                and self.trigger_activate() == TransitionCallbackReturn.SUCCESS)

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            engine, checkpoint = create_engine(self.config)
        except STARTUP_ERRORS as error:
            self.failure = startup_error_message(error)
            self.get_logger().error(f"cannot configure: {self.failure}")
            return TransitionCallbackReturn.FAILURE
        self.failure = ""
        if checkpoint.is_demo:
            self.get_logger().warning(f"using the bundled demo weights {checkpoint.path.name}: they were trained on "
                                      "synthetic drives only; for real cameras use dataset:=camvid or the "
                                      "imported Cityscapes weights (README.md)")
        topics = self.config.image_topics
        self._publishers = [self._create_publishers(topic) for topic in topics]
        log = LogThrottle(self.get_logger().warning, self.config.log_throttle_s)
        message_types = MessageTypes(Image, SegmentationTiming, CompressedImage)
        self.session = SegmentationSession(engine, self.config, checkpoint.path, message_types, self._publish,
                                           self._has_subscribers, self._now_ns, log)
        for index, topic in enumerate(topics):
            self._diagnostics.add(self._camera_task(topic), partial(self._diagnose_camera, index))
        self.get_logger().info(f"configured: {checkpoint.path} ({engine.class_map.name}, keep "
                               f"{engine.config.keep_rate:g}, {self.config.branch}) on {engine.device} in "
                               f"{engine.precision}, network input "
                               f"{'the frame size' if engine.input_size in (None, (0, 0)) else engine.input_size}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        try:  # the workers first: a refusal must leave nothing half-activated
            self.session.start(self._now_ns())
        except RuntimeError as error:
            self.get_logger().error(f"cannot activate: {error}")
            return TransitionCallbackReturn.FAILURE
        result = super().on_activate(state)  # enables the lifecycle publishers
        self._publish_label_info()
        for index, topic in enumerate(self.config.image_topics):
            self._camera_subscriptions.append(self._subscribe_images(index, topic))
            self._camera_subscriptions.append(self.create_subscription(
                CameraInfo, camera_info_topic(self._camera_topic(topic)),
                partial(self.session.camera_info_arrived, index), CAMERA_INFO_QOS))
        inputs = [subscription_topic(self._camera_topic(topic), self.config.input_transport)
                  for topic in self.config.image_topics]
        self.get_logger().info(f"segmenting {', '.join(inputs)}; outputs under "
                               f"{', '.join(self.resolve_topic_name(output_topics(t)['labels']).rsplit('/', 1)[0] for t in self.config.image_topics)}")
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._stop()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop the workers and free the model before the node and its context go away."""
        self._stop()
        self._release()

    def _stop(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions = []
        if self.session is not None and not self.session.stop(SHUTDOWN_WAIT_S):
            self.get_logger().warning(f"a worker did not stop within {SHUTDOWN_WAIT_S} s")

    def _release(self) -> None:
        if self.session is None:
            return
        for topic in self.config.image_topics:
            self._diagnostics.removeByName(self._camera_task(topic))
        for publishers in self._publishers:
            for publisher in publishers.values():
                self.destroy_lifecycle_publisher(publisher)
        self._publishers = []
        device = self.session.engine.device
        self.session = None  # the engine and its GPU memory go with it
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- parameters -----------------------------------------------------------------------------
    def _declare_parameters(self) -> NodeConfig:
        values = {}
        for spec in parameter_specs():
            descriptor = ParameterDescriptor(name=spec.name, type=PARAMETER_TYPES[spec.kind],
                                             description=spec.description,
                                             additional_constraints=spec.constraints, read_only=not spec.dynamic)
            if spec.value_range is not None and spec.kind == "double":
                descriptor.floating_point_range = [FloatingPointRange(
                    from_value=float(spec.value_range[0]), to_value=float(spec.value_range[1]), step=0.0)]
            if spec.value_range is not None and spec.kind == "integer":
                descriptor.integer_range = [IntegerRange(
                    from_value=int(spec.value_range[0]), to_value=int(spec.value_range[1]), step=1)]
            try:
                values[spec.name] = self.declare_parameter(spec.name, spec.default, descriptor).value
            except (InvalidParameterTypeException, InvalidParameterValueException) as error:
                raise ConfigError(f"parameter {spec.name}: {error}; expected a {spec.kind} "
                                  f"({spec.constraints or spec.description})") from None
        return node_config_from_dict(values, "ROS parameters")

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Validate changes of our parameters against NodeConfig; rclpy has already applied the
        descriptors (read-only, type, range). Others (use_sim_time, diagnostic_updater.period) pass."""
        changes = {parameter.name: parameter.value for parameter in parameters if parameter.name in CONFIG_FIELDS}
        if not changes:
            return SetParametersResult(successful=True)
        fixed = sorted(set(changes) - dynamic_parameters())
        if fixed:
            return SetParametersResult(successful=False, reason=f"{', '.join(fixed)} can only be set at start-up "
                                       f"(restart the node); runtime-settable: {sorted(dynamic_parameters())}")
        try:
            config = with_changes(self.config, changes)
            if self.session is not None:
                check_branch(config.branch, self.session.engine.config)
                self.session.engine.check_high_res_regions(config.high_res_regions)
        except (ConfigError, ValueError) as error:
            return SetParametersResult(successful=False, reason=str(error))
        self.config = config
        if self.session is not None:
            self.session.set_config(config)  # the worker reads it once per batch
        self.get_logger().info(f"parameters changed: {changes}")
        return SetParametersResult(successful=True)

    # --- topics ---------------------------------------------------------------------------------
    def _create_publishers(self, topic: str) -> dict:
        names = output_topics(topic)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.config.output_qos_depth,
                         reliability=RELIABILITY[self.config.output_qos_reliability],
                         durability=DurabilityPolicy.VOLATILE)
        publishers = {name: self.create_lifecycle_publisher(
            CompressedImage if name.endswith(COMPRESSED_SUFFIX) else Image, names[name], qos)
            for output in PUBLISHED_OUTPUTS for name in output_messages(output)}
        publishers["camera_info"] = self.create_lifecycle_publisher(CameraInfo, names["camera_info"], qos)
        publishers["timing"] = self.create_lifecycle_publisher(SegmentationTiming, names["timing"], qos)
        label_info = _label_info_type()
        if label_info is not None:
            publishers["label_info"] = self.create_lifecycle_publisher(label_info, names["label_info"], LATCHED_QOS)
        return publishers

    def _subscribe_images(self, index: int, topic: str):
        compressed = self.config.input_transport == "compressed"
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.config.input_qos_depth,
                         reliability=RELIABILITY[self.config.input_qos_reliability],
                         durability=DurabilityPolicy.VOLATILE)
        return self.create_subscription(CompressedImage if compressed else Image,
                                        subscription_topic(self._camera_topic(topic), self.config.input_transport),
                                        partial(self._on_image, index, compressed), qos)

    def _camera_topic(self, topic: str) -> str:
        """The image topic after namespace and remapping: `image/compressed` and `camera_info` are
        derived from it (as image_transport does), since a remap rule for `image` matches only `image`."""
        return self.resolve_topic_name(topic)

    def _on_image(self, camera: int, compressed: bool, message) -> None:
        """Executor thread: keep the newest message only; the workers do everything else."""
        session = self.session
        if session is not None:
            session.frame_arrived(camera, message, compressed, self._now_ns())

    def _has_subscribers(self, camera: int, output: str) -> bool:
        """Lazy outputs: checked for every frame, so a subscriber joining gets the next one."""
        publishers = self._publishers
        return camera < len(publishers) and publishers[camera][output].get_subscription_count() > 0

    def _publish(self, camera: int, output: str, message) -> None:
        """Publishing thread. After deactivate the publishers are disabled; after cleanup gone."""
        publishers = self._publishers
        if camera < len(publishers) and self.context.ok():
            publishers[camera][output].publish(message)

    def _publish_label_info(self) -> None:
        """The class map once per activation, latched, beside each camera's outputs (vision_msgs/LabelInfo)."""
        label_info = _label_info_type()
        if label_info is None:
            self.get_logger().warning("vision_msgs has no LabelInfo here (it needs vision_msgs >= 4.1); "
                                      "label_info is not published")
            return
        from vision_msgs.msg import VisionClass

        info = label_info()
        info.header.stamp = self.get_clock().now().to_msg()
        info.class_map = [VisionClass(class_id=index, class_name=name)
                          for index, name in enumerate(self.session.engine.class_map.names)]
        info.threshold = 0.0  # labels are argmax decisions: no score threshold applies
        for publishers in self._publishers:
            publishers["label_info"].publish(info)

    # --- diagnostics ----------------------------------------------------------------------------
    @staticmethod
    def _camera_task(topic: str) -> str:
        return f"segmentation {topic}"

    def _diagnose_node(self, status):
        state = self._state_machine.current_state[1] if hasattr(self, "_state_machine") else "unknown"
        if self.failure:
            status.summary(DiagnosticStatus.ERROR, f"{state}: configure failed: {self.failure}")
        elif self.session is None or not self.session.running:
            status.summary(DiagnosticStatus.WARN, f"{state}: not segmenting (activate the node)")
        else:
            status.summary(DiagnosticStatus.OK, f"{state}: segmenting")
        status.add("lifecycle_state", state)
        return status

    def _diagnose_camera(self, camera: int, status):
        session = self.session
        if session is None:
            status.summary(DiagnosticStatus.WARN, "not configured")
            return status
        if not session.running:  # configured or deactivated: no input is expected
            status.summary(DiagnosticStatus.WARN, "inactive (activate the node to segment)")
            return status
        report = session.health.camera_report(camera, self._now_ns(), Thresholds.from_config(self.config))
        status.summary(DIAGNOSTIC_LEVELS[report.level], report.message)
        for key, value in report.values:
            status.add(key, value)
        status.add("model", session.publisher.model.model)
        status.add("branch", self.config.branch)
        status.add("keep_rate", f"{session.engine.config.keep_rate:g}")
        status.add("device", str(session.engine.device))
        status.add("precision", session.engine.precision)
        status.add("high_res_regions", str(self.config.high_res_regions))
        computed, total = session.publisher.last_regions.get(camera, (0, 0))
        status.add("regions_computed", f"{computed} of {total}" if total else "dense")
        return status

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds


def _label_info_type():
    try:
        from vision_msgs.msg import LabelInfo
    except ImportError:
        return None
    return LabelInfo


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; every start-up error is one line on stderr and exit code 1.

    rclpy's own signal handlers would shut the context down under the worker threads; here a signal
    only ends the spin loop, and the workers stop before the node and the context go away.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def request_stop(*_) -> None:
        # Ctrl-C under ros2 launch reaches the node twice (the terminal's process group, then launch
        # forwarding it); a second SIGINT during shutdown, once Python has restored the default
        # handler, would kill the node mid-cleanup. SIGTERM stays, to escalate a stuck shutdown.
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    node = None
    try:
        node = SegmentationNode()
        if node.config.autostart and not node.start():
            print(f"icnet_ros segment_node: error: {node.failure}", file=sys.stderr)
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_TIMEOUT_S)
        executor.remove_node(node)
    except STARTUP_ERRORS as error:
        print(f"icnet_ros segment_node: error: {startup_error_message(error)}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
