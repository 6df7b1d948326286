"""What the segmentation node does with a frame, without ROS: buffer, convert, segment, publish.

    camera callback --put--> LatestFrameBuffer --take--> SegmentationWorker thread
                                                         FrameProcessor.process(frames):
                                                           convert (malformed -> counted, skipped)
                                                           batch by size -> engine.segment(...)
                                                           build messages with the input header
                                                           publish(camera, output, message)

The callback only swaps the newest message into its camera's one-slot buffer, so the executor
never waits for the GPU; a message replaced before the worker took it is counted as dropped. The
worker never dies: a malformed message is counted, logged (throttled) and reported, an engine
failure likewise, and the loop goes on. Message classes and the publish function are injected:
the node passes rclpy's classes and publishers, the tests rosbags classes and a list.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icnet_ros.inference.engine import SegmentationEngine
from icnet_ros.inference.frames import FrameError, check_frame
from icnet_ros.inference.timing import StageTimings
from icnet_ros.ros.health import HealthMonitor
from icnet_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_numpy,
    image_to_rgb,
    numpy_to_image,
)
from icnet_ros.ros.node_config import NodeConfig

# Encodings the engine reads in place (no conversion) and the overlay is published in.
DIRECT_ENCODINGS = {"rgb8": "rgb", "bgr8": "bgr", "rgba8": "rgb", "bgra8": "bgr"}


# --------------------------------------------------------------------------------------------------
# The one-slot-per-camera buffer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IncomingFrame:
    """A message as the callback received it; nothing is converted on the executor's thread."""

    camera: int
    message: Any
    compressed: bool
    received_ns: int


