"""The spatial-sparsity table (like Table 3 of Wu, Shen, van den Hengel): k of N regions -> accuracy,
conv multiply-adds and CPU time, for a gated model and the trivial entropy choice, in one run.

    python -m icnet_ros.evaluation.sparsity_table --gated runs/camvid_sparse_cpu/model.safetensors \\
        --baseline icnet_ros/assets/camvid_keep0.25.safetensors --dataset camvid --data-root /data/CamVid \\
        --split test --json sparsity.json

Accuracy: every image runs the low-resolution column once and the high-resolution path once per
region (region_fine_logits in score order); the result for k regions then composes the k best,
which is exactly what sparse_logits computes for that k, so all k cost one pass over the data.
The rows: the gated model with its gate, the baseline (no gate) with regions chosen by the entropy
of its sub24 prediction, and the baseline dense (the released network).

Cost: conv multiply-adds counted by PyTorch's FlopCounterMode on the meta device (shapes only), and
CPU milliseconds of the BN-folded network's forward (median of --repeats after a warm-up), for
networks of each --keep-rates at each --sizes; k = 0 is sub24 alone. Weights do not change the
cost of a fixed k, so the timed networks are fresh ones of the gated model's configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.data.datasets import build_dataset
from icnet_ros.evaluation.metrics import ConfusionMatrix
from icnet_ros.inference.optimize import prepare_for_inference
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import ICNet, upsample
from icnet_ros.model.preprocess import image_to_input, network_size
from icnet_ros.model.sparsity import RegionGrid, compose, region_fine_logits, run_trunk, sparse_logits
from icnet_ros.training.config import DATASETS

DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0)


def region_counts(grid: RegionGrid, fractions) -> list[int]:
    return sorted({grid.regions_for(f) for f in fractions}, reverse=True)


def network_input(model: ICNet, image: np.ndarray) -> torch.Tensor:
    """The image as the network sees it: normalized, at the model's input size (as icnet-evaluate)."""
    return image_to_input(image, model.config, "cpu", size=network_size(image.shape[:2], model.config.input_size))


def accuracy(model: ICNet, dataset, class_map, selector: str, fractions, region_size: int) -> dict:
    """{k: mIoU report} over the dataset, k regions per image chosen by `selector`."""
    return accuracy_by_regions(model, dataset, class_map, fractions,
                               lambda image: run_trunk(model, image, selector, region_size), f"sparsity {selector}")


@torch.inference_mode()
def accuracy_by_regions(model: ICNet, dataset, class_map, fractions, trunk_of, description: str,
                        rank=None) -> dict:
    """{k: mIoU report}: each image's trunk from trunk_of(image), the high-resolution path run once per
    region (region_fine_logits in score order), and for every k the k best composed, which is exactly
    what sparse_logits computes for that k. rank(trunk, fine, order, target), if given, reorders the
    regions (a permutation of positions in `order`) before composing."""
    matrices: dict[int, ConfusionMatrix] = {}
    grid_shape = None
    for index in tqdm(range(len(dataset)), desc=description, leave=False):
        sample = dataset[index]
        height, width = sample["image"].shape[:2]
        image = network_input(model, sample["image"])
        trunk = trunk_of(image)
        grid_shape = (trunk.grid.rows, trunk.grid.cols)
        order = trunk.scores.flatten(1).argsort(dim=1, descending=True)
        fine = region_fine_logits(model, image, trunk, order)  # every region, best first
        target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
        if rank is not None:
            ranking = rank(trunk, fine, order, target)
            order, fine = order[:, ranking], fine[ranking]
        for k in region_counts(trunk.grid, fractions):
            logits = compose(trunk, order[:, :k], fine[:k]).logits
            labels = upsample(logits.float(), (height, width)).argmax(1)[0]
            matrix = matrices.setdefault(k, ConfusionMatrix(class_map.num_classes, class_map.ignore_index))
            matrix.update(target, labels)
    return {"regions_grid": grid_shape,
            "by_regions": {k: matrix.report(class_map.names) for k, matrix in matrices.items()}}


@torch.inference_mode()
def dense_accuracy(model: ICNet, dataset, class_map) -> dict:
    matrix = ConfusionMatrix(class_map.num_classes, class_map.ignore_index)
    for index in tqdm(range(len(dataset)), desc="dense", leave=False):
        sample = dataset[index]
        height, width = sample["image"].shape[:2]
        image = network_input(model, sample["image"])
        labels = upsample(model.branch_logits(image, "sub124").float(), (height, width)).argmax(1)[0]
        matrix.update(torch.from_numpy(np.asarray(sample["label"]).astype(np.int64)), labels)
    return matrix.report(class_map.names)


def conv_gmacs(model: ICNet, height: int, width: int, regions: int | None) -> float:
    """Conv GMACs of one forward (regions None: the dense released path)."""
    with torch.device("meta"):
        meta = ICNet(model.config).eval()
        image = torch.empty(1, 3, height, width)
    meta.check_finite = False
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run(meta, image, regions)
    return counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0) / 2e9


def run(model: ICNet, image: torch.Tensor, regions: int | None):
    if regions is None:
        return _released(model, image)
    return sparse_logits(model, image, regions, "gate").logits


