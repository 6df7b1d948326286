"""icnet-benchmark: engine latency per stage against a naive baseline, measured side by side.

Sweeps keep rate x branch x resolution x device x batch x precision. Every configuration warms up,
then alternates engine calls and naive calls on the same varied frames (real frames from --images,
resized, or synthetic drives; never blank input), so load on the machine hits both alike.

- engine: SegmentationEngine (BN folded, channels-last, exact upsampling shortcut on CPU; pinned
  uint8 upload, fp16 and CUDA graphs on GPU), labels downloaded to the host.
- naive: the plain eager model in fp32 with BatchNorm unfolded and NCHW memory, normalization on the
  host, full-resolution logits copied back to the host, numpy argmax there.

Weights are random unless --checkpoint is given: speed does not depend on weight values. Random
weights get their BatchNorm statistics calibrated on the benchmark frames so that activations stay
in a trained network's range (fp16 would overflow otherwise).

    icnet-benchmark --quick
    icnet-benchmark --device cpu cuda --batch 1 4 8 --images ../shared/data/cityscapes_val9 \\
        --images-glob '*_src.png' --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.inference.engine import PRECISIONS, SegmentationEngine, resolve_precision
from icnet_ros.inference.timing import STAGES, percentile
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import BRANCHES, ICNet, ModelConfig, upsample
from icnet_ros.model.preprocess import image_to_input, network_size, prepare_input

DEFAULT_RESOLUTIONS = ("1024x2048", "720x960", "640x640")
QUICK = {"keep_rates": [0.5, 0.25], "branches": ["sub124", "sub4"], "resolutions": ["1024x2048", "512x1024"],
         "iterations": 5, "warmup": 1}
FRAME_POOL = 4  # distinct frames cycled through, so caches never see the same input twice in a row
REQUIRED_KEYS = ("device", "keep_rate", "branch", "height", "width", "batch", "precision", "p50_ms", "p95_ms",
                 "fps", "peak_mem_mb", "naive_p50_ms", "speedup")


@dataclass(frozen=True)
class Config:
    device: str
    keep_rate: float
    branch: str
    height: int
    width: int
    batch: int
    precision: str


def parse_resolution(text: str) -> tuple[int, int]:
    """"1024x2048" -> (1024, 2048): height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be HEIGHTxWIDTH like 1024x2048, got {text!r}") from None
    return height, width


# --- frames ---------------------------------------------------------------------------------------
def synthetic_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """RGB frames of synthetic drives (icnet_ros.data.synthetic), one scene per frame."""
    from icnet_ros.data.synthetic import Scene

    class_map = load_class_map("cityscapes")
    return [Scene(seed + index, height, width).render(index, class_map)[0] for index in range(count)]


def image_frames(folder: Path, pattern: str, count: int, height: int, width: int) -> list[np.ndarray]:
    """Up to `count` images of `folder` matching `pattern`, RGB, resized to height x width."""
    paths = sorted(folder.glob(pattern))
    frames = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is not None:
            frames.append(cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA),
                                       cv2.COLOR_BGR2RGB))
        if len(frames) == count:
            break
    if not frames:
        raise SystemExit(f"icnet-benchmark: no readable image matches {pattern!r} in {folder}")
    return frames


def frame_pool(args: argparse.Namespace, height: int, width: int, count: int) -> list[np.ndarray]:
    if args.images:
        return image_frames(args.images, args.images_glob, count, height, width)
    return synthetic_frames(count, height, width)


# --- models ---------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_batchnorm(model: ICNet, frames: list[np.ndarray], size: tuple[int, int] = (256, 512)) -> ICNet:
    """Set every BatchNorm's running statistics to those of `frames` (cumulative average), then eval."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    for frame in frames:
        model(image_to_input(cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA), model.config))
    return model.eval()


def build_model(keep_rate: float, checkpoint: Path | None, frames: list[np.ndarray]) -> ICNet:
    if checkpoint is not None:
        return load_model(checkpoint)
    torch.manual_seed(0)
    return calibrate_batchnorm(ICNet(ModelConfig(keep_rate=keep_rate, num_classes=19)), frames)


class NaiveRunner:
    """The baseline: host normalization, eager fp32 NCHW unfolded model, host argmax of full logits."""

    def __init__(self, model: ICNet, device: torch.device, branch: str = "sub124") -> None:
        self.model, self.device, self.branch = model.to(device).eval(), device, branch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        size = network_size(batch.shape[1:3], self.model.config.input_size)
        with torch.no_grad():
            x = prepare_input(torch.from_numpy(batch), self.model.config, size=size).contiguous()
            logits = self.model(x.to(self.device), self.branch)
            if tuple(logits.shape[-2:]) != tuple(batch.shape[1:3]):
                logits = upsample(logits, batch.shape[1:3])
        return logits.cpu().numpy().argmax(axis=1)


# --- measurement ----------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory of one configuration: CUDA allocator peak, or the highest sampled process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type == "cpu":
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.peak_bytes / 2**20


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the getrusage peak)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(function: Callable, device: torch.device, *args, **kwargs) -> tuple[float, Any]:
    """(wall milliseconds, result) of function(*args, **kwargs); CUDA is synchronized inside the time."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3, result


