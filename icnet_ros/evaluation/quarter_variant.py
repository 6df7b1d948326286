"""Would feeding sub4 from a quarter-size image pay? The measurement behind not building that variant.

The spatial-sparsity paper's figure feeds the low-resolution column from a quarter-size image through
the shared layers (stem, stage2, stage3_1), so the half-resolution path, and with it cff_24, F_24 and
the sub24 prediction, would be needed only in the regions that run at high resolution. Sparse
inference of that network at k regions therefore outputs sub124 in the k regions and the upsampled
**sub4** prediction everywhere else (the released wiring, model/sparsity.py, falls back on sub24).

    python -m icnet_ros.evaluation.quarter_variant --model icnet_ros/assets/camvid_keep0.25.safetensors \\
        --dataset camvid --data-root /data/CamVid --split test --threads 2 --json quarter_variant.json

Accuracy, estimated with the given model's own branches (the variant's low-resolution column would
see a quarter-size image instead of the half-size one's features, so its branches are assumed no
better): sub124 in k regions and sub4 elsewhere, the regions computed exactly as the shipped sparse
path computes them, chosen two ways: by the entropy of sub4 (what a selector without training does),
and by the labels themselves ("oracle": the regions where sub124 corrects most pixels of sub4),
which no selector, trained gate or not, can beat with these branches.

Cost of this design (exact context, one crop per region): conv multiply-adds (FlopCounterMode) and
CPU milliseconds (the BN-folded network, median of --repeats) of the shared layers on the
quarter-size image, the trunk and the sub4 classifier on the whole image, and per region, as one
batch of crops, the half-resolution path and cff_24 with the context that makes F_24 exact where
cff_124 reads it, then sub1, cff_124 and the classifier as the shipped sparse path runs them.
Gathering crops and composing the output are left out; crops of neighbouring regions overlap, so a
design that shares their context, or accepts inexact borders as the paper's does, could cost less.
Against the released network, dense, in the same process.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.data.datasets import build_dataset
from icnet_ros.evaluation.sparsity_table import (
    DEFAULT_FRACTIONS,
    accuracy_by_regions,
    add_run_options,
    conv_gmacs,
    cpu_ms,
    median_ms,
    parse_run_args,
    parse_size,
    region_counts,
)
from icnet_ros.inference.optimize import prepare_for_inference
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import ICNet, ModelConfig, halved, upsample
from icnet_ros.model.sparsity import (
    CELL,
    GATE_STRIDE,
    RegionGrid,
    Trunk,
    _conv_bn_valid,
    compose,
    region_entropy,
)
from icnet_ros.training.config import DATASETS

HALF_PATH_STRIDE = 8  # F_sub2 (1/16 of the input) is 8 half-resolution pixels per cell
SELECTORS = ("entropy", "oracle")


# --- accuracy --------------------------------------------------------------------------------------
def sub4_trunk(model: ICNet, image: torch.Tensor, region_size: int) -> Trunk:
    """The trunk of the quarter-size variant's sparse inference, from `model`'s own branches: the
    upsampled sub4 prediction as the coarse output, regions ranked by its entropy."""
    sizes = model._checked_sizes(image)
    grid = RegionGrid(int(image.shape[-2]), int(image.shape[-1]), region_size)
    f_sub2, f_sub4 = model.low_and_medium_features(image, sizes)
    f_24, _ = model.cff_24(f_sub4, f_sub2)  # what the computed regions' crops read (exact there)
    sub4 = model.cff_24.aux_classifier(upsample(f_sub4, sizes.sub2))
    scores = region_entropy(upsample(sub4, sizes.sub1), grid)
    return Trunk(grid, upsample(sub4, sizes.sub124), scores, torch.ones_like(scores), upsample(f_24, sizes.sub1))


def oracle_ranking(trunk: Trunk, fine: torch.Tensor, order: torch.Tensor, target: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    """Positions in `order` (whose fine logits are `fine`) sorted by how many labelled pixels computing
    that region corrects: the best choice of k regions for pixel accuracy, for every k at once."""
    size = tuple(target.shape)
    valid = target != ignore_index
    coarse_right = (upsample(trunk.coarse.float(), size).argmax(1)[0] == target) & valid
    gains = []
    for position in range(order.shape[1]):
        single = compose(trunk, order[:, position:position + 1], fine[position:position + 1]).logits
        right = (upsample(single.float(), size).argmax(1)[0] == target) & valid
        gains.append(int(right.sum()) - int(coarse_right.sum()))
    return torch.tensor(gains).argsort(descending=True, stable=True)


def variant_accuracy(model: ICNet, dataset, class_map, fractions, region_size: int,
                     selector: str = "entropy") -> dict:
    """{k: mIoU report}: sub124 in k regions (chosen by `selector`), sub4 elsewhere."""
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {list(SELECTORS)}, got {selector!r}")

    def by_labels(trunk, fine, order, target):
        return oracle_ranking(trunk, fine, order, target, class_map.ignore_index)

    result = accuracy_by_regions(model, dataset, class_map, fractions,
                                 lambda image: sub4_trunk(model, image, region_size),
                                 f"quarter-size variant, {selector}", by_labels if selector == "oracle" else None)
    return {**result, "selector": selector}


# --- cost ------------------------------------------------------------------------------------------
def receptive_field(model: ICNet) -> int:
    """Side, in half-resolution input pixels, of what one F_sub2 cell depends on (stem, stage2, stage3_1),
    read off the gradient of one cell (any weights: the dependence is structural)."""
    chain = torch.nn.Sequential(model.stem, model.stage2, model.stage3_1)
    probe = torch.randn(1, 3, 257, 257, requires_grad=True, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        out = chain(probe)
        centre = out.shape[-1] // 2
        out[0, :, centre, centre].sum().backward()
    rows = (probe.grad[0].abs().sum(0) > 0).nonzero()[:, 0]
    return int(rows.max() - rows.min() + 1)


@dataclass(frozen=True)
class RegionCrops:
    """Window sides, per region, of the variant's sparse path (the shipped path's for sub1 / cff_124)."""

    fuse: int  # F_124 cells (1/8): the region and one around it, for the corner-aligned upsample
    sub1: int  # F_sub1 cells: one more, for sub1's stride-2 chain
    up_24: int  # up(F_24) cells cff_124's dilated convolution reads (always even: fuse is)
    f_24: int  # F_24 cells (1/16) that upsample reads
    context_24: int  # up(F_sub4) cells cff_24's dilated convolution reads for them
    half_lead: int  # half-resolution pixels before the first F_24 cell's window (on the 8-pixel grid)
    half_image: int  # half-resolution pixels that make F_sub2 exact over f_24 cells

    @classmethod
    def for_model(cls, model: ICNet, region_size: int) -> RegionCrops:
        reach_124 = model.cff_124.dilated.conv.dilation[0] * (model.cff_124.dilated.conv.kernel_size[0] // 2)
        reach_24 = model.cff_24.dilated.conv.dilation[0] * (model.cff_24.dilated.conv.kernel_size[0] // 2)
        fuse = region_size // CELL + 2
        up_24 = fuse + 2 * reach_124
        f_24 = up_24 // 2 + 1
        margin = receptive_field(model) // 2  # a cell at 8j reads pixels 8j - margin .. 8j + margin
        # the crop must start on the 8-pixel grid, as the dense network's strides do
        lead = math.ceil(margin / HALF_PATH_STRIDE) * HALF_PATH_STRIDE
        return cls(fuse, fuse + 1, up_24, f_24, f_24 + 2 * reach_24, lead,
                   lead + (f_24 - 1) * HALF_PATH_STRIDE + margin + 1)

    @property
    def f_sub2_offset(self) -> int:
        """The first exact F_sub2 cell of a crop's output."""
        return self.half_lead // HALF_PATH_STRIDE


