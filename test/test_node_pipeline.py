"""The node's frame handling without ROS: latest-frame buffer, drops, conversion, batching, header
passthrough, lazy outputs, camera_info relay, malformed frames, engine failures, clock mismatches,
missing input frames, runtime parameter changes and the two worker threads.

Messages are rosbags classes (what a recording holds); the node runs the same code with rclpy's.
"""
from __future__ import annotations

import gc
import threading
import time
import types
import weakref

import cv2
import numpy as np
import pytest
from conftest import trained_bn_model

from icnet_ros.inference.engine import SegmentationEngine
from icnet_ros.ros.frame_buffer import IncomingFrame, LatestFrameBuffer
from icnet_ros.ros.health import ERROR, OK, WARN, HealthMonitor, Thresholds
from icnet_ros.ros.image_conversion import make_header, numpy_to_image, rgb_to_compressed
from icnet_ros.ros.log_throttle import LogThrottle
from icnet_ros.ros.messages import package_typestore, rosbags_message_types
from icnet_ros.ros.node_config import NodeConfig, with_changes
from icnet_ros.ros.processor import FrameProcessor, everyone_listens
from icnet_ros.ros.publisher import CameraInfoCache, ModelInfo, OutputPublisher
from icnet_ros.ros.worker import BufferWorker
from icnet_ros.visualization import overlay as blend

HEIGHT, WIDTH = 64, 96
TOPICS = ["/front/image_raw", "/rear/image_raw"]