class LatestFrameBuffer:
    """The newest unprocessed frame of each camera. put() never blocks; take() waits for frames."""

    def __init__(self, cameras: int) -> None:
        self._slots: list[IncomingFrame | None] = [None] * cameras
        self._ready = threading.Condition()
        self._closed = False

    def put(self, frame: IncomingFrame) -> bool:
        """Store `frame` as its camera's newest; True if it replaced one not yet taken (a drop)."""
        with self._ready:
            replaced = self._slots[frame.camera] is not None
            self._slots[frame.camera] = frame
            self._ready.notify()
        return replaced

    def take(self, timeout: float | None = None) -> list[IncomingFrame]:
        """Every camera's waiting frame (emptying the slots); [] after `timeout` s or once closed."""
        with self._ready:
            self._ready.wait_for(lambda: self._closed or any(self._slots), timeout)
            frames = [frame for frame in self._slots if frame is not None]
            self._slots = [None] * len(self._slots)
        return frames

    def close(self) -> None:
        """Wake take() for good (shutdown)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineInput:
    """A frame ready for the engine: HxWx3 uint8 pixels in `channel_order`, and how to publish the overlay."""

    pixels: np.ndarray
    channel_order: str
    overlay_encoding: str
    alpha_plane: np.ndarray | None = None  # rgba8/bgra8 inputs: copied into the overlay's 4th channel


def engine_input(message: Any, compressed: bool) -> EngineInput:
    """Convert one Image or CompressedImage; ImageConversionError names what is wrong with it.

    rgb8/bgr8 (and the colour part of rgba8/bgra8) go to the engine as views of the message buffer,
    in their own channel order, and the overlay comes back in the input's encoding. Every other
    encoding (mono, Bayer, YUV, compressed) is converted to RGB and the overlay is rgb8, because
    colours cannot be shown in those encodings.
    """
    if compressed:
        pixels = EngineInput(compressed_to_rgb(message), "rgb", "rgb8")
    elif getattr(message, "encoding", None) in DIRECT_ENCODINGS:
        raw = image_to_numpy(message)
        alpha = raw[..., 3] if raw.shape[2] == 4 else None
        pixels = EngineInput(raw[..., :3], DIRECT_ENCODINGS[message.encoding], message.encoding, alpha)
    else:
        pixels = EngineInput(image_to_rgb(message), "rgb", "rgb8")
    try:
        check_frame(pixels.pixels, "image")
    except FrameError as error:
        raise ImageConversionError(str(error)) from None
    return pixels


# --------------------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageTypes:
    """Classes of the published messages: rclpy's in the node, rosbags' in tests and tools."""

    image: type
    timing: type


@dataclass(frozen=True)
class ModelInfo:
    """What the timing message says about the model."""

    model: str
    class_map: str
    keep_rate: float
    device: str

    @classmethod
    def of(cls, engine: SegmentationEngine, checkpoint: str | Path) -> ModelInfo:
        return cls(Path(checkpoint).name, engine.class_map.name, float(engine.config.keep_rate), str(engine.device))


@dataclass
class FrameResult:
    """What happened to one frame taken from the buffer (for logs and tests)."""

    camera: int
    outcome: str  # "segmented", "malformed" or "failed"
    detail: str = ""
    published: tuple[str, ...] = ()


Publish = Callable[[int, str, Any], None]  # (camera index, output name, message)
Log = Callable[[str, str], None]  # (kind of problem, text): the node throttles per kind


class MessageRecycler:
    """Reuses each output's Image message and its byte buffer from one frame to the next.

    rclpy serializes a message inside publish(), so once publish() returns the message is free to
    overwrite. Copying the pixels into the previous frame's buffer saves allocating (and page-
    faulting) some 15 MB per 1024x2048 frame. Only for publishers that do not keep the message.
    """

    def __init__(self, message_type: type) -> None:
        self.message_type = message_type
        self._previous: dict[tuple[int, str], Any] = {}

    def image(self, key: tuple[int, str], array_: np.ndarray, encoding: str, header: Any) -> Any:
        previous = self._previous.get(key)
        pixels = np.ascontiguousarray(array_)
        if previous is not None and _same_layout(previous, pixels, encoding):
            np.frombuffer(previous.data, np.uint8)[:] = pixels.reshape(-1).view(np.uint8)
            previous.header = header
            return previous
        message = numpy_to_image(pixels, encoding, header, self.message_type)
        self._previous[key] = message
        return message


def _same_layout(message: Any, pixels: np.ndarray, encoding: str) -> bool:
    height, width = pixels.shape[:2]
    return (message.encoding == encoding and message.height == height and message.width == width
            and message.step * height == pixels.nbytes and len(message.data) == pixels.nbytes
            and not message.is_bigendian)


class FrameProcessor:
    """Turns the frames taken from the buffer into published messages (see the module docstring).

    `config` may be replaced at any time (runtime parameter changes); each batch reads it once, so a
    batch never mixes two settings. reuse_messages=True recycles output messages between frames
    (MessageRecycler): right for rclpy publishers, wrong for a publish function that keeps them.
    """

    def __init__(self, engine: SegmentationEngine, config: NodeConfig, message_types: MessageTypes,
                 publish: Publish, health: HealthMonitor, clock_ns: Callable[[], int], model: ModelInfo,
                 log: Log | None = None, reuse_messages: bool = False) -> None:
        self.engine = engine
        self.recycler = MessageRecycler(message_types.image) if reuse_messages else None
        self.config = config
        self.types = message_types
        self.publish = publish
        self.health = health
        self.clock_ns = clock_ns
        self.model = model
        self.log = log or (lambda kind, text: None)

    def process(self, frames: list[IncomingFrame]) -> list[FrameResult]:
        config = self.config
        self.engine.branch = config.branch
        self.engine.alpha = config.overlay_alpha
        taken = time.perf_counter()
        results, converted = [], []
        for frame in frames:
            start = time.perf_counter()
            try:
                converted.append((frame, engine_input(frame.message, frame.compressed), _ms_since(start)))
            except ImageConversionError as error:
                results.append(self._malformed(frame, error))
        for group in _groups_of_one_size(converted):
            results.extend(self._segment_group(group, config, taken))
        return results

    def _malformed(self, frame: IncomingFrame, error: Exception) -> FrameResult:
        topic = self.health.cameras[frame.camera].topic
        text = f"malformed image on {topic}: {error}"
        self.health.frame_malformed(frame.camera, self.clock_ns(), str(error))
        self.log("malformed", text)
        return FrameResult(frame.camera, "malformed", str(error))

    def _segment_group(self, group, config: NodeConfig, taken: float) -> list[FrameResult]:
        frames = [pixels.pixels for _, pixels, _ in group]
        try:
            segmentations = self.engine.segment(frames, channel_order=group[0][1].channel_order,
                                                labels=config.publish_labels, color=config.publish_color,
                                                overlay=config.publish_overlay)
        except Exception as error:  # a CUDA out-of-memory, say: report it and keep serving later frames
            cameras = [frame.camera for frame, _, _ in group]
            self.health.frames_failed(cameras, self.clock_ns(), f"{type(error).__name__}: {error}")
            self.log("engine", f"segmentation failed for {len(cameras)} frame(s): {type(error).__name__}: {error}")
            return [FrameResult(camera, "failed", str(error)) for camera in cameras]
        return [self._publish_frame(frame, pixels, convert_ms, seg, config, taken)
                for (frame, pixels, convert_ms), seg in zip(group, segmentations)]

    def _publish_frame(self, frame: IncomingFrame, pixels: EngineInput, convert_ms: float, seg, config: NodeConfig,
                       taken: float) -> FrameResult:
        start = time.perf_counter()
        header = frame.message.header
        published = []
        for name, array, encoding in self._outputs(seg, pixels):
            if self.recycler is not None:
                message = self.recycler.image((frame.camera, name), array, encoding, header)
            else:
                message = numpy_to_image(array, encoding, header, self.types.image)
            self.publish(frame.camera, name, message)
            published.append(name)
        publish_ms = _ms_since(start)
        now_ns = self.clock_ns()
        latency_ms = (now_ns - stamp_ns(header)) / 1e6
        total_ms = _ms_since(taken)
        self.health.frame_segmented(frame.camera, now_ns, latency_ms, total_ms)
        timing = self._timing_message(frame, header, convert_ms, seg.timings, publish_ms, total_ms, latency_ms,
                                      config)
        self.publish(frame.camera, "timing", timing)
        return FrameResult(frame.camera, "segmented", published=(*published, "timing"))

    @staticmethod
    def _outputs(seg, pixels: EngineInput):
        """(output name, array, encoding) of every output the engine computed."""
        if seg.labels is not None:
            yield "labels", seg.labels, "mono8" if seg.labels.dtype == np.uint8 else "mono16"
        if seg.color is not None:
            yield "color", seg.color, "rgb8"
        if seg.overlay is not None:
            overlay = seg.overlay
            if pixels.alpha_plane is not None:
                overlay = np.dstack((overlay, pixels.alpha_plane))
            yield "overlay", overlay, pixels.overlay_encoding

    def _timing_message(self, frame, header, convert_ms: float, stages: StageTimings, publish_ms: float,
                        total_ms: float, latency_ms: float, config: NodeConfig) -> Any:
        processed, dropped, malformed = self.health.counts(frame.camera)
        return self.types.timing(
            header=header, convert_ms=convert_ms, upload_ms=stages.upload_ms, forward_ms=stages.forward_ms,
            postprocess_ms=stages.postprocess_ms, download_ms=stages.download_ms, publish_ms=publish_ms,
            total_ms=total_ms, latency_ms=latency_ms, frames_processed=processed, frames_dropped=dropped,
            frames_malformed=malformed, model=self.model.model, class_map=self.model.class_map,
            branch=config.branch, keep_rate=self.model.keep_rate, device=self.model.device,
            precision=self.engine.precision)


def _groups_of_one_size(converted):
    """Frames grouped by (height, width, channel order): each group is one batched engine call."""
    groups: dict[tuple, list] = {}
    for item in converted:
        pixels = item[1]
        groups.setdefault((*pixels.pixels.shape[:2], pixels.channel_order), []).append(item)
    return list(groups.values())


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header stamp in nanoseconds (rclpy and rosbags messages alike)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------------------------
# The worker thread
# --------------------------------------------------------------------------------------------------


class SegmentationWorker:
    """Runs FrameProcessor.process on whatever the buffer holds, on its own thread, until stopped."""

    def __init__(self, buffer: LatestFrameBuffer, processor: FrameProcessor, log: Log | None = None,
                 poll_s: float = 0.1) -> None:
        self.buffer = buffer
        self.processor = processor
        self.log = log or (lambda kind, text: None)
        self.poll_s = poll_s
        self._thread = threading.Thread(target=self._run, name="icnet_segmentation_worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.buffer.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self.buffer.closed:
            frames = self.buffer.take(self.poll_s)
            if not frames:
                continue
            try:
                self.processor.process(frames)
            except Exception as error:  # a bug or a publisher failing at shutdown: report, keep going
                self.log("worker", f"frame processing failed: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------------------------------
# Throttled warnings
# --------------------------------------------------------------------------------------------------


class LogThrottle:
    """At most one message per kind every `interval_s`, saying how many were held back in between.

    A camera sending a broken stream at 30 Hz must not flood the log, and the operator must still
    learn how many frames were affected.
    """

    def __init__(self, emit: Callable[[str], None], interval_s: float, clock_s: Callable[[], float] = time.monotonic
                 ) -> None:
        self.emit = emit
        self.interval_s = interval_s
        self.clock_s = clock_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, text: str) -> None:
        now = self.clock_s()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            held = self._held.pop(kind, 0)
            self._last[kind] = now
        self.emit(text + (f" ({held} more like this since the last report)" if held else ""))