def variant_parts(model: ICNet, height: int, width: int, regions: int, crops: RegionCrops):
    """(whole image, per-region batch) callables computing what the sparse variant computes, on random
    inputs of the right shapes (the cost does not depend on values)."""
    def like(*shape):  # channels-last, as the engine runs the network
        return torch.randn(*shape).contiguous(memory_format=torch.channels_last)

    quarter = like(1, 3, halved(halved(height)), halved(halved(width)))
    k = max(regions, 1)
    half_crops = like(k, 3, crops.half_image, crops.half_image)
    sub4_context = like(k, model.conv5_4.conv.out_channels, crops.context_24, crops.context_24)
    sub1_crops = like(k, 3, crops.sub1 * CELL, crops.sub1 * CELL)
    sub4_size = (halved(halved(halved(halved(height)))), halved(halved(halved(halved(width)))))
    first, last = crops.f_sub2_offset, crops.f_sub2_offset + crops.f_24

    def whole():
        f = model.stage3_1(model.stage2(model.stem(quarter)))
        f_sub4 = model.conv5_4(model.pyramid(model.stage5(model.stage4(model.stage3_rest(f)))))
        return model.cff_24.aux_classifier(upsample(f_sub4, sub4_size))

    def per_region():
        f_sub2 = model.stage3_1(model.stage2(model.stem(half_crops)))[..., first:last, first:last]
        f_24 = F.relu(_conv_bn_valid(model.cff_24.dilated, sub4_context) + model.cff_24.lateral(f_sub2))
        up = upsample(f_24, (2 * crops.f_24, 2 * crops.f_24))[..., :crops.up_24, :crops.up_24]
        f_sub1 = model.sub1(sub1_crops)[..., 1:, 1:]
        f_124 = F.relu(_conv_bn_valid(model.cff_124.dilated, up) + model.cff_124.lateral(f_sub1))
        return model.classifier(f_124)

    return whole, per_region


