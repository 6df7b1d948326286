"""Per-frame cost of the node beyond the engine: conversion in, three output messages out. No ROS.

Runs the node's FrameProcessor and OutputPublisher with an engine stand-in that returns
precomputed outputs instantly, so what is timed is exactly the node's own work per frame:
converting the input message, building the labels / color / overlay Image messages and the timing
message, and handing them to publish. Messages are built as rclpy builds them (data as
array.array('B'), one copy) and, for comparison, as rosbags classes, each with and without rosbags'
CDR serialization of the outputs (a stand-in for the serialization rclpy does inside publish()).

With --checkpoint, the whole node path with the real engine instead: the node's two threads
(segmentation, publishing) fed as fast as they take frames, reporting throughput and per-frame
latency separately, for labels only and for all three outputs.

    python -m icnet_ros.ros.overhead --height 1024 --width 2048 --frames 50
    python -m icnet_ros.ros.overhead --checkpoint model.safetensors --device cuda --frames 300
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from array import array
from typing import Any

import cv2
import numpy as np

from icnet_ros.inference.engine import Segmentation
from icnet_ros.inference.timing import StageTimings, percentile
from icnet_ros.ros.frame_buffer import IncomingFrame
from icnet_ros.ros.health import HealthMonitor
from icnet_ros.ros.image_conversion import numpy_to_image, rgb_to_compressed
from icnet_ros.ros.log_throttle import LogThrottle
from icnet_ros.ros.messages import package_typestore, rosbags_message_types
from icnet_ros.ros.node_config import NodeConfig
from icnet_ros.ros.processor import IMAGE_OUTPUTS, FrameProcessor, everyone_listens
from icnet_ros.ros.publisher import MessageTypes, ModelInfo, OutputPublisher


class RclpyLikeImage:
    """What publishing costs with rclpy's generated class: attributes, data stored as array.array('B')."""

    __slots__ = ("data", "encoding", "header", "height", "is_bigendian", "step", "width")

    def __init__(self, **fields: Any) -> None:
        self.data = array("B")
        for name, value in fields.items():
            setattr(self, name, value)


class RclpyLikeTiming(types.SimpleNamespace):
    """The timing message as plain attributes (rclpy's class sets a few dozen scalars the same way)."""


class InstantEngine:
    """Stands in for SegmentationEngine: returns fixed outputs of the frame's size at no cost."""

    def __init__(self, height: int, width: int, num_classes: int = 19) -> None:
        rng = np.random.default_rng(0)
        self.outputs = Segmentation(labels=rng.integers(0, num_classes, (height, width), dtype=np.uint8),
                                    color=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                                    overlay=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                                    timings=StageTimings())
        self.branch, self.alpha, self.precision = "sub124", 0.5, "fp16"

    def submit(self, frames, **options):
        return self.segment(frames, **options)

    def collect(self, pending):
        return pending

    def close(self) -> None:
        pass

    def segment(self, frames, **options):
        return [Segmentation(labels=self.outputs.labels if options.get("labels") else None,
                             color=self.outputs.color if options.get("color") else None,
                             overlay=self.outputs.overlay if options.get("overlay") else None,
                             timings=self.outputs.timings) for _ in frames]


class RclpyLikeCompressedImage:
    __slots__ = ("data", "format", "header")

    def __init__(self) -> None:
        self.data = array("B")


def input_message(kind: str, height: int, width: int) -> tuple[Any, bool]:
    """A camera message of `kind` (an encoding, or "jpeg" for a CompressedImage), as rclpy delivers it."""
    rgb = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb = cv2.GaussianBlur(rgb, (9, 9), 3)  # camera-like content, so JPEG sizes are realistic
    header = types.SimpleNamespace(stamp=types.SimpleNamespace(sec=1_700_000_000, nanosec=0), frame_id="camera")
    if kind == "jpeg":
        return rgb_to_compressed(rgb, "jpeg", header, RclpyLikeCompressedImage), True
    pixels = {"rgb8": rgb, "bgr8": np.ascontiguousarray(rgb[..., ::-1]),
              "bayer_rggb8": np.ascontiguousarray(rgb[..., 1]), "yuv422": np.ascontiguousarray(rgb[..., :2])}[kind]
    return numpy_to_image(pixels, kind, header, RclpyLikeImage), False