@pytest.fixture(scope="module")
def engine():
    return SegmentationEngine(trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid"), device="cpu")


START_NS = 1_700_000_000 * 10**9
STAMP_NS = START_NS - 30_000_000  # camera frames stamped 30 ms before the node's clock reads them


class Clock:
    """A settable clock in nanoseconds: health verdicts depend on time, so tests set it."""

    def __init__(self, now_ns: int = START_NS) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


class Rig:
    """A FrameProcessor delivering straight to an OutputPublisher that appends to a list: the node's
    data flow without its two threads (tested separately below)."""

    def __init__(self, engine, config: NodeConfig | None = None, topics=TOPICS, demand=everyone_listens,
                 camera_infos: CameraInfoCache | None = None) -> None:
        self.clock = Clock()
        self.published: list[tuple[int, str, object]] = []
        self.logged: list[tuple[str, str]] = []
        self.config = config or NodeConfig(image_topics=list(topics), device="cpu", dataset="camvid")
        self.health = HealthMonitor(list(topics), self.clock())
        self.publisher = OutputPublisher(rosbags_message_types(),
                                         lambda camera, name, msg: self.published.append((camera, name, msg)),
                                         self.health, self.clock, ModelInfo("test.safetensors", "camvid", 0.25, "cpu"),
                                         self.config, camera_infos=camera_infos, demand=demand)
        self.processor = FrameProcessor(engine, self.config, self.publisher.publish_frame, self.health, self.clock,
                                        lambda kind, text: self.logged.append((kind, text)), demand)

    def set_config(self, config: NodeConfig) -> None:
        self.processor.config = self.publisher.config = config

    def outputs(self, camera: int) -> dict[str, object]:
        return {name: msg for cam, name, msg in self.published if cam == camera}


def frame_pixels(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_message(rgb: np.ndarray, encoding: str = "rgb8", frame_id: str = "front_camera", stamp_ns: int = STAMP_NS):
    pixels = {
        "rgb8": rgb, "bgr8": np.ascontiguousarray(rgb[..., ::-1]),
        "rgba8": np.dstack((rgb, np.full(rgb.shape[:2], 200, np.uint8))),
        "bgra8": np.dstack((rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8))),
        "mono8": np.ascontiguousarray(rgb[..., 0]),
        "mono16": rgb[..., 0].astype(np.uint16) * 257,
        "bayer_rggb8": np.ascontiguousarray(rgb[..., 1]),
        "yuv422": np.ascontiguousarray(rgb[..., :2]),
    }[encoding]
    return numpy_to_image(pixels, encoding, make_header(frame_id, stamp_ns))


def incoming(msg, camera: int = 0, compressed: bool = False) -> IncomingFrame:
    return IncomingFrame(camera, msg, compressed, 0)


# --- the latest-frame buffer -------------------------------------------------------------------------
def test_buffer_keeps_the_newest_frame_per_camera_and_reports_replacements():
    buffer = LatestFrameBuffer(2)
    assert buffer.put(IncomingFrame(0, "a", False, 1)) is False
    assert buffer.put(IncomingFrame(0, "b", False, 2)) is True  # "a" was never taken: a drop
    assert buffer.put(IncomingFrame(1, "x", False, 3)) is False
    taken = buffer.take(timeout=0)
    assert [(f.camera, f.message) for f in taken] == [(0, "b"), (1, "x")]
    assert buffer.take(timeout=0) == []  # emptied
    assert buffer.put(IncomingFrame(0, "c", False, 4)) is False  # the slot was free again


def test_buffer_take_waits_for_a_frame_and_close_wakes_it():
    buffer = LatestFrameBuffer(1)
    results = []
    waiter = threading.Thread(target=lambda: results.append(buffer.take(timeout=10)))
    waiter.start()
    buffer.put(IncomingFrame(0, "frame", False, 1))
    waiter.join(5)
    assert [f.message for f in results[0]] == ["frame"]
    waiter = threading.Thread(target=lambda: results.append(buffer.take(timeout=10)))
    waiter.start()
    buffer.close()
    waiter.join(5)
    assert not waiter.is_alive() and results[1] == []


# --- conversion, outputs and the header --------------------------------------------------------------
@pytest.mark.parametrize("encoding,overlay_encoding", [
    ("rgb8", "rgb8"), ("bgr8", "bgr8"), ("rgba8", "rgba8"), ("bgra8", "bgra8"), ("mono8", "rgb8"),
    ("mono16", "rgb8"), ("bayer_rggb8", "rgb8"), ("yuv422", "rgb8"),
])
def test_every_output_keeps_the_input_header_and_size(engine, encoding, overlay_encoding):
    rig = Rig(engine)
    msg = image_message(frame_pixels(1), encoding, frame_id="front_camera", stamp_ns=1_234_567_890_123)
    [result] = rig.processor.process([incoming(msg)])
    assert result.outcome == "segmented"
    out = rig.outputs(0)
    assert set(out) == {"labels", "color", "overlay", "timing"}
    for name, published in out.items():
        assert published.header == msg.header, name
    assert (out["labels"].encoding, out["color"].encoding, out["overlay"].encoding) == ("mono8", "rgb8",
                                                                                         overlay_encoding)
    for name in ("labels", "color", "overlay"):
        assert (out[name].height, out[name].width) == (HEIGHT, WIDTH)


def test_overlay_is_blended_in_the_input_channel_order_and_keeps_alpha(engine):
    rgb = frame_pixels(2)
    rig = Rig(engine, with_changes(Rig(engine).config, {"overlay_alpha": 0.25}))
    rig.processor.process([incoming(image_message(rgb, "bgra8"))])
    out = rig.outputs(0)
    color = np.asarray(out["color"].data).reshape(HEIGHT, WIDTH, 3)
    overlay = np.asarray(out["overlay"].data).reshape(HEIGHT, WIDTH, 4)
    np.testing.assert_array_equal(overlay[..., :3], blend(np.ascontiguousarray(rgb[..., ::-1]),
                                                          np.ascontiguousarray(color[..., ::-1]), 0.25))
    assert (overlay[..., 3] == 7).all()  # the input's alpha channel, untouched


def test_labels_match_the_engine_on_the_same_pixels(engine):
    rgb = frame_pixels(3)
    rig = Rig(engine)
    rig.processor.process([incoming(image_message(rgb, "bgr8"))])
    labels = np.asarray(rig.outputs(0)["labels"].data).reshape(HEIGHT, WIDTH)
    np.testing.assert_array_equal(labels, engine.segment(rgb).labels)


def test_compressed_input_is_decoded_and_published_as_rgb8(engine):
    rgb = frame_pixels(4)
    msg = rgb_to_compressed(rgb, "png", make_header("cam", 5))
    rig = Rig(engine)
    [result] = rig.processor.process([incoming(msg, compressed=True)])
    assert result.outcome == "segmented"
    overlay = rig.outputs(0)["overlay"]
    assert overlay.encoding == "rgb8" and overlay.header == msg.header


def test_published_messages_serialize_as_ros_messages(engine):
    """CDR serialization checks every field's type, as rclpy's publish would."""
    rig = Rig(engine)
    rig.processor.process([incoming(image_message(frame_pixels(5)))])
    store = package_typestore()
    out = rig.outputs(0)
    for name in ("labels", "color", "overlay"):
        raw = store.serialize_cdr(out[name], "sensor_msgs/msg/Image")
        assert store.deserialize_cdr(raw, "sensor_msgs/msg/Image").header == out[name].header
    timing = store.deserialize_cdr(store.serialize_cdr(out["timing"], "icnet_ros/msg/SegmentationTiming"),
                                   "icnet_ros/msg/SegmentationTiming")
    assert timing.frames_processed == 1 and timing.model == "test.safetensors" and timing.branch == "sub124"
    assert timing.forward_ms > 0 and timing.total_ms >= timing.publish_ms


def test_mono16_labels_for_class_maps_beyond_255_ids():
    model = trained_bn_model(keep_rate=0.125, num_classes=300, class_map="cocostuff")
    engine = SegmentationEngine(model, device="cpu")
    rig = Rig(engine, NodeConfig(device="cpu", dataset="cocostuff", publish_color=False, publish_overlay=False))
    rig.processor.process([incoming(image_message(frame_pixels(6)))])
    assert rig.outputs(0)["labels"].encoding == "mono16"


# --- batching ----------------------------------------------------------------------------------------
class CountingEngine:
    """Wraps the engine and records the batch sizes it is called with."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __setattr__(self, name, value):
        if name in ("branch", "alpha"):
            setattr(self.engine, name, value)
        else:
            super().__setattr__(name, value)

    def submit(self, frames, **options):
        self.calls.append(len(frames))
        return self.engine.submit(frames, **options)


def test_cameras_of_one_size_share_one_engine_call(engine):
    counting = CountingEngine(engine)
    rig = Rig(counting)
    front, rear = image_message(frame_pixels(7), frame_id="front"), image_message(frame_pixels(8), frame_id="rear")
    results = rig.processor.process([incoming(front, 0), incoming(rear, 1)])
    assert counting.calls == [2]
    assert [r.outcome for r in results] == ["segmented", "segmented"]
    assert rig.outputs(0)["labels"].header.frame_id == "front"
    assert rig.outputs(1)["labels"].header.frame_id == "rear"
    # each camera's labels are its own frame's
    rear_labels = np.asarray(rig.outputs(1)["labels"].data).reshape(HEIGHT, WIDTH)
    np.testing.assert_array_equal(rear_labels, engine.segment(frame_pixels(8)).labels)


def test_cameras_of_different_sizes_or_orders_get_separate_calls(engine):
    counting = CountingEngine(engine)
    rig = Rig(counting)
    small = image_message(frame_pixels(9, 48, 64))
    rig.processor.process([incoming(image_message(frame_pixels(7)), 0), incoming(small, 1)])
    assert sorted(counting.calls) == [1, 1]
    counting.calls.clear()
    rig.processor.process([incoming(image_message(frame_pixels(7), "rgb8"), 0),
                           incoming(image_message(frame_pixels(8), "bgr8"), 1)])
    assert sorted(counting.calls) == [1, 1]


# --- malformed frames and failures -------------------------------------------------------------------
def _malformed_messages():
    good = image_message(frame_pixels(10))
    short = image_message(frame_pixels(10))
    short.data = short.data[:-10]
    wrong_step = image_message(frame_pixels(10))
    wrong_step.step = WIDTH * 3 - 1
    unknown = image_message(frame_pixels(10))
    unknown.encoding = "32FC1"
    empty = image_message(frame_pixels(10))
    empty.height, empty.width, empty.data = 0, 0, np.zeros(0, np.uint8)
    tiny = image_message(frame_pixels(10, 16, 16))
    return good, {"short data": short, "wrong step": wrong_step, "unknown encoding": unknown, "0x0": empty,
                  "smaller than 32x32": tiny}


@pytest.mark.parametrize("case", list(_malformed_messages()[1]))
def test_malformed_frames_are_counted_logged_and_the_rest_still_published(engine, case):
    good, bad = _malformed_messages()
    rig = Rig(engine)
    results = rig.processor.process([incoming(bad[case], 0), incoming(good, 1)])
    assert [(r.camera, r.outcome) for r in results] == [(0, "malformed"), (1, "segmented")]
    assert rig.outputs(0) == {}  # nothing half-published for the bad frame
    assert set(rig.outputs(1)) == {"labels", "color", "overlay", "timing"}
    assert (rig.health.counts(0).processed, rig.health.counts(0).malformed) == (0, 1)
    assert rig.logged and rig.logged[0][0] == "malformed" and TOPICS[0] in rig.logged[0][1]
    report = rig.health.camera_report(0, rig.clock(), Thresholds())
    assert report.level == WARN and "malformed" in report.message


def test_a_compressed_message_that_does_not_decode_is_malformed(engine):
    rig = Rig(engine)
    broken = types.SimpleNamespace(header=make_header("cam", 1), format="jpeg", data=b"\xff\xd8 not a jpeg")
    [result] = rig.processor.process([incoming(broken, compressed=True)])
    assert result.outcome == "malformed" and "decode" in result.detail


def test_an_engine_failure_is_reported_and_later_frames_still_work(engine):
    rig = Rig(engine)
    original = engine.submit
    try:
        engine.submit = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        [result] = rig.processor.process([incoming(image_message(frame_pixels(11)))])
    finally:
        del engine.submit
    assert engine.submit == original
    assert result.outcome == "failed" and "out of memory" in result.detail
    assert rig.health.camera_report(0, rig.clock(), Thresholds()).level == ERROR
    [result] = rig.processor.process([incoming(image_message(frame_pixels(11)))])
    assert result.outcome == "segmented"


# --- drops and the timing message --------------------------------------------------------------------
def test_frames_replaced_before_processing_are_counted_in_the_timing_message(engine):
    rig = Rig(engine)
    buffer = LatestFrameBuffer(2)
    for stamp in range(3):  # three frames arrive while the worker is busy: two are replaced
        frame = IncomingFrame(0, image_message(frame_pixels(stamp), stamp_ns=STAMP_NS + stamp), False, rig.clock())
        rig.health.frame_received(0, rig.clock(), buffer.put(frame))
    rig.processor.process(buffer.take(timeout=0))
    timing = rig.outputs(0)["timing"]
    assert timing.header.stamp.nanosec == (STAMP_NS + 2) % 10**9  # the newest frame was the one segmented
    assert (timing.frames_processed, timing.frames_dropped, timing.frames_malformed) == (1, 2, 0)


# --- runtime parameter changes -----------------------------------------------------------------------
def test_branch_alpha_and_outputs_change_between_frames(engine):
    rig = Rig(engine)
    rgb = frame_pixels(12)
    rig.processor.process([incoming(image_message(rgb))])
    rig.published.clear()
    rig.set_config(with_changes(rig.processor.config, {"branch": "sub4", "overlay_alpha": 0.0,
                                                       "publish_color": False}))
    rig.processor.process([incoming(image_message(rgb))])
    out = rig.outputs(0)
    assert set(out) == {"labels", "overlay", "timing"}
    assert engine.branch == "sub4" and out["timing"].branch == "sub4"
    np.testing.assert_array_equal(np.asarray(out["overlay"].data).reshape(HEIGHT, WIDTH, 3), rgb)  # alpha 0
    engine.branch, engine.alpha = "sub124", 0.5


# --- the worker thread -------------------------------------------------------------------------------
def test_worker_segments_what_arrives_and_survives_a_crashing_batch(engine):
    rig = Rig(engine)
    buffer = LatestFrameBuffer(2)
    original = rig.processor.process
    calls = []

    def flaky(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            raise ValueError("a bug in one batch")
        return original(frames)

    rig.processor.process = flaky
    worker = BufferWorker("segmentation", buffer, rig.processor.process,
                          lambda kind, text: rig.logged.append((kind, text)), poll_s=0.01)
    worker.start()
    try:
        buffer.put(incoming(image_message(frame_pixels(13))))
        _wait_for(lambda: len(calls) >= 1)
        buffer.put(incoming(image_message(frame_pixels(14))))
        _wait_for(lambda: "timing" in rig.outputs(0))
        assert worker.alive
    finally:
        worker.stop()
    assert not worker.alive
    assert any(kind == "segmentation" and "a bug in one batch" in text for kind, text in rig.logged)


def _wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- diagnostics -------------------------------------------------------------------------------------
def test_health_verdicts_over_time():
    clock = Clock()
    health = HealthMonitor(["/cam/image_raw"], clock())
    thresholds = Thresholds(expected_rate_hz=10.0, rate_tolerance=0.2, max_latency_ms=100.0, stall_timeout_s=2.0,
                            diagnostics_window_s=1.0)
    assert health.camera_report(0, clock(), thresholds).level == WARN  # waiting for the first image
    clock.advance(3.0)
    report = health.camera_report(0, clock(), thresholds)
    assert report.level == ERROR and "since start" in report.message
    for _ in range(20):  # 20 Hz in, every frame segmented with 30 ms latency
        clock.advance(0.05)
        health.frame_received(0, clock(), replaced_unprocessed=False)
        health.frame_published(0, clock(), latency_ms=30.0, node_ms=20.0)
    report = health.camera_report(0, clock(), thresholds)
    assert report.level == OK, report.message
    assert dict(report.values)["rate_hz"] == "20.00" and dict(report.values)["frames_segmented"] == "20"
    for _ in range(10):  # the engine falls behind: 5 Hz segmented, 150 ms latency, frames dropped
        clock.advance(0.2)
        health.frame_received(0, clock(), replaced_unprocessed=True)
        health.frame_published(0, clock(), latency_ms=150.0, node_ms=190.0)
    report = health.camera_report(0, clock(), thresholds)
    assert report.level == WARN and "below the expected 10 Hz" in report.message and "latency" in report.message
    clock.advance(2.5)
    report = health.camera_report(0, clock(), thresholds)
    assert report.level == ERROR and "stalled" in report.message


def test_log_throttle_holds_repeats_and_counts_them():
    emitted, now = [], [0.0]
    log = LogThrottle(emitted.append, interval_s=5.0, clock_s=lambda: now[0])
    for step in range(4):
        now[0] = step
        log("malformed", f"bad frame {step}")
    log("engine", "engine failed")  # another kind is not held back by the first
    now[0] = 6.0
    log("malformed", "bad frame 6")
    assert emitted == ["bad frame 0", "engine failed", "bad frame 6 (3 more like this since the last report)"]


def test_the_pipeline_imports_no_ros():
    import subprocess
    import sys

    code = ("import sys; import icnet_ros.ros.session, icnet_ros.ros.processor, icnet_ros.ros.publisher, "
            "icnet_ros.ros.worker, icnet_ros.ros.health, icnet_ros.ros.node_config, icnet_ros.ros.launch_plan, "
            "icnet_ros.ros.topics, icnet_ros.ros.overhead; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rcl_interfaces', 'launch', 'launch_ros',"
            " 'sensor_msgs', 'diagnostic_updater')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cv2_is_what_decodes_bayer(engine):
    """A Bayer frame reaches the engine demosaiced (three different channels), not as grey."""
    from icnet_ros.ros.engine_input import engine_input

    rgb = frame_pixels(15)
    bayer = image_message(rgb, "bayer_rggb8")
    pixels = engine_input(bayer, False).pixels
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(pixels, cv2.cvtColor(np.ascontiguousarray(rgb[..., 1]), cv2.COLOR_BayerBG2RGB))


def test_recycled_messages_carry_each_frame_and_are_rebuilt_when_the_size_changes(engine):
    """The node recycles output messages (rclpy copies them in publish); every frame must still be right."""
    from icnet_ros.ros.overhead import RclpyLikeImage, RclpyLikeTiming
    from icnet_ros.ros.publisher import MessageTypes

    seen = []
    config = NodeConfig(image_topics=["/front/image_raw"], device="cpu", dataset="camvid")
    health = HealthMonitor(["/front/image_raw"], 0)
    publisher = OutputPublisher(
        MessageTypes(RclpyLikeImage, RclpyLikeTiming),
        lambda camera, name, msg: seen.append((name, msg, bytes(msg.data) if name != "timing" else None,
                                               getattr(msg, "header", None))),
        health, Clock(), ModelInfo("m", "camvid", 0.25, "cpu"), config, reuse_messages=True)
    processor = FrameProcessor(engine, config, publisher.publish_frame, health, Clock())
    label_messages = []
    for seed, (height, width) in enumerate([(HEIGHT, WIDTH), (HEIGHT, WIDTH), (48, 64)]):
        rgb = frame_pixels(20 + seed, height, width)
        seen.clear()
        processor.process([incoming(image_message(rgb, frame_id=f"frame{seed}"))])
        published = {name: (message, data, header) for name, message, data, header in seen}
        expected = engine.segment(rgb, color=True, overlay=True)
        assert published["labels"][1] == expected.labels.tobytes()
        assert published["overlay"][1] == expected.overlay.tobytes()
        assert published["labels"][2].frame_id == f"frame{seed}"
        label_messages.append(published["labels"][0])
    assert label_messages[1] is label_messages[0]  # same size: the same message object, refilled
    assert label_messages[2] is not label_messages[0] and label_messages[2].width == 64  # rebuilt


# --- lazy outputs: nothing is computed for an output nobody subscribes to ----------------------------
class RecordingEngine(CountingEngine):
    """Also records the outputs each engine call was asked for."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.asked = []

    def submit(self, frames, **options):
        self.asked.append({name for name in ("labels", "color", "overlay") if options.get(name)})
        return super().submit(frames, **options)


class Subscribers:
    """Which outputs have a subscriber, changeable between frames (the node asks rclpy per frame)."""

    def __init__(self, *outputs: str) -> None:
        self.outputs = set(outputs)

    def __call__(self, camera: int, output: str) -> bool:
        return output in self.outputs


def test_only_outputs_with_a_subscriber_are_computed_and_published(engine):
    recording, subscribers = RecordingEngine(engine), Subscribers("labels")
    rig = Rig(recording, demand=subscribers)
    [result] = rig.processor.process([incoming(image_message(frame_pixels(30)))])
    assert recording.asked == [{"labels"}] and result.outputs == ("labels",)
    assert set(rig.outputs(0)) == {"labels", "timing"} and list(rig.outputs(0)["timing"].outputs) == ["labels"]
    subscribers.outputs |= {"overlay"}  # a subscriber joins: the next frame has its output
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(31)))])
    assert recording.asked[-1] == {"labels", "overlay"} and set(rig.outputs(0)) == {"labels", "overlay", "timing"}


