"""icnet-benchmark: naive eager, the torch engine and TensorRT side by side, latency and throughput apart.

Sweeps device x resolution x keep rate x branch x batch x precision x output set. For every
configuration each backend is prepared first (CUDA graphs captured, TensorRT engine built or loaded
from its cache), then:

- latency: one call at a time, nothing else in flight, the backends taking turns call by call on
  the same varied frames (real frames from --images, resized, or synthetic drives; never blank
  input), so load on the machine hits them alike: end-to-end wall time (uint8 host frames -> outputs
  on the host) and the time of each stage, forward included;
- throughput: a stream of calls with one in flight (SegmentationEngine.segment_stream: on CUDA
  the next frame is copied and uploads while this one computes and downloads), frames per second;
- peak memory: on CUDA, what the backend needs for the configuration (its weights, graphs,
  activations and buffers, TensorRT's own memory included; other backends' weights excluded),
  measured over its throughput run with every other backend's graphs released; on CPU, the
  highest sampled process RSS.

Backends:
- naive: the plain eager model in fp32 with BatchNorm unfolded and NCHW memory, normalization on the
  host, full-resolution logits copied to the host, numpy argmax (and numpy colors / overlay) there;
- torch: SegmentationEngine (BN folded, channels-last, exact upsampling shortcut on CPU; pinned
  uint8 upload, fp16, CUDA graphs and pipelining on GPU);
- tensorrt: the same engine with backend="tensorrt" (CUDA and `pip install icnet-ros[tensorrt]`;
  skipped with a note elsewhere).

Weights are random unless --checkpoint is given: speed does not depend on weight values. Random
weights get their BatchNorm statistics calibrated on the benchmark frames so that activations stay
in a trained network's range (fp16 would overflow otherwise).

    icnet-benchmark --quick
    icnet-benchmark --device cuda --resolutions 1024x2048 --keep-rates 0.5 0.25 --branches sub124 sub4 \\
        --batch 1 4 --output-sets labels all --backends naive torch tensorrt --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from icnet_ros.atomic import atomic_write_text
from icnet_ros.classmap import load_class_map
from icnet_ros.inference.engine import PRECISIONS, SegmentationEngine, resolve_precision
from icnet_ros.inference.plan import OUTPUTS
from icnet_ros.inference.timing import STAGES, HostClock, StageTimings, percentile
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import BRANCHES, ICNet, ModelConfig, upsample
from icnet_ros.model.preprocess import image_to_input, network_size, prepare_input
from icnet_ros.visualization import colorize, overlay

DEFAULT_RESOLUTIONS = ("1024x2048", "720x960", "640x640")
QUICK = {"keep_rates": [0.5, 0.25], "branches": ["sub124", "sub4"], "resolutions": ["1024x2048", "512x1024"],
         "iterations": 5, "warmup": 1}
FRAME_POOL = 4  # distinct frames cycled through, so caches never see the same input twice in a row
BACKENDS = ("naive", "torch", "tensorrt")
REQUIRED_KEYS = ("device", "backend", "keep_rate", "branch", "height", "width", "batch", "precision", "outputs",
                 "latency_p50_ms", "latency_p95_ms", "latency_fps", "forward_p50_ms", "throughput_fps",
                 "peak_mem_mb", "speedup", "iterations")


@dataclass(frozen=True)
class Config:
    device: str
    keep_rate: float
    branch: str
    height: int
    width: int
    batch: int
    precision: str
    outputs: tuple[str, ...] = ("labels",)


def parse_output_set(text: str) -> tuple[str, ...]:
    """"labels", "labels+color", "all" -> the outputs in canonical order."""
    names = OUTPUTS if text.strip().lower() == "all" else tuple(p.strip().lower() for p in text.split("+"))
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"an output set is 'all' or names of {list(OUTPUTS)} joined by '+', "
                                         f"like labels+color; got {text!r}")
    return tuple(name for name in OUTPUTS if name in names)


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



# --- the backends ---------------------------------------------------------------------------------
class NaiveRunner:
    """The baseline: host normalization, eager fp32 NCHW unfolded model, full logits to the host, numpy there."""

    def __init__(self, model: ICNet, device: torch.device, branch: str = "sub124") -> None:
        self.model, self.device, self.branch = model.to(device).eval(), device, branch
        self.palette = load_class_map(model.config.class_map).palette()

    def __call__(self, batch: np.ndarray, outputs: tuple[str, ...] = ("labels",)
                 ) -> tuple[dict[str, np.ndarray], StageTimings]:
        clock = HostClock()
        size = network_size(batch.shape[1:3], self.model.config.input_size)
        with torch.no_grad():
            x = prepare_input(torch.from_numpy(batch), self.model.config, size=size).contiguous().to(self.device)
            self._sync()
            clock.mark("upload")
            logits = self.model(x, self.branch)
            if tuple(logits.shape[-2:]) != tuple(batch.shape[1:3]):
                logits = upsample(logits, batch.shape[1:3])
            self._sync()
            clock.mark("forward")
            host = logits.cpu().numpy()
            clock.mark("download")
        labels = host.argmax(axis=1).astype(np.uint8)
        results = {"labels": labels}
        if "color" in outputs or "overlay" in outputs:
            results["color"] = colorize(labels, self.palette)
            if "overlay" in outputs:
                results["overlay"] = overlay(batch, results["color"], 0.5)
        clock.mark("postprocess")
        return {name: results[name] for name in outputs}, clock.timings()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Contender:
    """One backend in the side-by-side: prepare, one timed call, a stream of calls, its memory."""

    def __init__(self, name: str, device: torch.device, naive: NaiveRunner | None = None,
                 engine: SegmentationEngine | None = None) -> None:
        self.name, self.device, self.naive, self.engine = name, device, naive, engine
        self.config: Config | None = None

    @property
    def precision(self) -> str:
        return "fp32" if self.naive is not None else self.engine.precision

    def prepare(self, config: Config) -> None:
        self.config = config
        if self.naive is not None:
            self.naive.branch = config.branch
            return
        self.engine.branch, self.engine.precision = config.branch, config.precision
        self.engine.prepare(config.height, config.width, config.batch, outputs=config.outputs)

    def call(self, batch: np.ndarray) -> StageTimings:
        if self.naive is not None:
            return self.naive(batch, self.config.outputs)[1]
        return self.engine.segment(batch, **self._wanted())[0].timings

    def stream(self, batches: Iterator[np.ndarray], count: int) -> None:
        """`count` calls, with one in flight for the engines."""
        if self.naive is not None:
            for _ in range(count):
                self.naive(next(batches), self.config.outputs)
            return
        calls = (next(batches) for _ in range(count))
        for _ in self.engine.segment_stream(calls, **self._wanted()):
            pass

    def release(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def held_bytes(self) -> int:
        """Device memory the backend holds outside the measured peak: its weights, TensorRT's memory."""
        if self.naive is not None:
            return sum(p.numel() * p.element_size() for p in self.naive.model.parameters())
        plan = self.engine._plan(np.zeros((1, self.config.height, self.config.width, 3), np.uint8), "rgb",
                                 True, False, False)[2]
        return self.engine.weight_bytes() + self.engine.backend_memory_bytes(plan)

    def _wanted(self) -> dict[str, bool]:
        return {name: name in self.config.outputs for name in OUTPUTS}


