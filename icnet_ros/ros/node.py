"""The icnet_ros segmentation node: `ros2 run icnet_ros segment_node`. A thin rclpy layer over pipeline.py.

It declares one parameter per NodeConfig field (config/segment.yaml), loads the checkpoint that
dataset and keep_rate select, subscribes to each camera with sensor-data QoS, and hands every
message to a one-slot buffer; a worker thread segments and publishes, per camera:

    <camera ns>/segmentation/labels      sensor_msgs/Image (mono8, mono16 beyond 255 classes)
    <camera ns>/segmentation/color       sensor_msgs/Image (rgb8)
    <camera ns>/segmentation/overlay     sensor_msgs/Image (the input's encoding; rgb8 for mono/Bayer/YUV)
    <camera ns>/segmentation/timing      icnet_ros/SegmentationTiming
    <camera ns>/segmentation/label_info  vision_msgs/LabelInfo (transient local: latched)
    /diagnostics                         diagnostic_msgs/DiagnosticArray (diagnostic_updater)

Every output carries the input's header. Only this module (and the launch file) imports ROS.
"""
from __future__ import annotations

import sys
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
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from icnet_ros.config import ConfigError
from icnet_ros.inference.engine import SegmentationEngine
from icnet_ros.model.checkpoint import CheckpointError
from icnet_ros.model.registry import resolve_checkpoint
from icnet_ros.msg import SegmentationTiming
from icnet_ros.ros.health import ERROR, OK, WARN, HealthMonitor, Thresholds
from icnet_ros.ros.node_config import (
    NODE_NAME,
    NodeConfig,
    dynamic_parameters,
    node_config_from_dict,
    parameter_specs,
    with_changes,
)
from icnet_ros.ros.pipeline import (
    FrameProcessor,
    IncomingFrame,
    LatestFrameBuffer,
    LogThrottle,
    MessageTypes,
    ModelInfo,
    SegmentationWorker,
)
from icnet_ros.ros.topics import TopicError, output_topics, subscription_topic

PARAMETER_TYPES = {
    "string": ParameterType.PARAMETER_STRING,
    "double": ParameterType.PARAMETER_DOUBLE,
    "integer": ParameterType.PARAMETER_INTEGER,
    "bool": ParameterType.PARAMETER_BOOL,
    "string_array": ParameterType.PARAMETER_STRING_ARRAY,
}
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
DIAGNOSTIC_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}
IMAGE_OUTPUTS = ("labels", "color", "overlay")
CONFIG_FIELDS = frozenset(spec.name for spec in parameter_specs())
SHUTDOWN_WAIT_S = 2.0  # well inside launch's 5 s before it escalates SIGINT to SIGTERM