def test_with_no_subscriber_nothing_is_computed_but_timing_and_health_go_on(engine):
    recording = RecordingEngine(engine)
    rig = Rig(recording, demand=Subscribers())
    [result] = rig.processor.process([incoming(image_message(frame_pixels(32)))])
    assert result.outcome == "idle" and recording.asked == []
    timing = rig.outputs(0)["timing"]
    assert list(timing.outputs) == [] and timing.forward_ms == 0 and timing.frames_processed == 1
    values = dict(rig.health.camera_report(0, rig.clock(), Thresholds()).values)
    assert values["frames_without_subscribers"] == "1" and values["frames_segmented"] == "0"


def test_a_disabled_output_is_not_computed_even_with_subscribers(engine):
    recording = RecordingEngine(engine)
    rig = Rig(recording, NodeConfig(image_topics=TOPICS, device="cpu", dataset="camvid", publish_color=False))
    rig.processor.process([incoming(image_message(frame_pixels(33)))])
    assert recording.asked == [{"labels", "overlay"}] and "color" not in rig.outputs(0)


# --- camera_info relay ---------------------------------------------------------------------------------
def camera_info(stamp_ns: int, width: int = WIDTH):
    store = package_typestore()
    info_type = store.types["sensor_msgs/msg/CameraInfo"]
    roi = store.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)
    return info_type(header=make_header("optical_frame", stamp_ns), height=HEIGHT, width=width,
                     distortion_model="plumb_bob", d=np.zeros(5), k=np.eye(3).ravel(), r=np.eye(3).ravel(),
                     p=np.zeros(12), binning_x=0, binning_y=0, roi=roi)