def dense_cost(config, height: int, width: int, repeats: int) -> dict:
    """The released network's conv GMACs and CPU ms, dense, at this size."""
    source = ICNet(config).eval()
    folded = prepare_for_inference(source, torch.device("cpu"), True)
    return {"dense_gmacs": conv_gmacs(source, height, width, None),
            "dense_cpu_ms": cpu_ms(folded, height, width, None, repeats)}


def variant_cost(config, height: int, width: int, regions: int, region_size: int, repeats: int,
                 dense: dict) -> dict:
    """GMACs and CPU ms of the variant's sparse inference at `regions`, against `dense` (dense_cost)."""
    source = ICNet(config).eval()
    crops = RegionCrops.for_model(source, region_size)
    folded = prepare_for_inference(source, torch.device("cpu"), True)
    parts = slice(0, 2 if regions else 1)  # no region: the whole-image part only
    counter = FlopCounterMode(display=False)  # counted on the unfolded network: its convolutions are aten's
    with torch.no_grad(), counter:
        for part in variant_parts(source, height, width, regions, crops)[parts]:
            part()
    gmacs = counter.get_flop_counts().get("Global", {}).get(torch.ops.aten.convolution, 0) / 2e9
    ms = sum(median_ms(part, repeats) for part in variant_parts(folded, height, width, regions, crops)[parts])
    return {"keep_rate": config.keep_rate, "size": f"{height}x{width}", "regions": regions,
            "of": RegionGrid(height, width, region_size).count, "half_crop_px": crops.half_image,
            "gmacs": gmacs, "cpu_ms": ms, **dense, "mac_ratio": dense["dense_gmacs"] / gmacs,
            "time_ratio": dense["dense_cpu_ms"] / ms}


# --- the command -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icnet_ros.evaluation.quarter_variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint with auxiliary heads")
    parser.add_argument("--dataset", choices=DATASETS)
    parser.add_argument("--data-root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--region-size", type=int, default=256)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--selectors", nargs="+", choices=SELECTORS, default=list(SELECTORS),
                        help="how the accuracy rows choose regions: sub4's entropy, or the labels (oracle)")
    parser.add_argument("--size", type=parse_size, default=(1024, 2048), help="network input size of the cost rows (HxW)")
    parser.add_argument("--keep-rates", type=float, nargs="*", default=[0.5, 0.25],
                        help="keep rates of the cost rows (none: accuracy only)")
    add_run_options(parser)
    args = parse_run_args(parser, argv)
    model = load_model(args.model).eval()
    if args.region_size % GATE_STRIDE:
        parser.error(f"--region-size must be a multiple of {GATE_STRIDE}, got {args.region_size}")
    report = {"model": str(args.model), "threads": torch.get_num_threads(), "region_size": args.region_size}
    if args.dataset:
        class_map = load_class_map(model.config.class_map)
        dataset = build_dataset(args.dataset, args.data_root, args.split, class_map)
        report["accuracy"] = {}
        for selector in args.selectors:
            result = report["accuracy"][selector] = variant_accuracy(model, dataset, class_map, args.fractions,
                                                                   args.region_size, selector)
            rows, cols = result["regions_grid"]
            print(f"sub124 in k regions chosen by {selector}, sub4 elsewhere, mIoU: " + ", ".join(
                f"{k}/{rows * cols}: {100 * r['miou']:.1f}" for k, r in result["by_regions"].items()), flush=True)
    height, width = args.size
    grid = RegionGrid(height, width, args.region_size)
    report["cost"] = []
    print("| keep | size | regions | GMACs | CPU ms | dense GMACs | dense CPU ms | fewer MACs | less time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for keep in args.keep_rates:
        config = ModelConfig(num_classes=model.config.num_classes, keep_rate=keep, class_map=model.config.class_map)
        dense = dense_cost(config, height, width, args.repeats)
        for k in region_counts(grid, args.fractions):
            row = variant_cost(config, height, width, k, args.region_size, args.repeats, dense)
            report["cost"].append(row)
            print(f"| {keep} | {row['size']} | {k}/{row['of']} | {row['gmacs']:.2f} | {row['cpu_ms']:.0f} | "
                  f"{row['dense_gmacs']:.2f} | {row['dense_cpu_ms']:.0f} | {row['mac_ratio']:.2f}x | "
                  f"{row['time_ratio']:.2f}x |", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
