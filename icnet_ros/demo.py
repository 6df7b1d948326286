"""icnet-demo (`ros2 run icnet_ros demo`): see the package work, on a synthetic drive or on your own photos.

No dataset, GPU or ROS needed. Without --images it segments the embedded drive with the bundled
demo weights: a synthetic street sequence (51 frames, 3 s at 17 Hz, 512x1024) rendered
deterministically on first use into a cache folder, with its exact labels. It writes label, color
and overlay PNGs, an overlay video and a timing summary, measures the mIoU against the drive's
labels, and prints where everything is. With --images it segments a folder of real street photos
with a bundled real-street model and writes camera | overlay pictures with a legend:

    icnet-demo                         # results in ./icnet_demo
    icnet-demo --images my_dashcam/    # real photos, the bundled Cityscapes model (19 classes)
    icnet-demo --images my_dashcam/ --class-map camvid   # the bundled CamVid model (11 classes)
    icnet-demo --out /tmp/demo --device cuda
    icnet-demo --bag-path              # print (and build on first use) the drive as a rosbag2

Which model for what: the demo weights know synthetic scenes only (they show the pipeline); for a
real camera use the bundled Cityscapes model (19 classes, the default), the bundled CamVid model
(11 classes), or the authors' Cityscapes weights converted with icnet-import (README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.model.checkpoint import CheckpointError
from icnet_ros.model.registry import BUNDLED_BY_NAME, DEMO_DATASET, bundled_weights, demo_weights

PHOTO_MODELS = ("cityscapes", "camvid")  # the bundled models that know real streets

DRIVE_VERSION = 1  # bump when the drive's recipe changes, so stale caches are not reused
DRIVE_SEED = 99_991  # a street no training scene of config/train/demo.yaml uses
DRIVE_FRAMES = 51
DRIVE_HEIGHT, DRIVE_WIDTH = 512, 1024
DRIVE_RATE_HZ = 17.0  # Cityscapes' frame rate
DRIVE_CITY = "demo"
DEMO_TOPIC = "/camera/image_raw"
CACHE_ENV_VAR = "ICNET_ROS_CACHE"


def cache_dir() -> Path:
    """$ICNET_ROS_CACHE, else $XDG_CACHE_HOME/icnet_ros, else ~/.cache/icnet_ros."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "icnet_ros"


def drive_root() -> Path:
    return cache_dir() / f"demo_drive_v{DRIVE_VERSION}"


def drive_images(root: Path | None = None) -> Path:
    """Folder of the drive's frames, in the Cityscapes leftImg8bit_sequence layout."""
    return (root or drive_root()) / "leftImg8bit_sequence" / "demo" / DRIVE_CITY


def drive_labels(root: Path | None = None) -> Path:
    """Folder of the drive's exact labels (Cityscapes train ids), one PNG per frame."""
    return (root or drive_root()) / "labels"


def frame_name(index: int) -> str:
    return f"{DRIVE_CITY}_000000_{index:06d}_leftImg8bit"


def ensure_demo_drive(root: Path | None = None) -> Path:
    """The drive's root folder, rendered now if it is not complete yet (atomically: a half-written
    drive is never taken for a finished one)."""
    root = root or drive_root()
    if (root / "COMPLETE").is_file():
        return root
    from icnet_ros.data.synthetic import Scene, write_png

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        class_map = load_class_map(DEMO_DATASET)
        scene = Scene(DRIVE_SEED, DRIVE_HEIGHT, DRIVE_WIDTH)
        drive_images(staging).mkdir(parents=True)
        drive_labels(staging).mkdir(parents=True)
        for index in range(DRIVE_FRAMES):
            rgb, labels = scene.render(index, class_map)
            write_png(drive_images(staging) / f"{frame_name(index)}.png", rgb[..., ::-1])
            write_png(drive_labels(staging) / f"{frame_name(index)}.png", labels)
        (staging / "COMPLETE").write_text(f"demo drive v{DRIVE_VERSION}: {DRIVE_FRAMES} frames\n")
        if root.exists():  # an incomplete leftover of an interrupted run
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_demo_bag(storage: str = "mcap", root: Path | None = None) -> Path:
    """The drive as a rosbag2 of sensor_msgs/Image on /camera/image_raw at 17 Hz, built on first use."""
    from icnet_ros.bags.make_bag import BagOptions, cityscapes_frames, write_image_bag

    root = ensure_demo_drive(root)
    bag = root / f"bag_{storage}"
    if not (bag / "metadata.yaml").is_file():
        frames, _ = cityscapes_frames(root, "demo", DRIVE_CITY, 0, DRIVE_RATE_HZ, 1_700_000_000 * 10**9)
        write_image_bag(frames, bag, BagOptions(storage=storage, topic=DEMO_TOPIC, progress=False,
                                                overwrite=True))
    return bag