def test_camera_info_is_relayed_with_the_outputs_header(engine):
    infos = CameraInfoCache(2)
    rig = Rig(engine, camera_infos=infos)
    rig.processor.process([incoming(image_message(frame_pixels(34)))])
    assert "camera_info" not in rig.outputs(0)  # none received yet: nothing to relay
    infos.put(0, camera_info(STAMP_NS - 10**8, width=1))
    infos.put(0, camera_info(STAMP_NS))  # the one stamped like the frame
    infos.put(0, camera_info(STAMP_NS + 10**8, width=2))
    frame = image_message(frame_pixels(35), frame_id="front_camera")
    rig.processor.process([incoming(frame)])
    relayed = rig.outputs(0)["camera_info"]
    assert relayed.header == frame.header and relayed.width == WIDTH
    assert list(rig.outputs(0)["timing"].outputs) == ["labels", "color", "overlay", "camera_info"]
    raw = package_typestore().serialize_cdr(relayed, "sensor_msgs/msg/CameraInfo")
    assert package_typestore().deserialize_cdr(raw, "sensor_msgs/msg/CameraInfo").header.frame_id == "front_camera"


# --- cheaper visual outputs: compressed, and at a reduced size ----------------------------------------
VISUAL_MESSAGES = ("color", "color/compressed", "overlay", "overlay/compressed")
JPEG_95_MEAN_ERROR = 4.0  # grey levels (sharp class edges cost most); channels swapped: off by 37 and more


