"""The segmentation node under a real rclpy: topics, headers, diagnostics, parameters, bad frames.

These tests need a sourced ROS 2 (Humble or Jazzy) workspace in which icnet_ros was built with
colcon (for the generated icnet_ros.msg), and skip everywhere else with the reason. The frame
handling itself is tested without ROS in test_node_pipeline.py.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

# No module-level importorskip: with ROS sourced, launch_testing's pytest plugin imports every test
# module itself, and a Skipped raised there would skip the whole test directory.
try:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from icnet_ros.msg import SegmentationTiming
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from icnet_ros.ros.node import SegmentationNode
except ImportError as error:
    MISSING = (f"needs a sourced ROS 2 Humble/Jazzy workspace with icnet_ros built by colcon "
               f"(icnet_ros.msg is generated), diagnostic_updater and vision_msgs: {error}")
else:
    MISSING = ""

from icnet_ros.ros.image_conversion import numpy_to_image

pytestmark = [pytest.mark.ros, pytest.mark.skipif(bool(MISSING), reason=MISSING)]
TOPIC = "/test_cam/image_raw"
OUT = "/test_cam/segmentation"


@pytest.fixture
def ros():
    rclpy.init()
    node = probe = executor = None
    try:
        node = SegmentationNode(parameter_overrides=[
            Parameter("image_topics", Parameter.Type.STRING_ARRAY, [TOPIC]),
            Parameter("device", Parameter.Type.STRING, "cpu"),
            Parameter("stall_timeout_s", Parameter.Type.DOUBLE, 30.0),
        ])
        probe = rclpy.create_node("icnet_test_probe")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.add_node(probe)
        yield node, probe, executor
    finally:  # a failed start must not leave rclpy initialized for the next test
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.close()
            node.destroy_node()
        if probe is not None:
            probe.destroy_node()
        rclpy.try_shutdown()


def _collect(probe, topic, msg_type, qos=10):
    received = []
    probe.create_subscription(msg_type, topic, received.append, qos)
    return received


def _spin_until(executor, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the node"
        executor.spin_once(timeout_sec=0.05)


def _camera_image(encoding="bgr8", stamp=(1_700_000_000, 123_456_789)):
    pixels = np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    msg = numpy_to_image(pixels, encoding, None, Image)
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = "test_camera"
    return msg


def test_node_publishes_every_output_with_the_input_header(ros):
    _node, probe, executor = ros
    outputs = {name: _collect(probe, f"{OUT}/{name}", Image) for name in ("labels", "color", "overlay")}
    timings = _collect(probe, f"{OUT}/timing", SegmentationTiming)
    diagnostics = _collect(probe, "/diagnostics", DiagnosticArray)
    LabelInfo = pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not installed").LabelInfo

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    label_info = _collect(probe, f"{OUT}/label_info", LabelInfo, latched)
    camera = probe.create_publisher(Image, TOPIC, 10)
    image = _camera_image()
    _spin_until(executor, lambda: camera.get_subscription_count() > 0)

    def published_all():
        if not all(outputs.values()) or not timings:
            camera.publish(image)
            return False
        return True

    _spin_until(executor, published_all)
    for name, messages in outputs.items():
        assert messages[0].header.stamp.sec == 1_700_000_000 and messages[0].header.stamp.nanosec == 123_456_789
        assert messages[0].header.frame_id == "test_camera", name
        assert (messages[0].height, messages[0].width) == (96, 160)
    assert (outputs["labels"][0].encoding, outputs["color"][0].encoding, outputs["overlay"][0].encoding) == \
        ("mono8", "rgb8", "bgr8")
    timing = timings[0]
    assert timing.header.frame_id == "test_camera" and timing.model and timing.branch == "sub124"
    assert timing.keep_rate == pytest.approx(0.25) and timing.forward_ms > 0
    _spin_until(executor, lambda: label_info)
    assert [c.class_name for c in label_info[0].class_map][:3] == ["road", "sidewalk", "building"]
    _spin_until(executor, lambda: any(s.name.endswith(f"segmentation {TOPIC}") for a in diagnostics for s in a.status))
    status = [s for a in diagnostics for s in a.status if s.name.endswith(f"segmentation {TOPIC}")][-1]
    assert status.level in (DiagnosticStatus.OK, DiagnosticStatus.WARN)
    assert {kv.key for kv in status.values} >= {"rate_hz", "frames_dropped", "frames_malformed", "model"}


def test_malformed_frames_are_counted_and_the_node_keeps_running(ros):
    node, probe, executor = ros
    labels = _collect(probe, f"{OUT}/labels", Image)
    camera = probe.create_publisher(Image, TOPIC, 10)
    bad = _camera_image()
    bad.step = 1  # shorter than one row: malformed
    _spin_until(executor, lambda: camera.get_subscription_count() > 0)
    camera.publish(bad)
    _spin_until(executor, lambda: node.health.counts(0)[2] >= 1)
    good = _camera_image()

    def labelled():
        if not labels:
            camera.publish(good)
        return bool(labels)

    _spin_until(executor, labelled)
    assert node.worker.alive


def test_runtime_parameters_change_and_startup_ones_are_refused(ros):
    node, _probe, _executor = ros
    results = node.set_parameters([Parameter("branch", Parameter.Type.STRING, "sub4"),
                                   Parameter("overlay_alpha", Parameter.Type.DOUBLE, 0.8),
                                   Parameter("publish_color", Parameter.Type.BOOL, False)])
    assert all(r.successful for r in results)
    assert node.processor.config.branch == "sub4" and node.processor.config.overlay_alpha == 0.8
    assert not node.set_parameters([Parameter("branch", Parameter.Type.STRING, "sub8")])[0].successful
    assert not node.set_parameters([Parameter("overlay_alpha", Parameter.Type.DOUBLE, 1.5)])[0].successful
    refused = node.set_parameters([Parameter("keep_rate", Parameter.Type.DOUBLE, 0.5)])[0]
    assert not refused.successful