def drive_miou(predictions: Path, labels: Path) -> dict[str, Any]:
    """mIoU and per-class IoU of the label PNGs in `predictions` against the drive's exact labels."""
    import torch

    from icnet_ros.evaluation.metrics import ConfusionMatrix

    class_map = load_class_map(DEMO_DATASET)
    matrix = ConfusionMatrix(class_map.num_classes, class_map.ignore_index)
    for truth_path in sorted(labels.glob("*.png")):
        predicted = cv2.imread(str(predictions / truth_path.name), cv2.IMREAD_UNCHANGED)
        if predicted is None:
            continue
        truth = cv2.imread(str(truth_path), cv2.IMREAD_UNCHANGED)
        matrix.update(torch.from_numpy(truth.astype(np.int64)), torch.from_numpy(predicted.astype(np.int64)))
    return matrix.report(class_map.names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("icnet_demo"), help="output folder (default: ./icnet_demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--branch", choices=("sub124", "sub24", "sub4"), default="sub124")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--bag-path", action="store_true",
                        help="only print the path of the drive as a rosbag2 (building it on first use)")
    parser.add_argument("--images", type=Path,
                        help="a folder of your own street photos: segment them with a bundled real-street model")
    parser.add_argument("--class-map", choices=PHOTO_MODELS, default=PHOTO_MODELS[0],
                        help="with --images: the bundled model by the classes it predicts: cityscapes (19 classes, "
                             "default) or camvid (11 classes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CheckpointError as error:  # a bundled model missing from a broken installation
        print(f"icnet-demo: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.bag_path:
        print(ensure_demo_bag())
        return 0
    from icnet_ros.inference import offline

    if args.images is not None:
        return _segment_photos(args, offline)
    start = time.perf_counter()
    print(f"demo drive: {DRIVE_FRAMES} synthetic frames at {DRIVE_HEIGHT}x{DRIVE_WIDTH} "
          f"(rendered once into {drive_root()})", flush=True)
    root = ensure_demo_drive()
    out = args.out
    summary_path = out / "timing.json"
    segment_args = [str(demo_weights()), str(drive_images(root)), "--out", str(out), "--overlay",
                    "--overlay-video", str(out / "overlay.mp4"), "--fps", f"{DRIVE_RATE_HZ:g}",
                    "--device", args.device, "--branch", args.branch, "--summary-json", str(summary_path)]
    if args.threads is not None:
        segment_args += ["--threads", str(args.threads)]
    status = offline.main(segment_args)
    if status != 0:
        return status
    accuracy = drive_miou(out / "labels", drive_labels(root))
    record = json.loads(summary_path.read_text())
    record["drive_miou"] = accuracy
    record["wall_time_s"] = time.perf_counter() - start
    atomic_write_text(summary_path, json.dumps(record, indent=2) + "\n")
    _print_results(out, accuracy, record)
    return 0


def _print_results(out: Path, accuracy: dict[str, Any], record: dict[str, Any]) -> None:
    miou = accuracy.get("miou")
    print(f"mIoU on the drive's exact labels ({record['branch']}): "
          f"{'n/a' if miou is None else f'{100 * miou:.1f}'}")
    print(f"labels  (class ids): {out / 'labels'}")
    print(f"color   (palette):   {out / 'color'}")
    print(f"overlay (images):    {out / 'overlay'}")
    print(f"overlay (video):     {out / 'overlay.mp4'}")
    print(f"timing summary:      {out / 'timing.json'}")
    print(f"done in {record['wall_time_s']:.1f} s. These weights know synthetic scenes only: for a real camera "
          "use a bundled real-street model (icnet-demo --images <photos>; in ROS the default dataset:=cityscapes, "
          "or dataset:=camvid) or the authors' Cityscapes weights through icnet-import (README.md).")


def _segment_photos(args: argparse.Namespace, offline) -> int:
    """Real photos -> camera | overlay pictures, with the bundled model of --class-map at its training scale.

    icnet-segment --side-by-side composes them (icnet_ros.visualization.side_by_side): the two panels
    over a legend of the classes found in each photo, names and colors from the model's class map."""
    model = BUNDLED_BY_NAME[args.class_map]
    segment_args = [str(bundled_weights(model)), str(args.images), "--out", str(args.out), "--side-by-side",
                    "--no-labels", "--device", args.device, "--branch", args.branch]
    if args.threads is not None:
        segment_args += ["--threads", str(args.threads)]
    status = offline.main(segment_args)
    if status == 0:
        classes = ", ".join(load_class_map(model.dataset).names)
        print(f"camera | overlay pictures, each with a legend of the classes it shows: {args.out / 'side_by_side'} "
              f"(bundled {model.name} model: {classes})")
    return status


if __name__ == "__main__":
    sys.exit(main())