def decoded_jpeg(message) -> np.ndarray:
    """The pixels of a published CompressedImage after a CDR round trip, as a subscriber gets them (BGR)."""
    store = package_typestore()
    received = store.deserialize_cdr(store.serialize_cdr(message, "sensor_msgs/msg/CompressedImage"),
                                     "sensor_msgs/msg/CompressedImage")
    return cv2.imdecode(np.asarray(received.data, np.uint8), cv2.IMREAD_COLOR)


def raw_pixels(message) -> np.ndarray:
    return np.asarray(message.data).reshape(message.height, message.width, -1)


def test_no_jpeg_is_encoded_for_a_compressed_topic_nobody_subscribes_to(engine, monkeypatch):
    from icnet_ros.ros import publisher

    encoded = []
    monkeypatch.setattr(publisher, "image_to_jpeg", lambda *args, **kwargs: encoded.append(args[1]))
    recording, subscribers = RecordingEngine(engine), Subscribers("labels", "color", "overlay")
    rig = Rig(recording, demand=subscribers)
    rig.processor.process([incoming(image_message(frame_pixels(60)))])
    assert encoded == [] and set(rig.outputs(0)) == {"labels", "color", "overlay", "timing"}
    subscribers.outputs = {"overlay/compressed"}  # a compressed subscriber alone: its output is computed
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(61)))])
    assert recording.asked[-1] == {"overlay"} and encoded == ["rgb8"]
    assert list(rig.outputs(0)["timing"].outputs) == ["overlay/compressed"]


