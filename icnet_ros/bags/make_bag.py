"""icnet-make-bag: turn an image sequence into a rosbag2 that `ros2 bag play` replays into the node.

Two sources are understood:

  * a Cityscapes-style `leftImg8bit_sequence` tree (the real dataset or the project's synthetic drives):
      <root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png
    One snippet (--split, --city, --sequence) is written, stamped at 17 Hz (Cityscapes' frame rate)
    from its frame numbers. When calibration files are present,
      <root>/camera/<split>/<city>/<city>_<seq:06d>_<frame:06d>_camera.json
    a sensor_msgs/CameraInfo (pinhole, plumb_bob with zero distortion) goes with every frame.
  * a plain folder of images, sorted by file name and stamped at 10 Hz.

Examples:
  icnet-make-bag data/cityscapes -o bags/aachen_0 --split train --city aachen --sequence 0
  icnet-make-bag my_frames/ -o bags/frames --rate 30 --storage sqlite3 --compressed
"""
from __future__ import annotations

import argparse
import json
import posixpath
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from icnet_ros.bags.io import STORAGES, BagError, BagWriter, camera_info_message
from icnet_ros.ros.image_conversion import (
    ImageConversionError,
    make_header,
    numpy_to_image,
    rgb_to_compressed,
)

CITYSCAPES_RATE_HZ = 17.0
FOLDER_RATE_HZ = 10.0
# A fixed, plausible wall-clock start: bags are reproducible, and stamps are far from zero, which
# rclpy treats as "time not set" under use_sim_time.
DEFAULT_START_TIME_S = 1_700_000_000.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SEQUENCE_DIR = "leftImg8bit_sequence"
SPLIT_PREFERENCE = ("val", "train", "test")


class MakeBagError(ValueError):
    """Input that cannot become a bag (missing folder, unreadable image, mixed sizes)."""


@dataclass(frozen=True)
class Frame:
    """One image to write: its file, its stamp and the calibration file that goes with it (if any)."""

    path: Path
    stamp_ns: int
    camera_json: Path | None = None


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def cityscapes_frames(root: Path, split: str | None, city: str | None, sequence: int | None,
                      rate_hz: float, start_ns: int) -> tuple[list[Frame], str]:
    """Frames of one leftImg8bit_sequence snippet, and a line saying which snippet was chosen."""
    root = root.parent if root.name == SEQUENCE_DIR else root
    split_dir = _choose(root / SEQUENCE_DIR, split, "split", SPLIT_PREFERENCE)
    city_dir = _choose(split_dir, city, "city", ())
    pattern = re.compile(rf"^{re.escape(city_dir.name)}_(\d{{6}})_(\d{{6}})_leftImg8bit\.png$")
    by_sequence: dict[int, list[tuple[int, Path]]] = {}
    for path in city_dir.iterdir():
        if match := pattern.match(path.name):
            by_sequence.setdefault(int(match[1]), []).append((int(match[2]), path))
    if not by_sequence:
        raise MakeBagError(f"{city_dir} holds no <city>_<seq:06d>_<frame:06d>_leftImg8bit.png images")
    if sequence is None:
        sequence = min(by_sequence)
    elif sequence not in by_sequence:
        raise MakeBagError(f"sequence {sequence} is not in {city_dir}; sequences: {sorted(by_sequence)}")
    numbered = sorted(by_sequence[sequence])
    camera_dir = root / "camera" / split_dir.name / city_dir.name
    fallback = _sequence_camera_json(camera_dir, city_dir.name, sequence)
    first = numbered[0][0]
    frames = [
        Frame(path, start_ns + round((number - first) * 1e9 / rate_hz),
              _frame_camera_json(camera_dir, path) or fallback)
        for number, path in numbered
    ]
    chosen = (f"split {split_dir.name}, city {city_dir.name}, sequence {sequence} "
              f"(of {len(by_sequence)} in this city)")
    return frames, chosen


