"""icnet-segment: segment a folder of images, a video or a rosbag2 recording offline.

Outputs under --out: label PNGs (labels/<name>.png: class ids, or the dataset's own ids with
--label-format dataset, e.g. Cityscapes label ids for a benchmark submission) and colorized PNGs
(color/<name>.png); optionally overlay PNGs (--overlay: overlay/<name>.png), an overlay video
(--overlay-video, mp4v), a JSON timing summary (--summary-json) and a new rosbag2 with label,
color and overlay topics whose headers are the input messages' headers (--out-bag). Every file is
written atomically. Unreadable inputs (a corrupt image, video or bag, a malformed message) are
skipped with a warning and counted; the run fails only when nothing could be read.

Examples:
  icnet-segment model.safetensors frames/ --out results/val9
  icnet-segment model.safetensors drive.mp4 --out results/drive --overlay-video results/drive.mp4
  icnet-segment model.safetensors bags/drive --topic /camera/image_raw --out results/bag \\
      --out-bag results/drive_segmented --label-format dataset
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from icnet_ros.atomic import atomic_write_bytes, atomic_write_text
from icnet_ros.bags.io import BagError
from icnet_ros.inference.engine import Segmentation, SegmentationEngine
from icnet_ros.inference.frames import FrameError, check_frame
from icnet_ros.inference.timing import TimingLog
from icnet_ros.model.checkpoint import CheckpointError
from icnet_ros.model.icnet import BRANCHES
from icnet_ros.model.preprocess import INPUT_SIZE_HELP, parse_input_size
from icnet_ros.ros.topics import output_topics as ros_output_topics
from icnet_ros.visualization import draw_regions, region_mask, side_by_side

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_FPS = 10.0  # overlay video rate when the input has none (images, bags)


class OfflineError(RuntimeError):
    """Nothing could be segmented: no readable input, or an output that cannot be written."""


@dataclass
class InputFrame:
    """One frame to segment: a file-safe name for its outputs, RGB pixels, and where it came from."""

    name: str
    rgb: np.ndarray
    header: Any = None  # the input message's header (bags): output messages reuse it unchanged
    topic: str | None = None
    timestamp_ns: int | None = None


class Skips:
    """Counts and reports inputs that could not be used."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, kind: str, what: str, reason: Any) -> None:
        self.counts[kind] += 1
        tqdm.write(f"warning: skipped {what}: {reason}", file=sys.stderr)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- inputs -----------------------------------------------------------------------------------------
def input_kind(path: Path, kind: str = "auto") -> str:
    """"images", "video" or "bag" for `path` (a bag is a folder with metadata.yaml)."""
    if kind != "auto":
        return kind
    if path.is_dir():
        return "bag" if (path / "metadata.yaml").is_file() else "images"
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    if path.is_file():
        raise OfflineError(f"{path} is a file with an unknown suffix; give --input-type images, video or bag")
    raise OfflineError(f"{path} does not exist; expected an image folder, a video file or a rosbag2 folder")