def test_published_jpegs_decode_to_the_color_and_overlay_published_raw(engine):
    camera_like = cv2.GaussianBlur(frame_pixels(62), (9, 9), 3)  # JPEG is made for images, not noise
    rig = Rig(engine, with_changes(Rig(engine).config, {"jpeg_quality": 95}), demand=Subscribers(*VISUAL_MESSAGES))
    rig.processor.process([incoming(image_message(camera_like, "bgr8"))])
    out = rig.outputs(0)
    assert list(out["timing"].outputs) == list(VISUAL_MESSAGES)
    color_rgb, overlay_bgr = raw_pixels(out["color"]), raw_pixels(out["overlay"])
    for decoded, expected in ((decoded_jpeg(out["color/compressed"]), color_rgb[..., ::-1]),
                              (decoded_jpeg(out["overlay/compressed"]), overlay_bgr)):
        assert decoded.shape == expected.shape
        error = np.abs(decoded.astype(np.int16) - expected.astype(np.int16))
        assert error.mean() < JPEG_95_MEAN_ERROR, error.mean()  # lossy: close, not exact
    for name in ("color/compressed", "overlay/compressed"):
        assert out[name].header == out["color"].header


@pytest.mark.parametrize("encoding,overlay_format", [
    ("rgb8", "rgb8; jpeg compressed bgr8"), ("bgr8", "bgr8; jpeg compressed bgr8"),
    ("rgba8", "rgba8; jpeg compressed bgr8"), ("bgra8", "bgra8; jpeg compressed bgr8"),
    ("mono8", "rgb8; jpeg compressed bgr8"),
])
def test_compressed_formats_are_the_ones_image_transport_writes(engine, encoding, overlay_format):
    """compressed_image_transport writes '<encoding>; jpeg compressed bgr8' for colour images: its
    subscribers (RViz, image_view) decode the BGR JPEG back into the named encoding."""
    from icnet_ros.ros.image_conversion import compressed_to_rgb

    rig = Rig(engine, demand=Subscribers(*VISUAL_MESSAGES))
    rig.processor.process([incoming(image_message(frame_pixels(63), encoding))])
    out = rig.outputs(0)
    assert out["color/compressed"].format == "rgb8; jpeg compressed bgr8"
    assert out["overlay/compressed"].format == overlay_format
    assert compressed_to_rgb(out["color/compressed"]).shape == (HEIGHT, WIDTH, 3)  # the package's own decoder


def test_visual_scale_shrinks_color_and_overlay_but_never_labels(engine):
    full = Rig(engine, demand=Subscribers("labels", *VISUAL_MESSAGES))
    half = Rig(engine, with_changes(full.config, {"visual_scale": 0.5}), demand=Subscribers("labels", *VISUAL_MESSAGES))
    for rig in (full, half):
        rig.processor.process([incoming(image_message(frame_pixels(64), "bgra8"))])
    small, large = half.outputs(0), full.outputs(0)
    assert (small["labels"].height, small["labels"].width) == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(small["labels"].data, large["labels"].data)
    for name in ("color", "overlay"):
        assert (small[name].height, small[name].width) == (HEIGHT // 2, WIDTH // 2)
        assert decoded_jpeg(small[f"{name}/compressed"]).shape[:2] == (HEIGHT // 2, WIDTH // 2)
    assert small["overlay"].encoding == "bgra8" and (raw_pixels(small["overlay"])[..., 3] == 7).all()
    full_colors = {tuple(pixel) for pixel in raw_pixels(large["color"]).reshape(-1, 3)}
    assert {tuple(pixel) for pixel in raw_pixels(small["color"]).reshape(-1, 3)} <= full_colors  # class colors only


def test_visual_scale_and_jpeg_quality_change_between_frames(engine):
    rig = Rig(engine, demand=Subscribers("color", "color/compressed"))
    rig.processor.process([incoming(image_message(frame_pixels(65)))])
    first = rig.outputs(0)
    rig.set_config(with_changes(rig.config, {"visual_scale": 0.25, "jpeg_quality": 10}))
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(65)))])
    second = rig.outputs(0)
    assert (second["color"].height, second["color"].width) == (HEIGHT // 4, WIDTH // 4)
    assert len(second["color/compressed"].data) < len(first["color/compressed"].data)


# --- clocks and missing frames -------------------------------------------------------------------------
def test_a_stamp_on_another_clock_is_reported_not_taken_for_a_latency(engine):
    """The first real run: a bag replayed without use_sim_time reported a latency of 9.6e10 ms."""
    rig = Rig(engine)
    recorded = image_message(frame_pixels(36), stamp_ns=STAMP_NS - 26 * 3600 * 10**9)  # a day-old recording
    rig.processor.process([incoming(recorded)])
    timing = rig.outputs(0)["timing"]
    assert np.isnan(timing.latency_ms)
    report = rig.health.camera_report(0, rig.clock(), Thresholds())
    assert report.level == WARN and "use_sim_time:=true" in report.message
    assert dict(report.values)["latency_ms_median"] == "n/a"
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(37)))])  # a live frame: a real latency again
    assert rig.outputs(0)["timing"].latency_ms == pytest.approx(30.0)


