"""`icnet-evaluate` / `ros2 run icnet_ros evaluate`: mIoU, per-class IoU and pixel accuracy per branch.

    icnet-evaluate runs/camvid/model.safetensors --dataset camvid --data-root ../shared/data/CamVid \\
        --split test --json camvid_test.json
    icnet-evaluate model.safetensors --dataset cityscapes --data-root /data/cityscapes --split val \\
        --predictions results/   # official label-id PNGs, for cityscapesScripts or the test server
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.data.datasets import build_dataset
from icnet_ros.evaluation.evaluate import cityscapes_prediction_writer, evaluate
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import BRANCHES
from icnet_ros.training.config import DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=list(BRANCHES))
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="resize images to this size for the network (labels stay at full size)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--predictions", type=Path,
                        help="Cityscapes: write sub124 predictions as official label-id PNGs here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip unreadable samples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.checkpoint, map_location=args.device)
        class_map = load_class_map(model.config.class_map)
        dataset = build_dataset(args.dataset, args.data_root, args.split, class_map, skip_bad=args.skip_bad)
    except (ValueError, FileNotFoundError) as error:
        print(f"icnet-evaluate: {error}", file=sys.stderr)
        return 1
    writer = None
    if args.predictions is not None:
        writer = cityscapes_prediction_writer(args.predictions, class_map, "sub124")
    report = evaluate(model, dataset, class_map, args.device, args.branches, args.image_size, writer)
    report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "split": args.split,
              "images": len(dataset), "skipped": [path for path, _ in dataset.skipped], "branches": report}
    print(format_report(report, class_map.names))
    for path, reason in dataset.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} bad sample(s) of {len(dataset)}", file=sys.stderr)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def format_report(report: dict, class_names) -> str:
    """A Markdown table: one row per class, one column per branch."""
    branches = list(report["branches"])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"{report['dataset']} {report['split']} ({report['images']} images)", "",
             "| class | " + " | ".join(branches) + " |", "|---" * (len(branches) + 1) + "|"]
    for name in class_names:
        lines.append(f"| {name} | " + " | ".join(pct(report["branches"][b]["iou"][name]) for b in branches) + " |")
    for key in ("miou", "pixel_acc"):
        lines.append(f"| **{key}** | " + " | ".join(pct(report["branches"][b][key]) for b in branches) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