# --- measurement ----------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory of one run: CUDA allocator peak above a baseline, or the highest sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.baseline = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type == "cpu":
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def peak_mb(self, held_bytes: int = 0) -> float:
        """CUDA: the allocator's peak above the baseline plus `held_bytes`; CPU: the sampled RSS peak."""
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline + held_bytes) / 2**20
        self.sample()
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


def cycle(batches: list[np.ndarray]) -> Iterator[np.ndarray]:
    while True:
        yield from batches


def measure(config: Config, contenders: list[Contender], frames: list[np.ndarray],
            args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prepare every backend, time latency (taking turns) then throughput (one after another); one record each."""
    device = contenders[0].device
    batches = [np.stack([frames[(i + j) % len(frames)] for j in range(config.batch)]) for i in range(len(frames))]
    for contender in contenders:
        contender.prepare(config)
    for i in range(args.warmup):
        for contender in contenders:
            contender.call(batches[i % len(batches)])
    latency: dict[str, list[float]] = {c.name: [] for c in contenders}
    stages: dict[str, dict[str, list[float]]] = {c.name: {s: [] for s in STAGES} for c in contenders}
    naive_iterations = args.naive_iterations or args.iterations
    for i in range(args.iterations):
        for contender in contenders:
            if contender.naive is not None and i >= naive_iterations:
                continue
            elapsed, timings = timed(contender.call, device, batches[i % len(batches)])
            latency[contender.name].append(elapsed)
            for stage in STAGES:
                stages[contender.name][stage].append(getattr(timings, f"{stage}_ms"))
    records = []
    for contender in contenders:
        throughput, peak = throughput_and_peak(contender, contenders, batches, config, args)
        records.append(make_record(config, contender, latency[contender.name], stages[contender.name],
                                   throughput, peak))
    naive = next((r for r in records if r["backend"] == "naive"), None)
    for record in records:
        record["speedup"] = naive["latency_p50_ms"] / record["latency_p50_ms"] if naive else None
    return records


def throughput_and_peak(contender: Contender, contenders: list[Contender], batches: list[np.ndarray],
                        config: Config, args: argparse.Namespace) -> tuple[float, float]:
    """(frames per second over a stream of calls, peak MB). On CUDA every backend's graphs are released
    first and this one is prepared anew, so the peak is this backend's alone."""
    device = contender.device
    count = args.iterations if contender.naive is None else (args.naive_iterations or args.iterations)
    if device.type == "cuda":
        for other in contenders:
            other.release()
        torch.cuda.empty_cache()
    memory = MemoryProbe(device)
    if device.type == "cuda":
        contender.prepare(config)
    elapsed, _ = timed(contender.stream, device, cycle(batches), count)
    return count * config.batch * 1e3 / elapsed, memory.peak_mb(contender.held_bytes())


def make_record(config: Config, contender: Contender, latency: list[float], stages: dict[str, list[float]],
                throughput_fps: float, peak_mb: float) -> dict[str, Any]:
    p50 = percentile(latency, 50)
    record: dict[str, Any] = {**config.__dict__, "outputs": "+".join(config.outputs), "backend": contender.name,
                              "precision": contender.precision, "latency_p50_ms": p50,
                              "latency_p95_ms": percentile(latency, 95),
                              "latency_fps": config.batch * 1e3 / p50 if p50 > 0 else float("inf"),
                              "throughput_fps": throughput_fps, "peak_mem_mb": peak_mb, "iterations": len(latency)}
    for stage, values in stages.items():
        record[f"{stage}_p50_ms"] = percentile(values, 50)
        record[f"{stage}_p95_ms"] = percentile(values, 95)
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


def backends_for(device: torch.device, requested: list[str]) -> list[str]:
    """The requested backends that can run on `device`; TensorRT is skipped with a note where it cannot."""
    chosen = []
    for name in requested:
        if name == "tensorrt":
            from icnet_ros.inference import tensorrt

            if device.type != "cuda":
                print(f"note: tensorrt runs on CUDA only; skipped on {device}", file=sys.stderr)
                continue
            if not tensorrt.available():
                print(f"note: tensorrt skipped: not installed ({tensorrt.INSTALL_HINT})", file=sys.stderr)
                continue
        chosen.append(name)
    return chosen


def precisions_for(device: torch.device, requested: list[str]) -> list[str]:
    chosen = [resolve_precision(p, device) for p in requested]
    return list(dict.fromkeys(chosen))


def contenders_for(model: ICNet, device: torch.device, backends: list[str], threads: int | None) -> list[Contender]:
    contenders = []
    for name in backends:
        if name == "naive":
            contenders.append(Contender(name, device, naive=NaiveRunner(model, device)))
        else:
            engine = SegmentationEngine(model, device=str(device), threads=threads, backend=name)
            contenders.append(Contender(name, device, engine=engine))
    return contenders


def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    records = []
    keep_rates = [None] if args.checkpoint else args.keep_rates
    for device in devices(args.device):
        backends = backends_for(device, args.backends)
        for height, width in args.resolutions:
            frames = frame_pool(args, height, width, max(FRAME_POOL, max(args.batch)))
            for keep_rate in keep_rates:
                model = build_model(keep_rate, args.checkpoint, frames)
                contenders = contenders_for(model, device, backends, args.threads)
                for config in configs(device, model.config.keep_rate, height, width, args):
                    for record in measure(config, contenders, frames, args):
                        records.append(record)
                        print(format_row(record), flush=True)
                for contender in contenders:
                    contender.release()
    return records


def configs(device: torch.device, keep_rate: float, height: int, width: int, args) -> list[Config]:
    return [Config(str(device), keep_rate, branch, height, width, batch, precision, outputs)
            for branch in args.branches for batch in args.batch
            for precision in precisions_for(device, args.precision) for outputs in args.output_sets]


# --- output ---------------------------------------------------------------------------------------
COLUMNS = ("device", "keep", "branch", "HxW", "batch", "outputs", "backend", "prec", "upload", "forward", "post",
           "download", "latency p50 / p95", "latency fps", "throughput fps", "peak MB", "speedup")


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def format_row(r: dict[str, Any]) -> str:
    stage = " | ".join(f"{r[f'{s}_p50_ms']:.1f} / {r[f'{s}_p95_ms']:.1f}" for s in STAGES)
    speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
    return (f"| {r['device']} | {r['keep_rate']:g} | {r['branch']} | {r['height']}x{r['width']} | {r['batch']} | "
            f"{r['outputs']} | {r['backend']} | {r['precision']} | {stage} | {r['latency_p50_ms']:.2f} / "
            f"{r['latency_p95_ms']:.2f} | {r['latency_fps']:.1f} | {r['throughput_fps']:.1f} | "
            f"{r['peak_mem_mb']:.0f} | {speedup} |")


def describe(args: argparse.Namespace) -> str:
    weights = (f"checkpoint {args.checkpoint}" if args.checkpoint else
               "random weights (BatchNorm calibrated on the frames); speed does not depend on weight values")
    source = f"real frames from {args.images} ({args.images_glob}), resized" if args.images else "synthetic drives"
    return (f"ICNet benchmark: {weights}; input: {source}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU thread(s), load average {os.getloadavg()[0]:.2f}; "
            f"{args.warmup} warm-up and {args.iterations} timed calls per configuration and backend "
            f"({args.naive_iterations or args.iterations} for naive), then as many in a pipelined stream. Stage "
            "columns: p50 / p95 ms (device time on CUDA); latency: one call at a time, uint8 host frames to "
            "outputs on the host; throughput: frames/s with one call in flight; peak MB: on CUDA what the backend "
            "needs (weights, graphs, activations, TensorRT's memory), on CPU the highest process RSS.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="side by side in one run (tensorrt is skipped with a note where it cannot run)")
    parser.add_argument("--keep-rates", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=list(BRANCHES))
    parser.add_argument("--resolutions", nargs="+", type=parse_resolution,
                        default=[parse_resolution(r) for r in DEFAULT_RESOLUTIONS])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--precision", nargs="+", choices=["auto", *PRECISIONS], default=["auto"],
                        help="auto: fp32 on CPU, fp16 on CUDA (naive is always fp32)")
    parser.add_argument("--outputs", nargs="+", choices=OUTPUTS, default=None,
                        help="one output set, as names (kept for older command lines; see --output-sets)")
    parser.add_argument("--output-sets", nargs="+", type=parse_output_set, default=None,
                        help="output sets to sweep, each 'all' or names joined by '+' (default: labels)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--naive-iterations", type=int, default=None,
                        help="timed calls of the naive baseline (default: --iterations); it is slow at 2 MP")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--images", type=Path, help="folder of real frames (resized to each resolution)")
    parser.add_argument("--images-glob", default="*.png", help="which files of --images are frames")
    parser.add_argument("--checkpoint", type=Path, help="weights to use (the keep-rate sweep then follows it)")
    parser.add_argument("--json", type=Path, help="write one record per configuration and backend here")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sweep (~1 minute on 2 CPU cores); explicit options still win")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # quick defaults apply only where the user gave no value of their own
        given = argv if argv is not None else sys.argv[1:]
        explicit = {action.dest for action in parser._actions
                    if any(word == option or word.startswith(f"{option}=")  # --warmup 0 or --warmup=0
                           for option in action.option_strings for word in given)}
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, [parse_resolution(r) for r in value] if key == "resolutions" else value)
    if args.output_sets is None:
        args.output_sets = [parse_output_set("+".join(args.outputs or ["labels"]))]
    args.output_sets = list(dict.fromkeys(args.output_sets))
    if args.iterations < 1 or args.warmup < 0 or min(args.batch) < 1 or (args.naive_iterations or 1) < 1:
        parser.error("--iterations, --naive-iterations and --batch must be >= 1 and --warmup >= 0")
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