def iter_images(folder: Path, skips: Skips) -> Iterator[InputFrame]:
    """The folder's images in name order; unreadable files are skipped."""
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            skips.skip("image", str(path), "not a readable image (corrupt or unsupported format)")
            continue
        yield InputFrame(path.stem, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def iter_video(path: Path, skips: Skips) -> Iterator[InputFrame]:
    """Every decodable frame of a video file, named frame_000000, frame_000001, ..."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            skips.skip("video", str(path), "OpenCV cannot open it (corrupt or unsupported codec)")
            return
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok or bgr is None:
                break
            yield InputFrame(f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
        if index == 0:
            skips.skip("video", str(path), "no frame could be decoded (corrupt or unsupported codec)")
    finally:
        capture.release()


def video_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
    capture.release()
    return fps if fps and fps > 0 and np.isfinite(fps) else DEFAULT_FPS


def iter_bag(path: Path, topic: str | None, skips: Skips) -> Iterator[InputFrame]:
    """Image and CompressedImage messages of a rosbag2; malformed messages are skipped."""
    from icnet_ros.bags.io import COMPRESSED_IMAGE_TYPE, iter_image_messages
    from icnet_ros.ros.image_conversion import ImageConversionError, compressed_to_rgb, image_to_rgb

    try:
        for msg_topic, stamp_ns, msg, msgtype in iter_image_messages(path, topic):
            what = f"message on {msg_topic} at {stamp_ns} ns in {path}"
            try:
                rgb = compressed_to_rgb(msg) if msgtype == COMPRESSED_IMAGE_TYPE else image_to_rgb(msg)
            except ImageConversionError as error:
                skips.skip("message", what, error)
                continue
            yield InputFrame(f"{_safe(msg_topic)}_{stamp_ns}", rgb, getattr(msg, "header", None), msg_topic,
                             stamp_ns)
    except BagError as error:
        skips.skip("bag", str(path), error)


def _safe(topic: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", topic.strip("/")) or "image"


def open_source(path: Path, kind: str, topic: str | None, skips: Skips) -> Iterator[InputFrame]:
    if kind == "images":
        return iter_images(path, skips)
    if kind == "video":
        return iter_video(path, skips)
    if kind == "bag":
        return iter_bag(path, topic, skips)
    raise OfflineError(f"unknown input type {kind!r}; use images, video or bag")


def checked_frames(frames: Iterator[InputFrame], skips: Skips) -> Iterator[InputFrame]:
    """Frames the engine accepts; others (too small, say) are skipped with the engine's reason."""
    for frame in frames:
        try:
            check_frame(frame.rgb, frame.name)
        except FrameError as error:
            skips.skip("frame", frame.name, error)
            continue
        yield frame


# --- outputs ----------------------------------------------------------------------------------------
def write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OfflineError(f"OpenCV could not encode {path}")
    atomic_write_bytes(path, encoded.tobytes())


class AtomicVideoWriter:
    """cv2.VideoWriter into a hidden file beside the destination, renamed into place on success.

    The hidden name keeps the destination's suffix: OpenCV picks the container from it.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.partial = path.parent / f".{path.stem}.partial{path.suffix}"
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.resized = False

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self._open(bgr.shape[1], bgr.shape[0])
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            if not self.resized:
                tqdm.write(f"warning: frames change size; resizing overlays to {self.size} for {self.path}",
                           file=sys.stderr)
                self.resized = True
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(bgr)

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (width, height)
        self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
        if not self.writer.isOpened():
            raise OfflineError(f"OpenCV cannot write an mp4v video to {self.path}")

    def close(self, success: bool) -> None:
        if self.writer is not None:
            self.writer.release()
        if success and self.writer is not None:
            os.replace(self.partial, self.path)
        self.partial.unlink(missing_ok=True)


def output_topics(input_topic: str | None) -> dict[str, str]:
    """Absolute output topics beside the input, named as the node names them (icnet_ros.ros.topics):
    /cam/image_raw -> /cam/segmentation/{labels,color,overlay}; no input topic -> /segmentation/...
    """
    topics = ros_output_topics(input_topic)
    return {name: "/" + topics[name].lstrip("/") for name in ("labels", "color", "overlay")}


class Outputs:
    """Everything written per frame: PNGs, the overlay video, the output bag."""

    def __init__(self, args: argparse.Namespace, engine: SegmentationEngine, stack: ExitStack) -> None:
        self.args, self.engine = args, engine
        self.written = 0
        self.lut = engine.class_map.class_to_source_lut() if args.label_format == "dataset" else None
        self.video = AtomicVideoWriter(args.overlay_video, args.fps) if args.overlay_video else None
        self.bag = None
        if args.out_bag:
            from icnet_ros.bags.io import BagWriter

            self.bag = stack.enter_context(BagWriter(args.out_bag, storage=args.out_bag_storage,
                                                     overwrite=args.overwrite))

    @property
    def wants(self) -> dict[str, bool]:
        """Which engine outputs the requested files need (the rest is never computed)."""
        bag = self.bag is not None
        return {"labels": self.args.labels or self.args.side_by_side or bag, "color": self.args.color or bag,
                "overlay": self.args.overlay or self.args.side_by_side or self.video is not None or bag}

    def write(self, frame: InputFrame, seg: Segmentation) -> None:
        out = self.args.out
        if self.args.labels:
            write_png(out / "labels" / f"{frame.name}.png", self.label_image(seg.labels))
        if self.args.color:
            write_png(out / "color" / f"{frame.name}.png", cv2.cvtColor(seg.color, cv2.COLOR_RGB2BGR))
        if self.args.overlay:
            write_png(out / "overlay" / f"{frame.name}.png", cv2.cvtColor(seg.overlay, cv2.COLOR_RGB2BGR))
        mask = None
        if seg.regions is not None:  # sparse: where the high-resolution path ran
            mask = region_mask(seg.regions, seg.region_size, seg.network_size, seg.labels.shape)
            write_png(out / "regions" / f"{frame.name}.png", mask)
        if self.args.side_by_side:  # camera | overlay over a legend of the classes shown, one picture
            camera = frame.rgb if mask is None else draw_regions(frame.rgb, mask)
            pair = side_by_side(camera, seg.overlay, seg.labels, self.engine.class_map)
            write_png(out / "side_by_side" / f"{frame.name}.png", cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
        if self.video is not None:
            self.video.write(cv2.cvtColor(seg.overlay, cv2.COLOR_RGB2BGR))
        if self.bag is not None:
            self._write_bag(frame, seg)
        self.written += 1

    def label_image(self, labels: np.ndarray) -> np.ndarray:
        """Train ids as they are, or the dataset's ids (uint8 when they fit, else uint16)."""
        if self.lut is None:
            return labels
        mapped = self.lut[labels]
        return mapped.astype(np.uint8 if mapped.max(initial=0) <= 255 else np.uint16)

    def _write_bag(self, frame: InputFrame, seg: Segmentation) -> None:
        from icnet_ros.ros.image_conversion import make_header, numpy_to_image

        index = self.written
        stamp_ns = frame.timestamp_ns if frame.timestamp_ns is not None else int(index * 1e9 / self.args.fps)
        header = frame.header if frame.header is not None else make_header(self.args.frame_id, stamp_ns)
        labels_encoding = "mono8" if seg.labels.dtype == np.uint8 else "mono16"
        topics = output_topics(frame.topic)
        self.bag.write(topics["labels"], stamp_ns, numpy_to_image(seg.labels, labels_encoding, header))
        self.bag.write(topics["color"], stamp_ns, numpy_to_image(seg.color, "rgb8", header))
        self.bag.write(topics["overlay"], stamp_ns, numpy_to_image(seg.overlay, "rgb8", header))

    def close(self, success: bool) -> None:
        if self.video is not None:
            self.video.close(success)


# --- the run ----------------------------------------------------------------------------------------
def segment_frames(engine: SegmentationEngine, frames: Iterator[InputFrame], wants: dict[str, bool]
                   ) -> Iterator[tuple[InputFrame, Segmentation]]:
    """(frame, segmentation) pairs in order; the engine keeps one frame in flight (GPU overlap)."""
    pending: deque[InputFrame] = deque()

    def pixels():
        for frame in frames:
            pending.append(frame)
            yield frame.rgb

    for seg in engine.segment_stream(pixels(), **wants):
        yield pending.popleft(), seg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="model checkpoint (.safetensors)")
    parser.add_argument("input", type=Path, help="image folder, video file or rosbag2 folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder for labels/ and color/ PNGs")
    parser.add_argument("--input-type", choices=("auto", "images", "video", "bag"), default="auto")
    parser.add_argument("--topic", help="bag image topic (default: every Image/CompressedImage topic)")
    parser.add_argument("--label-format", choices=("train", "dataset"), default="train",
                        help="train: class ids; dataset: the dataset's own ids (e.g. Cityscapes label ids)")
    parser.add_argument("--no-labels", dest="labels", action="store_false", help="skip label PNGs")
    parser.add_argument("--no-color", dest="color", action="store_false", help="skip colorized PNGs")
    parser.add_argument("--overlay", action="store_true", help="also write overlay PNGs (overlay/<name>.png)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also write camera | overlay pictures with a legend of the classes they show "
                             "(side_by_side/<name>.png)")
    parser.add_argument("--overlay-video", type=Path, help="write an mp4v overlay video here")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colors (0..1)")
    parser.add_argument("--fps", type=float, default=None, help="overlay video rate (default: the input's)")
    parser.add_argument("--out-bag", type=Path, help="write a rosbag2 with labels, color and overlay topics")
    parser.add_argument("--out-bag-storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--frame-id", default="camera", help="header frame id for non-bag inputs in --out-bag")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-bag")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--branch", choices=BRANCHES, default="sub124")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--input-size", default="checkpoint",
                        help=f"network input size: {INPUT_SIZE_HELP}; outputs are always at the frame's size")
    parser.add_argument("--high-res-regions", type=int, default=0,
                        help="0: dense; k: run the high-resolution path in the k best regions per frame only "
                             "(spatial sparsity) and write regions/<name>.png (255 where it ran)")
    parser.add_argument("--region-selector", choices=("auto", "gate", "entropy"), default="auto",
                        help="how regions are chosen: a gated checkpoint's gate, or sub24's entropy")
    parser.add_argument("--region-size", type=int, default=256,
                        help="entropy selector: region side in network-input pixels (a gate has its own)")
    parser.add_argument("--summary-json", type=Path, help="write the timing summary and counts here as JSON")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Segment everything; returns counts and the timing log. Raises OfflineError if nothing was read."""
    kind = input_kind(args.input, args.input_type)
    if args.fps is None:
        args.fps = video_fps(args.input) if kind == "video" else DEFAULT_FPS
    engine = SegmentationEngine.from_checkpoint(args.checkpoint, device=args.device, branch=args.branch,
                                                precision=args.precision, threads=args.threads, alpha=args.alpha,
                                                high_res_regions=args.high_res_regions,
                                                region_selector=args.region_selector, region_size=args.region_size)
    engine.input_size = parse_input_size(args.input_size, engine.config.input_size)
    skips, log = Skips(), TimingLog()
    with ExitStack() as stack:
        outputs = Outputs(args, engine, stack)
        success = False
        try:
            frames = checked_frames(open_source(args.input, kind, args.topic, skips), skips)
            wants = outputs.wants
            if not any(wants.values()):
                raise OfflineError("nothing to write: --no-labels and --no-color without --overlay, "
                                   "--overlay-video or --out-bag")
            for frame, seg in tqdm(segment_frames(engine, frames, wants), desc="segmenting", unit="frame"):
                outputs.write(frame, seg)
                log.add(seg.timings)
            if outputs.written == 0:
                raise OfflineError(f"nothing could be segmented from {args.input} ({skips.total} input(s) "
                                   "skipped, see the warnings above)")
            success = True
        finally:
            outputs.close(success)
    summary = {"frames": outputs.written, "skipped": dict(skips.counts), "timing": log, "kind": kind,
               "device": str(engine.device), "precision": engine.precision, "branch": engine.branch}
    if args.summary_json:
        atomic_write_text(args.summary_json, json.dumps(summary_record(summary, args), indent=2) + "\n")
    return summary


def summary_record(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The run's summary as plain JSON: counts, settings, and p50 / p95 per stage."""
    log: TimingLog = summary["timing"]
    return {"input": str(args.input), "checkpoint": str(args.checkpoint), "out": str(args.out),
            "frames": summary["frames"], "skipped": summary["skipped"], "device": summary["device"],
            "precision": summary["precision"], "branch": summary["branch"], "stages_ms": log.summary(),
            "fps": log.fps()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (OfflineError, CheckpointError, BagError, ValueError) as error:  # ValueError: a bad --input-size
        print(f"icnet-segment: error: {error}", file=sys.stderr)
        return 1
    print(summary["timing"].format())
    skipped = summary["skipped"]
    print(f"segmented {summary['frames']} frame(s) from {args.input} ({summary['kind']}) into {args.out}; "
          f"skipped {sum(skipped.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})"
                                                  if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