def measure(kind: str, height: int, width: int, frames: int, message_types: MessageTypes,
            serialize: bool, reuse: bool = False, engine: Any = None) -> dict[str, Any]:
    """Node time per frame; with `engine` (a SegmentationEngine) the engine's time is included."""
    message, compressed = input_message(kind, height, width)
    store = package_typestore() if serialize else None
    published: list[Any] = []

    def publish(camera: int, name: str, msg: Any) -> None:
        if store is not None and name != "timing":
            store.serialize_cdr(msg, "sensor_msgs/msg/Image")
        published.append(msg)

    health = HealthMonitor(["image"], time.time_ns())
    config = NodeConfig()
    publisher = OutputPublisher(message_types, publish, health, time.time_ns,
                                ModelInfo("benchmark", "cityscapes", 0.25, "cuda:0"), config, reuse_messages=reuse)
    processor = FrameProcessor(engine or InstantEngine(height, width), config, publisher.publish_frame, health,
                               time.time_ns)
    totals, converts = [], []
    for index in range(frames + 2):  # two warm-up frames
        start = time.perf_counter()
        processor.process([IncomingFrame(0, message, compressed, 0)])
        elapsed = (time.perf_counter() - start) * 1e3
        if index >= 2:
            totals.append(elapsed)
            converts.append(published[-1].convert_ms)
        published.clear()
    return {"input": kind, "size": f"{height}x{width}", "messages": message_types.image.__name__,
            "serialize": serialize, "reuse": reuse, "frames": frames,
            "node_ms_p50": percentile(totals, 50), "node_ms_p95": percentile(totals, 95),
            "convert_ms_p50": percentile(converts, 50),
            "outputs_ms_p50": percentile(totals, 50) - percentile(converts, 50)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m icnet_ros.ros.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--inputs", nargs="+", default=["rgb8", "bgr8", "bayer_rggb8", "yuv422", "jpeg"])
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--checkpoint", help="time the whole node path with this model's engine instead of "
                        "an instant stand-in (rclpy-like recycled messages only)")
    parser.add_argument("--device", default="auto", help="engine device with --checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rclpy_like = MessageTypes(RclpyLikeImage, RclpyLikeTiming)
    if args.checkpoint:
        return _with_engine(args, rclpy_like)
    rosbags_types = rosbags_message_types()
    # (messages, CDR serialization, recycled messages): the node itself runs rclpy-like + recycled
    variants = [(rclpy_like, False, True), (rclpy_like, False, False), (rosbags_types, True, False)]
    print("| input | messages | recycled | + CDR | node p50 ms | node p95 ms | convert p50 | outputs p50 |")
    print("|---|---|---|---|---|---|---|---|")
    records = []
    for kind in args.inputs:
        for message_types, serialize, reuse in variants:
            record = measure(kind, args.height, args.width, args.frames, message_types, serialize, reuse)
            records.append(record)
            print(f"| {kind} {record['size']} | {'rclpy-like' if message_types is rclpy_like else 'rosbags'} | "
                  f"{'yes' if reuse else 'no'} | {'yes' if serialize else 'no'} | {record['node_ms_p50']:.1f} | "
                  f"{record['node_ms_p95']:.1f} | {record['convert_ms_p50']:.1f} | {record['outputs_ms_p50']:.1f} |",
                  flush=True)
    if args.json:
        from icnet_ros.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    return 0


def _with_engine(args: argparse.Namespace, rclpy_like: MessageTypes) -> int:
    """The whole node path with the real engine: what rate one camera can sustain through the node."""
    from icnet_ros.inference.engine import SegmentationEngine

    engine = SegmentationEngine.from_checkpoint(args.checkpoint, device=args.device)
    print(f"engine {args.checkpoint} on {engine.device} ({engine.precision}); the node's two threads, input always "
          "waiting, recycled rclpy-like messages")
    print("| input | outputs | throughput fps | latency p50 ms | p95 ms | publish p50 ms |")
    print("|---|---|---|---|---|---|")
    records = []
    for kind in args.inputs:
        for outputs in (("labels",), IMAGE_OUTPUTS):
            record = measure_node_path(engine, kind, args.height, args.width, args.frames, outputs, rclpy_like,
                                       args.checkpoint)
            records.append(record)
            print(f"| {kind} {record['size']} | {'+'.join(outputs)} | {record['fps']:.0f} | "
                  f"{record['latency_ms_p50']:.1f} | {record['latency_ms_p95']:.1f} | "
                  f"{record['publish_ms_p50']:.1f} |", flush=True)
    if args.json:
        from icnet_ros.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    return 0


def measure_node_path(engine: Any, kind: str, height: int, width: int, frames: int, outputs: tuple[str, ...],
                      message_types: MessageTypes, checkpoint: str) -> dict[str, Any]:
    """Frames per second through SegmentationSession (the node minus rclpy), and the time from a
    frame leaving the input buffer to its last message published (timing.total_ms)."""
    from icnet_ros.ros.session import SegmentationSession

    message, compressed = input_message(kind, height, width)
    config = NodeConfig(**{f"publish_{name}": name in outputs for name in IMAGE_OUTPUTS})
    engine.warm_up(height, width, **{name: name in outputs for name in IMAGE_OUTPUTS})
    timings: list[Any] = []
    published_at: list[float] = []

    def publish(camera: int, name: str, msg: Any) -> None:
        if name == "timing":
            timings.append(msg)
            published_at.append(time.perf_counter())

    session = SegmentationSession(engine, config, checkpoint, message_types, publish, everyone_listens,
                                  time.time_ns, LogThrottle(print, 5.0))
    session.start(time.time_ns())
    try:
        while len(timings) < frames + 2:  # keep a frame waiting: the camera is never the bottleneck
            stats = session.health.cameras[0]
            if stats.failed or stats.malformed:  # such frames publish no timing: it would wait forever
                raise RuntimeError(f"the node path failed on this input ({stats.failed} engine failures, "
                                   f"{stats.malformed} malformed): {stats.last_problem}")
            if session.frames_waiting() == 0:
                session.frame_arrived(0, message, compressed, time.time_ns())
            time.sleep(0.0001)
    finally:
        session.stop(5.0)
    measured = timings[2:]  # two warm-up frames; the rate is counted from the second one on
    return {"input": kind, "size": f"{height}x{width}", "outputs": list(outputs), "frames": len(measured),
            "fps": (len(published_at) - 2) / (published_at[-1] - published_at[1]),
            "latency_ms_p50": percentile([t.total_ms for t in measured], 50),
            "latency_ms_p95": percentile([t.total_ms for t in measured], 95),
            "publish_ms_p50": percentile([t.publish_ms for t in measured], 50)}


if __name__ == "__main__":
    sys.exit(main())