def folder_frames(folder: Path, rate_hz: float, start_ns: int) -> list[Frame]:
    """Every image file directly in `folder`, sorted by name, one every 1/rate_hz seconds."""
    if not folder.is_dir():
        raise MakeBagError(f"{folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MakeBagError(f"{folder} holds no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return [Frame(path, start_ns + round(index * 1e9 / rate_hz)) for index, path in enumerate(paths)]


def _choose(parent: Path, wanted: str | None, what: str, preference: tuple[str, ...]) -> Path:
    """The sub-folder `wanted` of `parent`, or the preferred / first one when none is asked for."""
    if not parent.is_dir():
        raise MakeBagError(f"{parent} does not exist; expected a Cityscapes {SEQUENCE_DIR} layout")
    present = sorted(p.name for p in parent.iterdir() if p.is_dir())
    if not present:
        raise MakeBagError(f"{parent} holds no {what} folders")
    if wanted is None:
        wanted = next((name for name in preference if name in present), present[0])
    if wanted not in present:
        raise MakeBagError(f"{what} {wanted!r} is not in {parent}; available: {', '.join(present)}")
    return parent / wanted


def _frame_camera_json(camera_dir: Path, image_path: Path) -> Path | None:
    candidate = camera_dir / image_path.name.replace("_leftImg8bit.png", "_camera.json")
    return candidate if candidate.is_file() else None


def _sequence_camera_json(camera_dir: Path, city: str, sequence: int) -> Path | None:
    """Cityscapes ships one calibration file per snippet (for its annotated frame): use it for all."""
    if not camera_dir.is_dir():
        return None
    return next(iter(sorted(camera_dir.glob(f"{city}_{sequence:06d}_*_camera.json"))), None)


def read_intrinsics(path: Path) -> tuple[float, float, float, float]:
    """(fx, fy, u0, v0) from a Cityscapes camera JSON file."""
    try:
        intrinsic = json.loads(path.read_text())["intrinsic"]
        return tuple(float(intrinsic[key]) for key in ("fx", "fy", "u0", "v0"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MakeBagError(
            f"{path}: not a Cityscapes camera file ({type(error).__name__}: {error}); expected "
            '{"intrinsic": {"fx": ..., "fy": ..., "u0": ..., "v0": ...}}'
        ) from error


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BagOptions:
    """How write_image_bag writes: storage, topics, frame id, encoding or JPEG compression."""

    storage: str = "mcap"
    topic: str = "/camera/image_raw"
    camera_info_topic: str | None = None  # default: camera_info beside the image topic
    frame_id: str = "camera"
    encoding: str = "rgb8"
    compressed: bool = False
    jpeg_quality: int = 90
    overwrite: bool = False
    progress: bool = True


def camera_info_topic_for(image_topic: str) -> str:
    """`<namespace>/camera_info` for `<namespace>/<image>`, as image_transport pairs them."""
    namespace = posixpath.dirname(image_topic.rstrip("/"))
    return posixpath.join(namespace, "camera_info") if namespace else "camera_info"


def write_image_bag(frames: list[Frame], output: Path, options: BagOptions) -> dict[str, Any]:
    """Write `frames` into a new bag at `output`; returns a summary (frames, duration, topics, path)."""
    if not frames:
        raise MakeBagError("no frames to write")
    info_topic = options.camera_info_topic or camera_info_topic_for(options.topic)
    image_size = None
    with BagWriter(output, options.storage, overwrite=options.overwrite) as bag:
        for frame in tqdm(frames, desc=f"writing {output.name}", unit="frame", disable=not options.progress):
            rgb = _read_rgb(frame.path)
            image_size = _check_same_size(image_size, rgb, frame.path, frames[0].path)
            header = make_header(options.frame_id, frame.stamp_ns)
            bag.write(options.topic, frame.stamp_ns, _image_message(rgb, header, options))
            if frame.camera_json is not None:
                fx, fy, cx, cy = read_intrinsics(frame.camera_json)
                info = camera_info_message(rgb.shape[1], rgb.shape[0], fx, fy, cx, cy, header)
                bag.write(info_topic, frame.stamp_ns, info)
        counts, msgtypes = dict(bag.counts), dict(bag.topics)
    duration_s = (frames[-1].stamp_ns - frames[0].stamp_ns) / 1e9
    return {"path": str(output), "storage": options.storage, "frames": len(frames), "duration_s": duration_s,
            "size": image_size, "topics": {t: (msgtypes[t], n) for t, n in counts.items()}}


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise MakeBagError(f"cannot read image {path}: the file is missing, truncated or not an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_same_size(size, rgb: np.ndarray, path: Path, first: Path) -> tuple[int, int]:
    """A bag replays one camera, so every frame must have the first frame's size."""
    if size is not None and rgb.shape[:2] != size:
        raise MakeBagError(
            f"{path} is {rgb.shape[1]}x{rgb.shape[0]} but {first} is {size[1]}x{size[0]}; "
            "all frames of a bag must have one size (resize them first)"
        )
    return rgb.shape[:2]


def _image_message(rgb: np.ndarray, header: Any, options: BagOptions) -> Any:
    if options.compressed:
        return rgb_to_compressed(rgb, "jpeg", header, quality=options.jpeg_quality)
    pixels = rgb if options.encoding == "rgb8" else np.ascontiguousarray(rgb[..., ::-1])
    return numpy_to_image(pixels, options.encoding, header)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The icnet-make-bag command line."""
    parser = argparse.ArgumentParser(prog="icnet-make-bag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path,
                        help="Cityscapes root (holding leftImg8bit_sequence/) or image folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="bag folder to create")
    parser.add_argument("--layout", choices=("auto", "cityscapes", "folder"), default="auto",
                        help="how to read SOURCE (auto: cityscapes when it holds leftImg8bit_sequence/)")
    parser.add_argument("--split", help="Cityscapes split (default: val, else train, else the first)")
    parser.add_argument("--city", help="Cityscapes city (default: the first)")
    parser.add_argument("--sequence", type=int, help="Cityscapes sequence number (default: the first)")
    parser.add_argument("--rate", type=float, help=f"frames per second (default: {CITYSCAPES_RATE_HZ:g} for "
                        f"Cityscapes, {FOLDER_RATE_HZ:g} for a folder)")
    parser.add_argument("--start-time", type=float, default=DEFAULT_START_TIME_S,
                        help="stamp of the first frame, seconds since the epoch")
    parser.add_argument("--storage", choices=STORAGES, default="mcap")
    parser.add_argument("--topic", default="/camera/image_raw", help="image topic")
    parser.add_argument("--camera-info-topic", help="CameraInfo topic (default: <namespace>/camera_info)")
    parser.add_argument("--frame-id", default="camera", help="header frame_id")
    parser.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="raw image encoding")
    parser.add_argument("--compressed", action="store_true",
                        help="write sensor_msgs/CompressedImage (JPEG) instead of raw images")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality with --compressed (1-100)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def collect_frames(args: argparse.Namespace) -> tuple[list[Frame], str]:
    """The frames named by the command line, and a line describing where they came from."""
    layout = args.layout
    if layout == "auto":
        is_sequence = (args.source / SEQUENCE_DIR).is_dir() or args.source.name == SEQUENCE_DIR
        layout = "cityscapes" if is_sequence else "folder"
    start_ns = round(args.start_time * 1e9)
    if layout == "cityscapes":
        rate = args.rate or CITYSCAPES_RATE_HZ
        frames, chosen = cityscapes_frames(args.source, args.split, args.city, args.sequence, rate, start_ns)
        return frames, f"Cityscapes {chosen} at {rate:g} Hz"
    rate = args.rate or FOLDER_RATE_HZ
    return folder_frames(args.source, rate, start_ns), f"image folder {args.source} at {rate:g} Hz"


def main(argv: list[str] | None = None) -> int:
    """Entry point of icnet-make-bag; returns 0 on success and 1 (with the reason on stderr) on bad input."""
    args = build_parser().parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        build_parser().error(f"--rate must be positive; got {args.rate}")
    if not 1 <= args.jpeg_quality <= 100:
        build_parser().error(f"--jpeg-quality must be in 1..100; got {args.jpeg_quality}")
    options = BagOptions(storage=args.storage, topic=args.topic, camera_info_topic=args.camera_info_topic,
                         frame_id=args.frame_id, encoding=args.encoding, compressed=args.compressed,
                         jpeg_quality=args.jpeg_quality, overwrite=args.overwrite, progress=not args.quiet)
    try:
        frames, source = collect_frames(args)
        summary = write_image_bag(frames, args.output, options)
    except (MakeBagError, BagError, ImageConversionError) as error:
        print(f"icnet-make-bag: error: {error}", file=sys.stderr)
        return 1
    _print_summary(summary, source)
    return 0


def _print_summary(summary: dict[str, Any], source: str) -> None:
    height, width = summary["size"]
    print(f"wrote {summary['path']} ({summary['storage']}) from {source}")
    print(f"  {summary['frames']} frames of {width}x{height}, {summary['duration_s']:.3f} s")
    for topic, (msgtype, count) in summary["topics"].items():
        print(f"  {topic}: {count} x {msgtype}")


if __name__ == "__main__":
    sys.exit(main())