def test_gaps_in_the_camera_stamps_are_reported_as_missing_frames():
    clock = Clock()
    health = HealthMonitor(["/cam/image_raw"], clock())
    period = 100_000_000  # a 10 Hz camera
    stamps = [STAMP_NS + i * period for i in range(12) if i not in (7, 8, 10)]  # three frames never arrive
    for stamp in stamps:
        clock.now_ns = stamp + 30_000_000
        health.frame_received(0, clock(), False, stamp)
        health.frame_published(0, clock(), 30.0, 20.0)
    report = health.camera_report(0, clock(), Thresholds(diagnostics_window_s=5.0))
    values = dict(report.values)
    assert values["frames_missing"] == "3" and values["input_rate_hz"] == "10.00"
    assert report.level == WARN and "3 input frame(s) missing" in report.message and "DDS" in report.message
    assert health.counts(0).missing == 3
    health.frame_received(0, clock(), False, STAMP_NS)  # a replay starting over is no gap
    assert health.counts(0).missing == 3
    clock.advance(6.0)
    health.frame_received(0, clock(), False, STAMP_NS + period)
    assert "missing" not in health.camera_report(0, clock(), Thresholds(diagnostics_window_s=5.0)).message


def test_missing_frames_are_counted_even_when_most_are_lost():
    """84 of 100 frames lost (a 2 MP stream, default DDS buffers): most intervals are multiples of the
    camera's, which must not be taken for its rate."""
    clock = Clock()
    health = HealthMonitor(["/cam/image_raw"], clock())
    period = 200_000_000  # 5 Hz
    arrived = sorted(set(range(0, 100, 7)) | {1, 2, 3, 4, 5, 6, 36, 37, 99})  # the first few, then a trickle
    for index in arrived:
        clock.now_ns = STAMP_NS + index * period
        health.frame_received(0, clock(), False, STAMP_NS + index * period)
    assert health.counts(0).missing == 100 - len(arrived)


def test_frames_lost_before_the_rate_is_known_are_counted_too():
    """Measured over real DDS: the first intervals a stream gives can already be gaps."""
    clock = Clock()
    health = HealthMonitor(["/cam/image_raw"], clock())
    period = 200_000_000
    arrived = [0, 3, 11, 12, 26, 32, 34, 35, 43, 49, 53, 77, 83]  # 13 of 84, as a 1 MiB buffer let through
    for index in arrived:
        clock.now_ns = STAMP_NS + index * period
        health.frame_received(0, clock(), False, STAMP_NS + index * period)
    assert health.counts(0).missing == 84 - len(arrived)


# --- the two threads: publishing never delays segmentation ---------------------------------------------
def test_slow_publishing_does_not_delay_the_next_frame(engine):
    """rclpy serializes in publish(): 18 ms per 2 MP frame. The segmentation thread must not wait for it."""
    from icnet_ros.ros.session import SegmentationSession

    config = NodeConfig(image_topics=["front/image"], device="cpu", dataset="camvid")
    release = threading.Event()
    published = []

    def slow_publish(camera, name, message):
        release.wait(10)  # a subscriber that takes forever to serialize for
        published.append(name)

    session = SegmentationSession(engine, config, "test.safetensors", rosbags_message_types(), slow_publish,
                                  everyone_listens, Clock(), LogThrottle(lambda text: None, 5.0),
                                  reuse_messages=False)
    assert not session.processor.pipelined  # on a CPU submit does the work: nothing is kept in flight
    session.start(Clock()())
    try:
        for seed in range(4):
            session.frame_arrived(0, image_message(frame_pixels(40 + seed)), False, Clock()())
            _wait_for(lambda: session.frames_waiting() == 0)  # the segmentation worker took it
        # the publisher is stuck in frame 1; frames 2, 3 and 4 were segmented, and 2 and 3 replaced
        _wait_for(lambda: session.health.cameras[0].unpublished == 2)
        assert published == []  # all the while the publisher was stuck in its first publish()
        release.set()
        _wait_for(lambda: "timing" in published)
    finally:
        release.set()
        assert session.stop(5.0)
    assert not session.running


def test_the_segmentation_worker_starts_the_next_frame_before_finishing_this_one():
    """On CUDA engine.submit returns at once: frame k+1 uploads while frame k computes."""
    buffer, events = LatestFrameBuffer(1), []

    def start(items):
        frame = items[0].message
        events.append(("start", frame))
        if frame < 5:  # a camera faster than the engine: the next frame is already there
            buffer.put(IncomingFrame(0, frame + 1, False, 0))
        return frame

    def finish(frame):
        events.append(("finish", frame))

    worker = BufferWorker("segmentation", buffer, start, poll_s=0.01, finish=finish)
    worker.start()
    try:
        buffer.put(IncomingFrame(0, 0, False, 0))
        _wait_for(lambda: ("finish", 5) in events)
    finally:
        worker.stop()
    assert events == [("start", 0)] + [e for m in range(5) for e in (("start", m + 1), ("finish", m))] + \
        [("finish", 5)]


def test_an_engine_failure_when_the_results_are_collected_is_reported(engine):
    rig = Rig(engine)
    original = engine.collect
    try:
        engine.collect = lambda pending: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))
        [result] = rig.processor.process([incoming(image_message(frame_pixels(50)))])
    finally:
        del engine.collect
    assert engine.collect == original
    assert result.outcome == "failed" and rig.outputs(0) == {}
    assert rig.health.camera_report(0, rig.clock(), Thresholds()).level == ERROR


def test_a_worker_stopped_with_a_frame_in_flight_finishes_it():
    """Deactivating while a camera streams must not lose the frame the GPU is computing."""
    buffer, events = LatestFrameBuffer(1), []

    def start(items):
        events.append(("start", items[0].message))
        buffer.close()  # the stop arrives while this frame is being started
        return items[0].message

    worker = BufferWorker("segmentation", buffer, start, poll_s=0.01, finish=lambda frame: events.append(("finish", frame)))
    buffer.put(IncomingFrame(0, 7, False, 0))
    worker.start()
    assert worker.stop(5.0)
    assert events == [("start", 7), ("finish", 7)]


