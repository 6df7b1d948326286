"""Segmented frames -> published messages, on the publishing worker's thread (no ROS imports).

Per frame, in this order, each with the input image's header:

    segmentation/labels, color, overlay   the outputs the processor computed (those with subscribers)
    segmentation/{color,overlay}/compressed
                                          JPEG (sensor_msgs/CompressedImage), encoded only when subscribed
    segmentation/camera_info              the camera's CameraInfo, relayed (if anyone subscribes)
    segmentation/timing                   always: stage times, latency, counts, what was published

color and overlay (and their compressed forms) are published at visual_scale times the frame's
size, resized here once per frame; labels always at the frame's size.

rclpy serializes inside publish(), which costs milliseconds per multi-megabyte image; running here,
on a thread of its own, that cost never delays the segmentation of the next frame. Message classes
and the publish function are injected: the node passes rclpy's, tools and tests rosbags' or lists.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from icnet_ros.ros.health import HealthMonitor
from icnet_ros.ros.image_conversion import image_to_jpeg, numpy_to_image
from icnet_ros.ros.node_config import NodeConfig
from icnet_ros.ros.processor import Demand, SegmentedFrame, everyone_listens, output_messages
from icnet_ros.ros.recycler import MessageRecycler
from icnet_ros.ros.topics import COMPRESSED_SUFFIX, VISUAL_OUTPUTS

Publish = Callable[[int, str, Any], None]  # (camera index, output name, message)
CAMERA_INFOS_KEPT = 8  # per camera: enough to find the one stamped like a frame that waited in the buffers
# Shrinking: class colors by the nearest pixel (every pixel stays a class's color), the overlay by
# area averaging (a smaller camera image without aliasing).
SHRINKING = {"color": cv2.INTER_NEAREST, "overlay": cv2.INTER_AREA}


@dataclass(frozen=True)
class MessageTypes:
    """Classes of the published messages: rclpy's in the node, rosbags' in tests and tools."""

    image: type
    timing: type
    compressed: type | None = None  # sensor_msgs/CompressedImage; None: the rosbags class


@dataclass(frozen=True)
class ModelInfo:
    """What the timing message says about the model."""

    model: str
    class_map: str
    keep_rate: float
    device: str

    @classmethod
    def of(cls, engine, checkpoint: str | Path) -> ModelInfo:
        return cls(Path(checkpoint).name, engine.class_map.name, float(engine.config.keep_rate), str(engine.device))


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header stamp in nanoseconds (rclpy and rosbags messages alike)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class CameraInfoCache:
    """The recent CameraInfo messages of each camera, to relay the one that belongs to a frame."""

    def __init__(self, cameras: int) -> None:
        self._infos: list[OrderedDict[int, Any]] = [OrderedDict() for _ in range(cameras)]
        self._lock = threading.Lock()

    def put(self, camera: int, message: Any) -> None:
        with self._lock:
            infos = self._infos[camera]
            infos[stamp_ns(message.header)] = message
            while len(infos) > CAMERA_INFOS_KEPT:
                infos.popitem(last=False)

    def for_frame(self, camera: int, stamp: int) -> Any | None:
        """The CameraInfo stamped like the frame, else the newest one, else None."""
        with self._lock:
            infos = self._infos[camera]
            if stamp in infos:
                return infos[stamp]
            return next(reversed(infos.values()), None)


class OutputPublisher:
    """Publishes a SegmentedFrame's messages (see the module docstring) and records its health.

    `config` may be replaced at any time, like FrameProcessor's. reuse_messages=True recycles the
    image messages between frames (MessageRecycler): right for rclpy publishers, which serialize in
    publish(), wrong for a publish function that keeps the messages.
    """

    def __init__(self, message_types: MessageTypes, publish: Publish, health: HealthMonitor,
                 clock_ns: Callable[[], int], model: ModelInfo, config: NodeConfig, reuse_messages: bool = False,
                 camera_infos: CameraInfoCache | None = None, demand: Demand = everyone_listens) -> None:
        self.types = message_types
        self.publish = publish
        self.health = health
        self.last_regions: dict[int, tuple[int, int]] = {}  # camera -> (regions computed, of), for diagnostics
        self.clock_ns = clock_ns
        self.model = model
        self.config = config
        self.recycler = MessageRecycler(message_types.image) if reuse_messages else None
        self.camera_infos = camera_infos
        self.demand = demand

    def publish_frames(self, frames: list[SegmentedFrame]) -> None:
        for frame in frames:
            self.publish_frame(frame)

    def publish_frame(self, frame: SegmentedFrame) -> tuple[str, ...]:
        """Publish one frame's messages; returns the names published, timing last."""
        config = self.config
        start = time.perf_counter()
        published = self._publish_images(frame, config)
        self.last_regions[frame.camera] = (frame.regions_computed, frame.regions_total)
        if self._relay_camera_info(frame):
            published.append("camera_info")
        publish_ms = (time.perf_counter() - start) * 1e3
        now_ns = self.clock_ns()
        latency_ms = self._latency_ms(frame, now_ns, config)
        total_ms = (time.perf_counter() - frame.taken_s) * 1e3
        self.health.frame_published(frame.camera, now_ns, None if math.isnan(latency_ms) else latency_ms, total_ms,
                                    computed=bool(frame.outputs))
        self.publish(frame.camera, "timing", self._timing_message(frame, publish_ms, total_ms, latency_ms, published))
        return (*published, "timing")

    def _publish_images(self, frame: SegmentedFrame, config: NodeConfig) -> list[str]:
        """Each computed output as the messages subscribed to (frame.messages); their names."""
        published = []
        for output, (pixels, encoding) in frame.outputs.items():
            if output in VISUAL_OUTPUTS:
                pixels = visual_size(pixels, output, config.visual_scale)
            for name in output_messages(output):
                if name in frame.messages:
                    self.publish(frame.camera, name, self._image_message(frame, name, pixels, encoding, config))
                    published.append(name)
        return published

    def _image_message(self, frame: SegmentedFrame, name: str, pixels: np.ndarray, encoding: str,
                       config: NodeConfig) -> Any:
        if name.endswith(COMPRESSED_SUFFIX):
            return image_to_jpeg(pixels, encoding, frame.header, self.types.compressed, quality=config.jpeg_quality)
        if self.recycler is not None:
            return self.recycler.image((frame.camera, name), pixels, encoding, frame.header)
        return numpy_to_image(pixels, encoding, frame.header, self.types.image)

    def _relay_camera_info(self, frame: SegmentedFrame) -> bool:
        if self.camera_infos is None or not self.demand(frame.camera, "camera_info"):
            return False
        info = self.camera_infos.for_frame(frame.camera, stamp_ns(frame.header))
        if info is None:
            return False
        info.header = frame.header  # the outputs' header, so the pair lines up downstream
        self.publish(frame.camera, "camera_info", info)
        return True

    def _latency_ms(self, frame: SegmentedFrame, now_ns: int, config: NodeConfig) -> float:
        """Stamp to publish; NaN (and a diagnostic) when the stamp is on another clock altogether."""
        offset_s = (now_ns - stamp_ns(frame.header)) / 1e9
        if abs(offset_s) > config.clock_mismatch_s:
            self.health.clock_mismatch(frame.camera, now_ns, offset_s)
            return float("nan")
        return offset_s * 1e3

    def _timing_message(self, frame: SegmentedFrame, publish_ms: float, total_ms: float, latency_ms: float,
                        published: list[str]) -> Any:
        counts = self.health.counts(frame.camera)
        stages = frame.timings
        return self.types.timing(
            header=frame.header, convert_ms=frame.convert_ms, upload_ms=stages.upload_ms,
            forward_ms=stages.forward_ms, postprocess_ms=stages.postprocess_ms, download_ms=stages.download_ms,
            publish_ms=publish_ms, total_ms=total_ms, latency_ms=latency_ms, frames_processed=counts.processed,
            frames_dropped=counts.dropped, frames_malformed=counts.malformed, frames_missing=counts.missing,
            outputs=list(published), model=self.model.model, class_map=self.model.class_map, branch=frame.branch,
            keep_rate=self.model.keep_rate, device=self.model.device, precision=frame.precision,
            regions_computed=frame.regions_computed, regions_total=frame.regions_total)


def visual_size(pixels: np.ndarray, output: str, scale: float) -> np.ndarray:
    """A visual output at `scale` times its size (at least one pixel each way); unchanged at 1."""
    if scale == 1.0:
        return pixels
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # OpenCV: (width, height)
    return cv2.resize(np.ascontiguousarray(pixels), size, interpolation=SHRINKING[output])
