"""Would feeding sub4 from a quarter-size image pay? The measurement behind not building that variant.

The spatial-sparsity paper's figure feeds the low-resolution column from a quarter-size image through
the shared layers (stem, stage2, stage3_1), so the half-resolution path, and with it cff_24, F_24 and
the sub24 prediction, would be needed only in the regions that run at high resolution. Sparse
inference of that network at k regions therefore outputs sub124 in the k regions and the upsampled
**sub4** prediction everywhere else (the released wiring, model/sparsity.py, falls back on sub24).

    python -m icnet_ros.evaluation.quarter_variant --model icnet_ros/assets/camvid_keep0.25.safetensors \\
        --dataset camvid --data-root /data/CamVid --split test --threads 2 --json quarter_variant.json

Accuracy, an upper bound: the composition above computed with the given model's own branches (sub124
in the k regions of highest sub4 entropy, sub4 elsewhere; the regions exactly as the shipped sparse
path computes them). The variant's branches cannot be expected to do better: its low-resolution
column sees a quarter-size image instead of the half-size one's features.

Cost, a lower bound: conv multiply-adds (FlopCounterMode) and CPU milliseconds (the BN-folded
network, median of --repeats) of what the variant must compute: the shared layers on the quarter-size
image, the trunk and the sub4 classifier on the whole image, and per region, as one batch of crops,
the half-resolution path and cff_24 with just the context that makes F_24 exact where cff_124 reads
it, then sub1, cff_124 and the classifier as the shipped sparse path runs them. Gathering crops and
composing the output are left out. Against the released network, dense, in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.data.datasets import build_dataset
from icnet_ros.evaluation.metrics import ConfusionMatrix
from icnet_ros.evaluation.sparsity_table import (
    DEFAULT_FRACTIONS,
    conv_gmacs,
    cpu_ms,
    network_input,
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
    compose,
    region_entropy,
    region_fine_logits,
    run_trunk,
)
from icnet_ros.training.config import DATASETS

HALF_PATH_STRIDE = 8  # F_sub2 (1/16 of the input) is 8 half-resolution pixels per cell


# --- accuracy --------------------------------------------------------------------------------------
def sub4_trunk(model: ICNet, image: torch.Tensor, region_size: int) -> Trunk:
    """The trunk of the quarter-size variant's sparse inference, from `model`'s own branches: the
    upsampled sub4 prediction as the coarse output, regions ranked by its entropy."""
    sizes = model._checked_sizes(image)
    shipped = run_trunk(model, image, "entropy", region_size)  # F_24 for the computed regions' crops
    _, f_sub4 = model.low_and_medium_features(image, sizes)
    sub4 = model.cff_24.aux_classifier(upsample(f_sub4, sizes.sub2))
    scores = region_entropy(upsample(sub4, sizes.sub1), shipped.grid)
    return Trunk(shipped.grid, upsample(sub4, sizes.sub124), scores, torch.ones_like(scores), shipped.f_24_up)


@torch.inference_mode()
def bound_accuracy(model: ICNet, dataset, class_map, fractions, region_size: int) -> dict:
    """{k: mIoU report}: sub124 in the k regions of highest sub4 entropy, sub4 elsewhere."""
    matrices: dict[int, ConfusionMatrix] = {}
    grid_shape = None
    for index in tqdm(range(len(dataset)), desc="quarter-size variant bound", leave=False):
        sample = dataset[index]
        height, width = sample["image"].shape[:2]
        image = network_input(model, sample["image"])
        trunk = sub4_trunk(model, image, region_size)
        grid_shape = (trunk.grid.rows, trunk.grid.cols)
        order = trunk.scores.flatten(1).argsort(dim=1, descending=True)
        fine = region_fine_logits(model, image, trunk, order)
        target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
        for k in region_counts(trunk.grid, fractions):
            labels = upsample(compose(trunk, order[:, :k], fine[:k]).logits.float(), (height, width)).argmax(1)[0]
            matrices.setdefault(k, ConfusionMatrix(class_map.num_classes, class_map.ignore_index)).update(
                target, labels)
    return {"regions_grid": grid_shape,
            "by_regions": {k: matrix.report(class_map.names) for k, matrix in matrices.items()}}


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
    up_24: int  # up(F_24) cells cff_124's dilated convolution reads
    f_24: int  # F_24 cells (1/16) that upsample reads
    context_24: int  # up(F_sub4) cells cff_24's dilated convolution reads for them
    half_image: int  # half-resolution pixels that make F_sub2 exact over f_24 cells

    @classmethod
    def for_model(cls, model: ICNet, region_size: int) -> RegionCrops:
        reach_124 = model.cff_124.dilated.conv.dilation[0] * (model.cff_124.dilated.conv.kernel_size[0] // 2)
        reach_24 = model.cff_24.dilated.conv.dilation[0] * (model.cff_24.dilated.conv.kernel_size[0] // 2)
        fuse = region_size // CELL + 2
        up_24 = fuse + 2 * reach_124
        f_24 = up_24 // 2 + 1
        return cls(fuse, fuse + 1, up_24, f_24, f_24 + 2 * reach_24,
                   (f_24 - 1) * HALF_PATH_STRIDE + receptive_field(model))


def variant_parts(model: ICNet, height: int, width: int, regions: int, crops: RegionCrops):
    """(whole image, per-region batch) callables computing what the sparse variant computes."""
    def like(*shape):  # channels-last where the engine runs it so (a no-op on the meta device)
        return torch.randn(*shape).contiguous(memory_format=torch.channels_last)

    quarter = like(1, 3, halved(halved(height)), halved(halved(width)))
    k = max(regions, 1)
    half_crops = like(k, 3, crops.half_image, crops.half_image)
    sub4_context = like(k, model.conv5_4.conv.out_channels, crops.context_24, crops.context_24)
    sub1_crops = like(k, 3, crops.sub1 * CELL, crops.sub1 * CELL)
    sub4_size = (halved(halved(halved(halved(height)))), halved(halved(halved(halved(width)))))

    def whole():
        f = model.stage3_1(model.stage2(model.stem(quarter)))
        f_sub4 = model.conv5_4(model.pyramid(model.stage5(model.stage4(model.stage3_rest(f)))))
        return model.cff_24.aux_classifier(upsample(f_sub4, sub4_size))

    def per_region():
        f_sub2 = model.stage3_1(model.stage2(model.stem(half_crops)))[..., :crops.f_24, :crops.f_24]
        f_24 = F.relu(_valid(model.cff_24.dilated, sub4_context) + model.cff_24.lateral(f_sub2))
        up = upsample(f_24, (2 * crops.f_24, 2 * crops.f_24))[..., :crops.up_24, :crops.up_24]
        f_sub1 = model.sub1(sub1_crops)[..., 1:, 1:]
        f_124 = F.relu(_valid(model.cff_124.dilated, up) + model.cff_124.lateral(f_sub1))
        return model.classifier(f_124)

    return whole, per_region


def _valid(conv_bn, x: torch.Tensor) -> torch.Tensor:
    """A ConvBN without padding: the window already holds the context."""
    conv = conv_bn.conv
    return conv_bn.bn(F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups))


def variant_cost(config, height: int, width: int, regions: int, region_size: int, repeats: int) -> dict:
    """GMACs and CPU ms of the variant's sparse inference at `regions`, with the released network's
    dense figures from the same process."""
    source = ICNet(config).eval()
    crops = RegionCrops.for_model(source, region_size)
    folded = prepare_for_inference(source, torch.device("cpu"), True)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for part in variant_parts(source, height, width, regions, crops)[: 2 if regions else 1]:
            part()
    gmacs = counter.get_flop_counts().get("Global", {}).get(torch.ops.aten.convolution, 0) / 2e9
    ms = sum(_median_ms(part, repeats) for part in variant_parts(folded, height, width, regions, crops)
             [: 2 if regions else 1])
    dense_gmacs = conv_gmacs(source, height, width, None)
    dense_ms = cpu_ms(folded, height, width, None, repeats)
    return {"keep_rate": config.keep_rate, "size": f"{height}x{width}", "regions": regions,
            "of": RegionGrid(height, width, region_size).count, "half_crop_px": crops.half_image,
            "gmacs": gmacs, "cpu_ms": ms, "dense_gmacs": dense_gmacs, "dense_cpu_ms": dense_ms,
            "mac_ratio": dense_gmacs / gmacs, "time_ratio": dense_ms / ms}


@torch.inference_mode()
def _median_ms(function, repeats: int) -> float:
    function()  # warm-up: oneDNN primitives for these shapes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    parser.add_argument("--size", default="1024x2048", help="network input size of the cost rows")
    parser.add_argument("--keep-rates", type=float, nargs="*", default=[0.5, 0.25],
                        help="keep rates of the cost rows (none: accuracy only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    if args.region_size % GATE_STRIDE:
        parser.error(f"--region-size must be a multiple of {GATE_STRIDE}, got {args.region_size}")
    report = {"model": str(args.model), "threads": torch.get_num_threads(), "region_size": args.region_size}
    if args.dataset:
        class_map = load_class_map(model.config.class_map)
        dataset = build_dataset(args.dataset, args.data_root, args.split, class_map)
        report["accuracy_bound"] = bound_accuracy(model, dataset, class_map, args.fractions, args.region_size)
        rows, cols = report["accuracy_bound"]["regions_grid"]
        print("sub124 in k regions, sub4 elsewhere (mIoU, an upper bound for the variant): " + ", ".join(
            f"{k}/{rows * cols}: {100 * r['miou']:.1f}" for k, r in report["accuracy_bound"]["by_regions"].items()))
    height, width = (int(side) for side in args.size.split("x"))
    grid = RegionGrid(height, width, args.region_size)
    report["cost"] = []
    print("| keep | size | regions | GMACs | CPU ms | dense GMACs | dense CPU ms | fewer MACs | less time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for keep in args.keep_rates:
        config = ModelConfig(num_classes=model.config.num_classes, keep_rate=keep, class_map=model.config.class_map)
        for k in region_counts(grid, args.fractions):
            row = variant_cost(config, height, width, k, args.region_size, args.repeats)
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