def test_cleanup_frees_the_engine_and_its_model_at_once(monkeypatch):
    """The node's cleanup drops the session: the engine, its folded weights and the model must go with
    it right then (so that empty_cache() can give their device memory back), not at some later garbage
    collection. With the collector off, only reference counting frees them: no cycle may remain."""
    model = trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid")
    engine = SegmentationEngine(model, device="cpu")
    published = []
    session = _session(engine, lambda camera, name, message: published.append(name))
    gone = [weakref.ref(item) for item in (engine, engine.weights("fp32"), model, session, session.processor)]
    gc.collect()
    gc.disable()
    try:
        session.start(Clock()())
        session.frame_arrived(0, image_message(frame_pixels(70)), False, Clock()())
        _wait_for(lambda: "timing" in published)
        assert session.stop(5.0)
        del session, engine, model
        assert [ref() is None for ref in gone] == [True] * len(gone)
    finally:
        gc.enable()


def _session(engine, publish, config=None):
    from icnet_ros.ros.session import SegmentationSession

    config = config or NodeConfig(image_topics=["front/image"], device="cpu", dataset="camvid")
    return SegmentationSession(engine, config, "test.safetensors", rosbags_message_types(), publish,
                               everyone_listens, Clock(), LogThrottle(lambda text: None, 5.0), reuse_messages=False)


def test_an_activate_after_a_deactivate_warms_the_engine_up_again(engine, monkeypatch):
    """Deactivate releases the engine's prepared graphs; the first frame after the next activate
    must be as fast as the rest, so the warm-up size is prepared again before subscribing."""
    prepared = []
    monkeypatch.setattr(engine, "prepare", lambda height, width, **kwargs: prepared.append((height, width)))
    config = NodeConfig(image_topics=["front/image"], device="cpu", dataset="camvid", warmup_height=48, warmup_width=64)
    session = _session(engine, lambda *args: None, config)
    session.start(Clock()())  # create_engine prepared it at configure: nothing to do
    assert prepared == []
    assert session.stop(5.0)
    session.start(Clock()())
    assert prepared == [(48, 64), (48, 64)]  # rgb and bgr frames
    assert session.stop(5.0)


def test_activation_is_refused_while_a_worker_of_the_last_one_still_runs(engine):
    """Two threads must never drive one engine: a worker that outlived the stop timeout blocks start()."""
    release = threading.Event()
    session = _session(engine, lambda camera, name, message: release.wait(10))
    session.start(Clock()())
    try:
        session.frame_arrived(0, image_message(frame_pixels(60)), False, Clock()())
        _wait_for(lambda: session.health.cameras[0].processed == 0 and session.frames_waiting() == 0)
        time.sleep(0.2)  # the publisher is now stuck in its first publish()
        assert not session.stop(0.05) and session.running
        with pytest.raises(RuntimeError, match="previous activation"):
            session.start(Clock()())
    finally:
        release.set()
    _wait_for(lambda: not session.running)
    assert session.stop(5.0)
    session.start(Clock()())
    assert session.running and session.stop(5.0)


def test_frames_sent_while_the_node_was_inactive_are_not_counted_as_missing():
    clock = Clock()
    health = HealthMonitor(["/cam/image_raw"], clock())
    for index in range(20):  # 10 Hz
        clock.advance(0.1)
        health.frame_received(0, clock(), False, STAMP_NS + index * 100_000_000)
    clock.advance(30.0)  # deactivated for 30 s while the camera went on
    health.activated(clock())
    report = health.camera_report(0, clock(), Thresholds(stall_timeout_s=2.0))
    assert report.level == WARN and "waiting for the first image" in report.message
    health.frame_received(0, clock(), False, STAMP_NS + 320 * 100_000_000)
    assert health.counts(0).missing == 0 and health.cameras[0].received == 21


def test_sparse_regions_are_published_when_subscribed_and_counted_in_the_timing():
    sparse_engine = SegmentationEngine(trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid"),
                                       device="cpu", region_size=32)  # 64x96 frames: 2 x 3 regions
    subscribers = Subscribers("labels", "regions")
    config = NodeConfig(image_topics=list(TOPICS), device="cpu", dataset="camvid", high_res_regions=2)
    rig = Rig(sparse_engine, config, demand=subscribers)
    rig.processor.process([incoming(image_message(frame_pixels(40)))])
    regions, timing = rig.outputs(0)["regions"], rig.outputs(0)["timing"]
    mask = np.frombuffer(bytes(regions.data), np.uint8).reshape(HEIGHT, WIDTH)
    assert regions.encoding == "mono8" and set(np.unique(mask)) == {0, 255}
    assert (mask == 255).sum() == 2 * 32 * 32  # two whole 32-pixel regions
    assert (timing.regions_computed, timing.regions_total) == (2, 6) and "regions" in list(timing.outputs)
    assert rig.publisher.last_regions[0] == (2, 6)
    subscribers.outputs = {"regions"}  # regions alone: the engine computes the cheapest output with them
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(41)))])
    assert set(rig.outputs(0)) == {"regions", "timing"}
    rig.set_config(with_changes(config, {"high_res_regions": 0}))  # dense: no regions to show
    rig.published.clear()
    rig.processor.process([incoming(image_message(frame_pixels(42)))])
    assert set(rig.outputs(0)) == {"timing"} and rig.outputs(0)["timing"].regions_total == 0
