"""Frames taken from the buffer -> segmentation results for the publisher (no ROS imports).

    camera callback --put--> LatestFrameBuffer --take--> segmentation worker: FrameProcessor
        start(frames):  convert each message (a malformed one is counted, logged, skipped)
                        ask which messages anyone subscribes to (an image, or its compressed form):
                        no other output is computed or downloaded
                        batch the frames by size, channel order and outputs: one engine.submit each
        finish(work):   engine.collect, then deliver a SegmentedFrame per camera
                        --> publishing worker (publisher.py)

The worker starts frame k+1 before it finishes frame k, so on CUDA the next upload overlaps the
current compute (engine.submit returns at once); nothing here waits for a subscriber, because
publishing runs on its own thread. An engine failure is counted and reported, and the next frame
goes on as usual.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icnet_ros.inference.timing import StageTimings
from icnet_ros.ros.engine_input import EngineInput, engine_input
from icnet_ros.ros.frame_buffer import IncomingFrame
from icnet_ros.ros.health import HealthMonitor
from icnet_ros.ros.image_conversion import ImageConversionError
from icnet_ros.ros.node_config import NodeConfig
from icnet_ros.ros.topics import COMPRESSED_SUFFIX, VISUAL_OUTPUTS, compressed_output
from icnet_ros.visualization import region_mask

IMAGE_OUTPUTS = ("labels", "color", "overlay")  # what the engine computes
REGIONS = "regions"  # mono8 where the high-resolution path ran: drawn from the engine's choice of regions
PUBLISHED_OUTPUTS = (*IMAGE_OUTPUTS, REGIONS)
OUTPUT_FLAGS = {"labels": "publish_labels", "color": "publish_color", "overlay": "publish_overlay",
                REGIONS: "publish_regions"}

Demand = Callable[[int, str], bool]  # (camera index, output name) -> does anyone subscribe to it
Deliver = Callable[["SegmentedFrame"], None]
Log = Callable[[str, str], None]  # (kind of problem, text): the node throttles per kind


def everyone_listens(camera: int, output: str) -> bool:
    """The demand of tools and tests without ROS: every enabled image (and camera_info) is wanted;
    compressed forms only where a demand asks for them."""
    return not output.endswith(COMPRESSED_SUFFIX)


def output_messages(output: str) -> tuple[str, ...]:
    """The messages an engine output is published as: its image, and a visual output's compressed form."""
    return (output, compressed_output(output)) if output in VISUAL_OUTPUTS else (output,)


MESSAGE_OUTPUTS = {message: output for output in PUBLISHED_OUTPUTS for message in output_messages(output)}


@dataclass
class SegmentedFrame:
    """One camera's frame, segmented (or not: `outputs` empty when nobody subscribed to any image)."""

    camera: int
    header: Any  # the input message's header, unchanged
    outputs: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # name -> (pixels, encoding)
    messages: tuple[str, ...] = ()  # what to publish of them (output_messages), as subscribed when it started
    timings: StageTimings = field(default_factory=StageTimings)
    convert_ms: float = 0.0
    taken_s: float = 0.0  # time.perf_counter() when the worker took the frame from the buffer
    branch: str = ""
    precision: str = ""
    regions_computed: int = 0  # sparse: regions where the high-resolution path ran, of regions_total
    regions_total: int = 0


@dataclass
class FrameResult:
    """What happened to one frame taken from the buffer (for logs and tests)."""

    camera: int
    outcome: str  # "segmented", "idle" (no subscriber), "malformed" or "failed"
    detail: str = ""
    outputs: tuple[str, ...] = ()


@dataclass
class _Converted:
    frame: IncomingFrame
    pixels: EngineInput
    convert_ms: float
    wanted: tuple[str, ...]  # the image messages subscribed to (output_messages)


@dataclass
class Work:
    """Frames started on the engine and not yet delivered (FrameProcessor.start -> finish)."""

    config: NodeConfig
    taken_s: float
    batches: list[tuple[list[_Converted], Any]] = field(default_factory=list)  # (frames, engine handle or None)
    results: list[FrameResult] = field(default_factory=list)  # outcomes known at start (malformed, failed)