def _released(model: ICNet, image: torch.Tensor) -> torch.Tensor:
    """The released network's sub124 path (the gate, if any, left out): the dense reference cost."""
    gate, model.region_gate = model.region_gate, None
    try:
        return model.branch_logits(image, "sub124")
    finally:
        model.region_gate = gate


def cpu_ms(model: ICNet, height: int, width: int, regions: int | None, repeats: int) -> float:
    image = torch.randn(1, 3, height, width).contiguous(memory_format=torch.channels_last)
    return median_ms(lambda: run(model, image, regions), repeats)


@torch.inference_mode()
def median_ms(function, repeats: int) -> float:
    """Median wall milliseconds of function() over `repeats` calls, after one warm-up call."""
    function()  # warm-up: oneDNN primitives for these shapes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cost_rows(config, sizes, keep_rates, fractions, repeats: int) -> list[dict]:
    rows = []
    for keep in keep_rates:
        source = ICNet(replace(config, keep_rate=keep)).eval()
        folded = prepare_for_inference(source, torch.device("cpu"), True)
        for height, width in sizes:
            grid = RegionGrid(height, width, config.gate_region_size)
            dense = {"gmacs": conv_gmacs(source, height, width, None),
                     "cpu_ms": cpu_ms(folded, height, width, None, repeats)}
            rows.append({"keep_rate": keep, "size": f"{height}x{width}", "regions": "dense", "of": grid.count,
                         **dense, "mac_ratio": 1.0, "time_ratio": 1.0})
            for k in region_counts(grid, fractions):
                gmacs, ms = conv_gmacs(source, height, width, k), cpu_ms(folded, height, width, k, repeats)
                rows.append({"keep_rate": keep, "size": f"{height}x{width}", "regions": k, "of": grid.count,
                             "gmacs": gmacs, "cpu_ms": ms, "mac_ratio": dense["gmacs"] / gmacs,
                             "time_ratio": dense["cpu_ms"] / ms})
            print(format_cost(rows[-len(region_counts(grid, fractions)) - 1:]), flush=True)
    return rows


def format_cost(rows) -> str:
    lines = ["| keep | size | regions | GMACs | CPU ms | fewer MACs | less time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        regions = r["regions"] if r["regions"] == "dense" else f"{r['regions']}/{r['of']}"
        lines.append(f"| {r['keep_rate']} | {r['size']} | {regions} | {r['gmacs']:.2f} | {r['cpu_ms']:.0f} | "
                     f"{r['mac_ratio']:.2f}x | {r['time_ratio']:.2f}x |")
    return "\n".join(lines)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--repeats, --threads and --json, which every cost table here takes."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--json", type=Path)


def parse_run_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The parsed arguments, with --threads applied to PyTorch before anything is timed."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W), for argparse."""
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"a size is HEIGHTxWIDTH in pixels, e.g. 1024x2048; got {text!r}")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icnet_ros.evaluation.sparsity_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gated", type=Path, required=True, help="a checkpoint with a region gate")
    parser.add_argument("--baseline", type=Path, help="the same model without a gate (entropy choice, dense)")
    parser.add_argument("--dataset", choices=DATASETS)
    parser.add_argument("--data-root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="k as fractions of the regions N (1 0.5 0.25 0.125 0: N, N/2, N/4, N/8, sub24 only)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(1024, 2048), (720, 960)],
                        help="network input sizes timed (HxW)")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.25, 0.5])
    add_run_options(parser)
    args = parse_run_args(parser, argv)
    gated = load_model(args.gated)
    if not gated.config.gate_region_size:
        print(f"error: {args.gated} has no region gate (gate_region_size 0)", file=sys.stderr)
        return 1
    report = {"gated": str(args.gated), "baseline": str(args.baseline) if args.baseline else None,
              "threads": torch.get_num_threads(), "fractions": args.fractions}
    if args.dataset:
        class_map = load_class_map(gated.config.class_map)
        dataset = build_dataset(args.dataset, args.data_root, args.split, class_map)
        report["images"] = len(dataset)
        report["gate"] = accuracy(gated, dataset, class_map, "gate", args.fractions, 0)
        print_accuracy("gate (trained)", report["gate"])
        if args.baseline:
            baseline = load_model(args.baseline)
            report["entropy"] = accuracy(baseline, dataset, class_map, "entropy", args.fractions,
                                         gated.config.gate_region_size)
            print_accuracy("entropy (no training)", report["entropy"])
            report["baseline_dense"] = dense_accuracy(baseline, dataset, class_map)
            print(f"baseline dense mIoU {100 * report['baseline_dense']['miou']:.1f}", flush=True)
    report["cost"] = cost_rows(gated.config, args.sizes, args.keep_rates,
                               args.fractions, args.repeats)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def print_accuracy(name: str, result: dict) -> None:
    rows, cols = result["regions_grid"]
    cells = ", ".join(f"{k}/{rows * cols}: {100 * r['miou']:.1f}" for k, r in result["by_regions"].items())
    print(f"{name} mIoU by regions computed: {cells}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
