"""`icnet-evaluate` / `ros2 run icnet_ros evaluate`: mIoU, per-class IoU and pixel accuracy per branch.

    icnet-evaluate runs/camvid/model.safetensors --dataset camvid --data-root /data/CamVid \\
        --split test --json camvid_test.json
    icnet-evaluate model.safetensors --dataset cityscapes --data-root /data/cityscapes --split val \\
        --predictions results/   # official label-id PNGs, for cityscapesScripts or the test server
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import available_label_maps, load_class_map, load_label_map
from icnet_ros.data.datasets import LAYOUT_CLASS_MAPS, DatasetError, build_dataset
from icnet_ros.evaluation.evaluate import SparseRegions, cityscapes_prediction_writer, evaluate
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import BRANCHES
from icnet_ros.model.preprocess import INPUT_SIZE_HELP, parse_input_size
from icnet_ros.model.sparsity import resolve_selector
from icnet_ros.training.config import DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=list(BRANCHES),
                        help="branches to score (those the model has; default: all)")
    parser.add_argument("--input-size", default="checkpoint",
                        help=f"network input size: {INPUT_SIZE_HELP}; labels are always scored at full size")
    parser.add_argument("--label-map", choices=available_label_maps(),
                        help="score a model on another data set's labels, mapped through "
                             "config/label_maps/<name>.yaml (e.g. a CamVid model on Cityscapes frames)")
    parser.add_argument("--split-bound", choices=available_label_maps(), metavar="LABEL_MAP",
                        help="also report the scores had every set of this label map (from the model's classes "
                             "to coarser ones, e.g. cityscapes_to_camvid) been split perfectly: how far better "
                             "splits alone could take a model trained on the coarser labels")
    parser.add_argument("--high-res-regions", type=int, default=None,
                        help="score sub124 with the high-resolution path in this many regions per image only "
                             "(spatial sparsity; 0: sub24 everywhere)")
    parser.add_argument("--region-selector", choices=("auto", "gate", "entropy"), default="auto")
    parser.add_argument("--region-size", type=int, default=256, help="entropy selector's region side (pixels)")
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
        input_size = parse_input_size(args.input_size, model.config.input_size)
        dataset, scored_map, prediction_lut = load_scored_dataset(args, class_map)
        split_sets = split_bound_sets(args.split_bound, scored_map) if args.split_bound else None
        if args.high_res_regions is not None:
            resolve_selector(model, args.region_selector)  # a gate asked of a network without one, say
    except (ValueError, FileNotFoundError) as error:
        print(f"icnet-evaluate: {error}", file=sys.stderr)
        return 1
    writer = None
    if args.predictions is not None:
        writer = cityscapes_prediction_writer(args.predictions, class_map, "sub124")
    try:
        sparse = None if args.high_res_regions is None else SparseRegions(args.high_res_regions, args.region_selector,
                                                                         args.region_size)
        report = evaluate(model, dataset, scored_map, args.device, args.branches, input_size, writer,
                          prediction_lut=prediction_lut, sparse=sparse, split_sets=split_sets)
    except DatasetError as error:
        hint = "" if args.label_map else f" (labels of another class map? --label-map takes {available_label_maps()})"
        print(f"icnet-evaluate: {error}{hint}", file=sys.stderr)
        return 1
    except ValueError as error:  # a setting the model cannot run (sparse regions on it, say)
        print(f"icnet-evaluate: {error}", file=sys.stderr)
        return 1
    report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "split": args.split,
              "label_map": args.label_map, "input_size": args.input_size, "images": len(dataset),
              "high_res_regions": args.high_res_regions,
              "skipped": [path for path, _ in dataset.skipped], "branches": report}
    print(format_report(report, scored_map.names))
    for path, reason in dataset.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} bad sample(s) of {len(dataset)}", file=sys.stderr)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def load_scored_dataset(args, class_map):
    """(dataset, class map scored, lookup table from the model's classes to it or None).

    With --label-map SOURCE_to_TARGET everything is scored in TARGET's classes: labels of the
    SOURCE class map are relabelled (a CamVid model on Cityscapes frames), and so are the
    predictions of a SOURCE model (a Cityscapes model on CamVid frames, or on Cityscapes frames
    scored as CamVid's classes).
    """
    if args.label_map is None:
        return build_dataset(args.dataset, args.data_root, args.split, class_map, skip_bad=args.skip_bad), class_map, None
    label_map = load_label_map(args.label_map)
    source, target = label_map.source, label_map.target
    labels_in = LAYOUT_CLASS_MAPS[args.dataset]
    if class_map.name not in (source.name, target.name) or labels_in not in (source.name, target.name):
        raise ValueError(f"label map {args.label_map} maps {source.name!r} to {target.name!r} classes, but the model "
                         f"predicts {class_map.name!r} and {args.dataset} is labelled in {labels_in!r}; pick a label "
                         f"map between those two")
    if class_map.name == target.name and labels_in == target.name:
        raise ValueError(f"the model and {args.dataset} both use {target.name!r} classes: no --label-map is needed")
    relabel = label_map.lut if labels_in == source.name else None
    dataset = build_dataset(args.dataset, args.data_root, args.split, source if relabel is not None else target,
                            skip_bad=args.skip_bad, relabel=relabel)
    predictions = label_map.prediction_lut("scoring predictions") if class_map.name == source.name else None
    return dataset, target, predictions


def split_bound_sets(name: str, scored_map) -> np.ndarray:
    """Each scored class's set under label map `name`, which must map the scored classes."""
    label_map = load_label_map(name)
    if label_map.source.name != scored_map.name:
        raise ValueError(f"--split-bound {name} splits {label_map.source.name!r} classes into sets, but the "
                         f"scores are in {scored_map.name!r} classes; drop --label-map to score in the model's "
                         f"own classes")
    return label_map.source_sets()


def format_report(report: dict, class_names) -> str:
    """A Markdown table: one row per class, one column per branch."""
    branches = list(report["branches"])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"{report['dataset']} {report['split']} ({report['images']} images)", "",
             "| class | " + " | ".join(branches) + " |", "|---" * (len(branches) + 1) + "|"]
    for name in class_names:
        lines.append(f"| {name} | " + " | ".join(pct(report["branches"][b]["iou"][name]) for b in branches) + " |")
    for key in ("miou", "miou_labelled", "pixel_acc"):
        lines.append(f"| **{key}** | " + " | ".join(pct(report["branches"][b][key]) for b in branches) + " |")
    if all("split_bound" in report["branches"][b] for b in branches):
        for key in ("miou", "miou_labelled"):
            lines.append(f"| **{key}, every set split perfectly** | "
                         + " | ".join(pct(report["branches"][b]["split_bound"][key]) for b in branches) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