def measure(config: Config, engine: SegmentationEngine, naive: NaiveRunner, frames: list[np.ndarray],
            args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then alternate engine and naive calls; one JSON-ready record."""
    device = engine.device
    batches = [np.stack([frames[(i + j) % len(frames)] for j in range(config.batch)]) for i in range(len(frames))]
    engine.branch, engine.precision = config.branch, config.precision
    naive.branch = config.branch
    outputs = {name: name in args.outputs for name in ("labels", "color", "overlay")}
    for i in range(args.warmup):
        engine.segment(batches[i % len(batches)], **outputs)
        naive(batches[i % len(batches)])
    memory = MemoryProbe(device)
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    ends, naive_ms = [], []
    for i in range(args.iterations):
        batch = batches[i % len(batches)]
        elapsed, results = timed(engine.segment, device, batch, **outputs)
        ends.append(elapsed)
        memory.sample()
        for stage in STAGES:
            stages[stage].append(getattr(results[0].timings, f"{stage}_ms"))
        naive_ms.append(timed(naive, device, batch)[0])
    return make_record(config, stages, ends, naive_ms, memory.peak_mb())


def make_record(config: Config, stages: dict[str, list[float]], ends: list[float], naive_ms: list[float],
                peak_mb: float) -> dict[str, Any]:
    p50, naive_p50 = percentile(ends, 50), percentile(naive_ms, 50)
    record: dict[str, Any] = {**config.__dict__, "p50_ms": p50, "p95_ms": percentile(ends, 95),
                              "fps": config.batch * 1e3 / p50 if p50 > 0 else float("inf"),
                              "peak_mem_mb": peak_mb, "naive_p50_ms": naive_p50,
                              "naive_p95_ms": percentile(naive_ms, 95), "speedup": naive_p50 / p50 if p50 else None}
    for stage, values in stages.items():
        record[f"{stage}_p50_ms"] = percentile(values, 50)
        record[f"{stage}_p95_ms"] = percentile(values, 95)
    record["iterations"] = len(ends)
    return record


# --- the sweep ------------------------------------------------------------------------------------
def devices(requested: list[str]) -> list[torch.device]:
    found = []
    for name in requested:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"note: {name} requested but no CUDA GPU is visible to PyTorch; skipping it (no GPU figures)",
                  file=sys.stderr)
            continue
        found.append(torch.device(name))
    return found


def precisions_for(device: torch.device, requested: list[str]) -> list[str]:
    chosen = [resolve_precision(p, device) for p in requested]
    return list(dict.fromkeys(chosen))


def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    records = []
    keep_rates = [None] if args.checkpoint else args.keep_rates
    for device in devices(args.device):
        for height, width in args.resolutions:
            frames = frame_pool(args, height, width, max(FRAME_POOL, max(args.batch)))
            for keep_rate in keep_rates:
                model = build_model(keep_rate, args.checkpoint, frames)
                engine = SegmentationEngine(model, device=str(device), threads=args.threads)
                naive = NaiveRunner(model, device)
                for config in configs(device, model.config.keep_rate, height, width, args):
                    record = measure(config, engine, naive, frames, args)
                    records.append(record)
                    print(format_row(record), flush=True)
    return records


def configs(device: torch.device, keep_rate: float, height: int, width: int, args) -> list[Config]:
    return [Config(str(device), keep_rate, branch, height, width, batch, precision)
            for branch in args.branches for batch in args.batch
            for precision in precisions_for(device, args.precision)]


# --- output ---------------------------------------------------------------------------------------
COLUMNS = ("device", "keep", "branch", "HxW", "batch", "prec", "upload", "forward", "post", "download",
           "e2e p50", "e2e p95", "fps", "peak MB", "naive p50", "speedup")


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def format_row(r: dict[str, Any]) -> str:
    stage = " | ".join(f"{r[f'{s}_p50_ms']:.1f} / {r[f'{s}_p95_ms']:.1f}" for s in STAGES)
    return (f"| {r['device']} | {r['keep_rate']:g} | {r['branch']} | {r['height']}x{r['width']} | {r['batch']} | "
            f"{r['precision']} | {stage} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['fps']:.2f} | "
            f"{r['peak_mem_mb']:.0f} | {r['naive_p50_ms']:.1f} | {r['speedup']:.2f}x |")


def describe(args: argparse.Namespace) -> str:
    weights = (f"checkpoint {args.checkpoint}" if args.checkpoint else
               "random weights (BatchNorm calibrated on the frames); speed does not depend on weight values")
    source = f"real frames from {args.images} ({args.images_glob}), resized" if args.images else "synthetic drives"
    return (f"ICNet engine benchmark: {weights}; input: {source}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU thread(s), load average {os.getloadavg()[0]:.2f}; "
            f"{args.warmup} warm-up and {args.iterations} timed calls per configuration. Stage columns: p50 / p95 ms; "
            "peak MB: CUDA allocator peak on GPU, highest sampled process RSS on CPU.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--keep-rates", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=list(BRANCHES))
    parser.add_argument("--resolutions", nargs="+", type=parse_resolution,
                        default=[parse_resolution(r) for r in DEFAULT_RESOLUTIONS])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--precision", nargs="+", choices=["auto", *PRECISIONS], default=["auto"],
                        help="auto: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--outputs", nargs="+", choices=("labels", "color", "overlay"), default=["labels"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--images", type=Path, help="folder of real frames (resized to each resolution)")
    parser.add_argument("--images-glob", default="*.png", help="which files of --images are frames")
    parser.add_argument("--checkpoint", type=Path, help="weights to use (the keep-rate sweep then follows it)")
    parser.add_argument("--json", type=Path, help="write one record per configuration here")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sweep (~1 minute on 2 CPU cores); explicit options still win")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # quick defaults apply only where the user gave no value of their own
        explicit = {action.dest for action in parser._actions
                    if any(option in (argv if argv is not None else sys.argv[1:]) for option in action.option_strings)}
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, [parse_resolution(r) for r in value] if key == "resolutions" else value)
    if args.iterations < 1 or args.warmup < 0 or min(args.batch) < 1:
        parser.error("--iterations and --batch must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(describe(args))
    print(table_header(), flush=True)
    records = run_sweep(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
        print(f"wrote {len(records)} record(s) to {args.json}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