class FrameProcessor:
    """Converts, segments and delivers the frames the worker takes (see the module docstring).

    `config` may be replaced at any time (runtime parameter changes); each batch reads it once, so a
    batch never mixes two settings. `demand` says, per frame, whether an output has a subscriber.
    """

    def __init__(self, engine, config: NodeConfig, deliver: Deliver, health: HealthMonitor,
                 clock_ns: Callable[[], int], log: Log | None = None, demand: Demand = everyone_listens) -> None:
        self.engine = engine
        self.config = config
        self.deliver = deliver
        self.health = health
        self.clock_ns = clock_ns
        self.log = log or (lambda kind, text: None)
        self.demand = demand

    @property
    def pipelined(self) -> bool:
        """True when engine.submit returns before the work is done (CUDA): then one frame is kept in flight."""
        device = getattr(self.engine, "device", None)
        return getattr(device, "type", "cpu") == "cuda"

    def wanted_messages(self, camera: int, config: NodeConfig) -> tuple[str, ...]:
        """The image messages of `camera` (output_messages) that are enabled and have a subscriber right now."""
        return tuple(message for output in PUBLISHED_OUTPUTS if getattr(config, OUTPUT_FLAGS[output])
                     for message in output_messages(output) if self.demand(camera, message))

    def process(self, frames: list[IncomingFrame]) -> list[FrameResult]:
        """start + finish: segment and deliver `frames` before returning (tools and tests)."""
        return self.finish(self.start(frames))

    def start(self, frames: list[IncomingFrame]) -> Work:
        """Convert `frames` and submit them to the engine; returns without waiting for the results."""
        config = self.config
        self.engine.branch = config.branch
        self.engine.alpha = config.overlay_alpha
        if self.engine.high_res_regions != config.high_res_regions:  # validated when set: not per frame
            self.engine.high_res_regions = config.high_res_regions
        work = Work(config, time.perf_counter())
        converted = []
        for frame in frames:
            start = time.perf_counter()
            try:
                pixels = engine_input(frame.message, frame.compressed)
            except ImageConversionError as error:
                work.results.append(self._malformed(frame, error))
                continue
            converted.append(_Converted(frame, pixels, _ms_since(start), self.wanted_messages(frame.camera, config)))
        for group in _batches(converted):
            self._submit(work, group)
        return work

    def finish(self, work: Work) -> list[FrameResult]:
        """Wait for the engine and deliver every frame of `work`; the outcome of each frame."""
        results = list(work.results)
        for group, pending in work.batches:
            results.extend(self._collect(work, group, pending))
        return results

    def _submit(self, work: Work, group: list[_Converted]) -> None:
        computed = {MESSAGE_OUTPUTS[message] for message in group[0].wanted}
        if computed == {REGIONS}:  # regions come with any output (the cheapest), and only from a sparse call
            computed = {"labels"} if work.config.high_res_regions and work.config.branch == "sub124" else set()
        if not computed:  # nobody listens to any image of these cameras: compute nothing
            work.batches.append((group, None))
            return
        try:
            pending = self.engine.submit([item.pixels.pixels for item in group],
                                        channel_order=group[0].pixels.channel_order,
                                        **{name: name in computed for name in IMAGE_OUTPUTS})
        except Exception as error:  # a CUDA out-of-memory, say: report it and keep serving later frames
            work.results.extend(self._failed(group, error))
            return
        work.batches.append((group, pending))

    def _collect(self, work: Work, group: list[_Converted], pending: Any) -> list[FrameResult]:
        if pending is None:
            return [self._deliver(item, {}, None, work, "idle") for item in group]
        try:
            segmentations = self.engine.collect(pending)
        except Exception as error:  # a failure surfacing when the device finishes: the same report
            return self._failed(group, error)
        if not isinstance(segmentations, list):
            segmentations = [segmentations]
        return [self._deliver(item, dict(_outputs(seg, item.pixels, item.wanted)), seg, work, "segmented")
                for item, seg in zip(group, segmentations)]

    def _failed(self, group: list[_Converted], error: Exception) -> list[FrameResult]:
        cameras = [item.frame.camera for item in group]
        self.health.frames_failed(cameras, self.clock_ns(), f"{type(error).__name__}: {error}")
        self.log("engine", f"segmentation failed for {len(cameras)} frame(s): {type(error).__name__}: {error}")
        return [FrameResult(camera, "failed", str(error)) for camera in cameras]

    def _malformed(self, frame: IncomingFrame, error: Exception) -> FrameResult:
        topic = self.health.cameras[frame.camera].topic
        self.health.frame_malformed(frame.camera, self.clock_ns(), str(error))
        self.log("malformed", f"malformed image on {topic}: {error}")
        return FrameResult(frame.camera, "malformed", str(error))

    def _deliver(self, item: _Converted, outputs: dict, seg, work: Work, outcome: str) -> FrameResult:
        """seg: the engine's Segmentation, None when nothing was computed."""
        timings = StageTimings() if seg is None else seg.timings
        regions = (0, 0) if seg is None else (seg.regions_computed, seg.regions_total)
        self.deliver(SegmentedFrame(item.frame.camera, item.frame.message.header, outputs, item.wanted, timings,
                                    item.convert_ms, work.taken_s, work.config.branch, self.engine.precision,
                                    *regions))
        return FrameResult(item.frame.camera, outcome, outputs=tuple(outputs))


def _outputs(seg, pixels: EngineInput, wanted: tuple[str, ...]):
    """(output name, (pixels, encoding)) of every output the engine computed (and the regions asked for)."""
    if seg.regions is not None and REGIONS in wanted:
        yield REGIONS, (region_mask(seg.regions, seg.region_size, seg.network_size, seg.labels.shape
                                    if seg.labels is not None else pixels.pixels.shape[:2]), "mono8")
    if seg.labels is not None:
        yield "labels", (seg.labels, "mono8" if seg.labels.dtype == np.uint8 else "mono16")
    if seg.color is not None:
        yield "color", (seg.color, "rgb8")
    if seg.overlay is not None:
        overlay = seg.overlay
        if pixels.alpha_plane is not None:
            overlay = np.dstack((overlay, pixels.alpha_plane))
        yield "overlay", (overlay, pixels.overlay_encoding)


def _batches(converted: list[_Converted]) -> list[list[_Converted]]:
    """Frames grouped by (height, width, channel order, wanted messages): one engine call each."""
    groups: dict[tuple, list] = {}
    for item in converted:
        key = (*item.pixels.pixels.shape[:2], item.pixels.channel_order, item.wanted)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