class SegmentationNode(Node):
    """ICNet on every camera frame; see the module docstring for topics and config/segment.yaml for parameters."""

    def __init__(self, **node_options) -> None:
        super().__init__(NODE_NAME, **node_options)
        self.config = self._declare_parameters()
        checkpoint = resolve_checkpoint(self.config.model, self.config.model_dir, self.config.dataset,
                                        self.config.keep_rate)
        if checkpoint.is_demo:
            self.get_logger().warning(f"using the bundled demo weights {checkpoint.path.name}: they were trained on "
                                   "synthetic drives only; train on real data for a vehicle (README.md)")
        self.engine = SegmentationEngine.from_checkpoint(
            checkpoint.path, device=self.config.device, branch=self.config.branch, precision=self.config.precision,
            threads=self.config.cpu_threads or None, alpha=self.config.overlay_alpha)
        topics = self.config.image_topics
        self.health = HealthMonitor(topics, self._now_ns())
        self._warn = LogThrottle(self.get_logger().warning, self.config.log_throttle_s)
        self._outputs = [self._create_publishers(topic) for topic in topics]
        self._publish_label_info(topics)
        self.processor = FrameProcessor(self.engine, self.config, MessageTypes(Image, SegmentationTiming),
                                        self._publish, self.health, self._now_ns,
                                        ModelInfo.of(self.engine, checkpoint.path), self._warn,
                                        reuse_messages=True)  # rclpy serializes inside publish()
        self.buffer = LatestFrameBuffer(len(topics))
        self.worker = SegmentationWorker(self.buffer, self.processor, self._warn)
        # not self._subscriptions: rclpy's Node keeps its own list (with /clock) under that name
        self._camera_subscriptions = [self._subscribe(index, topic) for index, topic in enumerate(topics)]
        self._diagnostics = self._create_diagnostics(topics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.worker.start()
        self.get_logger().info(
            f"segmenting {', '.join(subscription_topic(t, self.config.input_transport) for t in topics)} with "
            f"{checkpoint.path} ({self.engine.class_map.name}, keep {self.config.keep_rate:g}, {self.config.branch}) "
            f"on {self.engine.device} in {self.engine.precision}")

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
        except ConfigError as error:
            return SetParametersResult(successful=False, reason=str(error))
        self.config = config
        self.processor.config = config  # the worker reads it once per batch
        self._warn.interval_s = config.log_throttle_s
        self.get_logger().info(f"parameters changed: {changes}")
        return SetParametersResult(successful=True)

    # --- topics ---------------------------------------------------------------------------------
    def _create_publishers(self, topic: str) -> dict:
        names = output_topics(topic)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.config.output_qos_depth,
                         reliability=RELIABILITY[self.config.output_qos_reliability],
                         durability=DurabilityPolicy.VOLATILE)
        publishers = {name: self.create_publisher(Image, names[name], qos) for name in IMAGE_OUTPUTS}
        publishers["timing"] = self.create_publisher(SegmentationTiming, names["timing"], qos)
        return publishers

    def _subscribe(self, index: int, topic: str):
        compressed = self.config.input_transport == "compressed"
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.config.input_qos_depth,
                         reliability=RELIABILITY[self.config.input_qos_reliability],
                         durability=DurabilityPolicy.VOLATILE)
        return self.create_subscription(CompressedImage if compressed else Image,
                                        subscription_topic(topic, self.config.input_transport),
                                        partial(self._on_image, index, compressed), qos)

    def _on_image(self, camera: int, compressed: bool, message) -> None:
        """Executor thread: keep the newest message only; the worker does everything else."""
        received_ns = self._now_ns()
        replaced = self.buffer.put(IncomingFrame(camera, message, compressed, received_ns))
        self.health.frame_received(camera, received_ns, replaced)

    def _publish(self, camera: int, output: str, message) -> None:
        self._outputs[camera][output].publish(message)

    def _publish_label_info(self, topics: list[str]) -> None:
        """The class map once, latched, beside each camera's outputs (vision_msgs/LabelInfo)."""
        try:
            from vision_msgs.msg import LabelInfo, VisionClass
        except ImportError:
            self.get_logger().warning("vision_msgs has no LabelInfo here (it needs vision_msgs >= 4.1); "
                                   "label_info is not published")
            return
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        info = LabelInfo()
        info.header.stamp = self.get_clock().now().to_msg()
        info.class_map = [VisionClass(class_id=index, class_name=name)
                          for index, name in enumerate(self.engine.class_map.names)]
        info.threshold = 0.0  # labels are argmax decisions: no score threshold applies
        self._label_info = []
        for topic in topics:
            publisher = self.create_publisher(LabelInfo, output_topics(topic)["label_info"], latched)
            publisher.publish(info)
            self._label_info.append(publisher)

    # --- diagnostics ----------------------------------------------------------------------------
    def _create_diagnostics(self, topics: list[str]) -> Updater:
        updater = Updater(self)  # positional only: older releases take no period
        updater.setHardwareID(f"icnet_ros on {self.engine.device}")
        for index, topic in enumerate(topics):
            updater.add(f"segmentation {topic}", partial(self._diagnose_camera, index))
        if getattr(updater, "timer", None) is None:  # releases without their own timer publish on demand
            self._diagnostics_timer = self.create_timer(1.0, updater.force_update)
        return updater

    def _diagnose_camera(self, camera: int, status):
        report = self.health.camera_report(camera, self._now_ns(), Thresholds.from_config(self.config))
        status.summary(DIAGNOSTIC_LEVELS[report.level], report.message)
        for key, value in report.values:
            status.add(key, value)
        status.add("model", self.processor.model.model)
        status.add("branch", self.config.branch)
        status.add("keep_rate", f"{self.config.keep_rate:g}")
        status.add("device", str(self.engine.device))
        status.add("precision", self.engine.precision)
        return status

    # --- lifetime -------------------------------------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def close(self) -> None:
        """Stop the worker before the node's publishers go away."""
        self.worker.stop(timeout=SHUTDOWN_WAIT_S)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = None
    try:
        node = SegmentationNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ConfigError, CheckpointError, TopicError) as error:
        print(f"icnet_ros segment_node: error: {error}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
