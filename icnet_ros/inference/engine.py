"""The segmentation engine: camera frames in, labels / colors / overlays out. No ROS imports.

    engine = SegmentationEngine.from_checkpoint("icnet.safetensors")        # CUDA when present
    seg = engine.segment(frame_rgb, color=True)                             # one HxWx3 uint8 frame
    segs = engine.segment([left, right], channel_order="bgr", overlay=True)  # one batch, two cameras
    engine.branch, engine.precision = "sub4", "fp16"                        # between frames, no reload

What it does per call:

- upload: the uint8 frames go to the device as uint8 (a quarter of float32's bytes); on CUDA
  through pinned host buffers and non-blocking copies;
- forward: channel order, float conversion and normalization on the device, then the chosen
  branch of the BN-folded, channels-last network in the chosen precision;
- postprocess: labels at full resolution (the exact upsampling shortcut of upsample.py on CPU,
  a dense upsample on CUDA where it is cheap and capturable), colors and overlay on the device;
- download: only the outputs asked for, as uint8 (or uint16 labels for big class maps).

On CUDA, static shapes are captured in CUDA graphs (one per Plan: batch, size, branch, precision,
channel order, outputs), see cuda.py. Everything else in this module runs the same on CPU and GPU
and is tested on CPU.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icnet_ros.classmap import ClassMap, load_class_map
from icnet_ros.inference.frames import FrameError, as_batch, check_channel_order
from icnet_ros.inference.optimize import prepare_for_inference
from icnet_ros.inference.timing import HostClock, StageTimings
from icnet_ros.inference.upsample import upsample_argmax
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import ICNet, check_branch
from icnet_ros.model.preprocess import network_size, normalization_constants, normalize, resize_input
from icnet_ros.visualization import alpha_weight, colorize_torch, overlay_torch, palette_tensor

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UPSAMPLE_METHODS = ("sparse", "dense")

__all__ = ["FrameError", "Plan", "Segmentation", "SegmentationEngine", "StageTimings", "label_agreement"]


@dataclass
class Segmentation:
    """The result for one frame. Outputs not asked for are None (and were never computed).

    labels: HxW class ids (uint8, or uint16 for class maps beyond 256 ids).
    color: HxWx3 RGB uint8, the class map's palette.
    overlay: HxWx3 uint8 blend of the input and the colors, in the input's channel order.
    timings: the stage times of the engine call that produced this frame; a batch shares one.
    """

    labels: np.ndarray | None = None
    color: np.ndarray | None = None
    overlay: np.ndarray | None = None
    timings: StageTimings = field(default_factory=StageTimings)
    batch_size: int = 1


@dataclass(frozen=True)
class Plan:
    """Everything that fixes the shapes and the work of one call: the key of a captured CUDA graph."""

    batch: int
    height: int
    width: int
    branch: str
    precision: str
    channel_order: str = "rgb"
    labels: bool = True
    color: bool = False
    overlay: bool = False
    upsample: str = "sparse"
    network_height: int = 0  # the size the network runs at (frames are resized to it); 0: the frame's
    network_width: int = 0

    @property
    def network_size(self) -> tuple[int, int]:
        return (self.network_height or self.height, self.network_width or self.width)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name in ("labels", "color", "overlay") if getattr(self, name))


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this PyTorch sees no CUDA GPU; use device='cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA (tensor cores), fp32 on CPU (no fast half-precision convolutions)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def label_dtypes(num_classes: int, class_map: ClassMap) -> tuple[torch.dtype, np.dtype]:
    """(device dtype, host dtype) of label maps: uint8 when every id fits a byte, else int32 -> uint16."""
    host = np.dtype(np.uint8) if num_classes <= 256 and class_map.label_dtype == np.uint8 else np.dtype(np.uint16)
    return (torch.uint8 if host == np.uint8 else torch.int32), host


def label_agreement(engine_labels, reference_labels, ignore_index: int | None = None) -> float:
    """Fraction of pixels with equal labels (numpy arrays, tensors, or lists of either), in [0, 1].

    Pixels whose reference is `ignore_index` are left out. Shapes must match.
    """
    if isinstance(engine_labels, (list, tuple)):
        pairs = list(zip(engine_labels, reference_labels, strict=True))
        equal = total = 0
        for mine, theirs in pairs:
            e, t = _agreement_counts(mine, theirs, ignore_index)
            equal, total = equal + e, total + t
        return equal / total if total else float("nan")
    equal, total = _agreement_counts(engine_labels, reference_labels, ignore_index)
    return equal / total if total else float("nan")


def _agreement_counts(mine, theirs, ignore_index) -> tuple[int, int]:
    mine, theirs = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (mine, theirs))
    if mine.shape != theirs.shape:
        raise ValueError(f"label maps differ in shape: {mine.shape} vs {theirs.shape}")
    keep = np.ones(theirs.shape, bool) if ignore_index is None else theirs != ignore_index
    return int(((mine.astype(np.int64) == theirs.astype(np.int64)) & keep).sum()), int(keep.sum())


class SegmentationEngine:
    """ICNet inference on CPU or CUDA; see the module docstring.

    Build it with from_checkpoint (everything else comes from the stored configuration) or from an
    ICNet instance. `branch`, `precision`, `alpha` and `upsample` may be changed between calls: the
    folded fp32 weights are kept, and a cast copy per precision is made on first use and cached.
    """

    def __init__(self, model: ICNet, *, class_map: ClassMap | str | None = None, device: str = "auto",
                 branch: str = "sub124", precision: str = "auto", threads: int | None = None,
                 upsample: str = "auto", alpha: float = 0.5, cuda_graphs: bool = True,
                 compile: bool = False, fold: bool = True,
                 input_size: tuple[int, int] | None | str = "checkpoint") -> None:
        """threads sets torch.set_num_threads (process-wide, CPU); None leaves PyTorch's default.

        upsample: "sparse" (exact shortcut, default on CPU) or "dense" (default on CUDA, where it is
        cheap and fits in a CUDA graph); both give labels identical to argmax of F.interpolate.
        cuda_graphs: capture static shapes in CUDA graphs (CUDA only). compile: use
        torch.compile(mode="reduce-overhead") for the network instead of manual graphs.
        fold: fold BatchNorm into the convolutions (False only to measure what folding gives).
        input_size: the (height, width) frames are resized to before the network, labels coming back
        at the frame's size; 0 on one side keeps the aspect ratio, None runs at each frame's size,
        "checkpoint" (default) takes the size the model was trained at (ModelConfig.input_size).
        """
        self.device = resolve_device(device)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.config = model.config
        if not isinstance(class_map, ClassMap):
            class_map = load_class_map(class_map or model.config.class_map)
        self.class_map = class_map
        self.num_classes = model.config.num_classes
        self.label_dtype, self.label_numpy_dtype = label_dtypes(self.num_classes, self.class_map)
        self._weights = {"fp32": prepare_for_inference(model, self.device, fold)}
        self.branch = branch
        self.precision = precision
        self.upsample = upsample
        self.alpha = alpha
        self.compile = compile
        self.input_size = model.config.input_size if input_size == "checkpoint" else input_size
        self._mean, self._std = normalization_constants(model.config, self.device)
        self._palette = palette_tensor(self.class_map.palette(), self.num_classes, self.device)
        self._compiled: dict[str, Any] = {}
        self._runner = self._make_runner(cuda_graphs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", branch: str = "sub124",
                        precision: str = "auto", threads: int | None = None, **options) -> SegmentationEngine:
        """An engine from one checkpoint file: keep rate, classes, class map and normalization are stored."""
        return cls(load_model(path), device=device, branch=branch, precision=precision, threads=threads, **options)

    # --- settings that may change between frames -------------------------------------------------
    @property
    def branch(self) -> str:
        return self._branch

    @branch.setter
    def branch(self, branch: str) -> None:
        self._branch = check_branch(branch, self.config)

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self._input_size

    @input_size.setter
    def input_size(self, size: tuple[int, int] | None) -> None:
        if size is not None:
            network_size((1000, 1000), size)  # validates: raises for negative or too small sizes
            size = (int(size[0]), int(size[1]))
        self._input_size = size

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, precision: str) -> None:
        self._precision = resolve_precision(precision, self.device)

    @property
    def upsample(self) -> str:
        return self._upsample

    @upsample.setter
    def upsample(self, method: str) -> None:
        if method == "auto":
            method = "dense" if self.device.type == "cuda" else "sparse"
        if method not in UPSAMPLE_METHODS:
            raise ValueError(f"upsample must be 'auto' or one of {list(UPSAMPLE_METHODS)}, got {method!r}")
        self._upsample = method

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, alpha: float) -> None:
        alpha_weight(alpha)  # validates
        self._alpha = float(alpha)

    def weights(self, precision: str | None = None) -> ICNet:
        """The folded network in `precision` (default: the current one); cast copies are cached."""
        precision = resolve_precision(precision or self.precision, self.device)
        if precision not in self._weights:
            self._weights[precision] = copy.deepcopy(self._weights["fp32"]).to(PRECISIONS[precision])
        return self._weights[precision]

    # --- segmentation ---------------------------------------------------------------------------
    def segment(self, frames: np.ndarray | Sequence[np.ndarray], *, channel_order: str = "rgb",
                labels: bool = True, color: bool = False, overlay: bool = False,
                alpha: float | None = None) -> Segmentation | list[Segmentation]:
        """Segment one uint8 HxWx3 frame, or a batch (list of frames or NxHxWx3 array) of one size.

        channel_order: "rgb" or "bgr" (OpenCV's order): the order of the input's channels; the
        overlay comes back in the same order, `color` is always RGB.
        labels / color / overlay: which outputs to compute; the others are None and cost nothing.
        alpha: overlay opacity of the colors in [0, 1] (default: the engine's `alpha`).
        Returns a Segmentation for a single frame, a list of them for a batch.
        Raises FrameError for frames of the wrong type, dtype, channel count or size.
        """
        return self._finish(self._submit(frames, channel_order, labels, color, overlay, alpha))

    def segment_stream(self, batches: Iterable[np.ndarray | Sequence[np.ndarray]], **options
                       ) -> Iterator[Segmentation | list[Segmentation]]:
        """segment() over an iterable, in order, with one call in flight: on CUDA the next frames
        upload and the previous results download while the GPU computes. Options as for segment()."""
        pending = None
        for frames in batches:
            submitted = self._submit(frames, **options)
            if pending is not None:
                yield self._finish(pending)
            pending = submitted
        if pending is not None:
            yield self._finish(pending)

    def _submit(self, frames, channel_order="rgb", labels=True, color=False, overlay=False, alpha=None):
        batch, single, plan = self._plan(frames, channel_order, labels, color, overlay)
        return self._runner.submit(batch, plan, self._alpha_for(alpha)), plan, single

    def _finish(self, submitted):
        handle, plan, single = submitted
        outputs, timings = self._runner.collect(handle)
        results = self._split(outputs, plan, timings)
        return results[0] if single else results

    def warm_up(self, height: int, width: int, batch: int = 1, iterations: int = 2, **options) -> None:
        """Run a few frames of noise at this size (capturing CUDA graphs, tuning kernels) before timing."""
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        for _ in range(iterations):
            self.segment(frames, **options)

    def preprocess(self, frames: np.ndarray | Sequence[np.ndarray], channel_order: str = "rgb",
                   precision: str = "fp32") -> torch.Tensor:
        """The network input the engine builds for `frames`: (N, 3, h, w) on the engine's device."""
        batch, _ = as_batch(frames)
        uploaded = torch.from_numpy(batch).to(self.device)
        size = network_size(batch.shape[1:3], self.input_size)
        return self._network_input(uploaded, check_channel_order(channel_order), size, PRECISIONS[precision])

    def _network_input(self, frames: torch.Tensor, channel_order: str, size, dtype) -> torch.Tensor:
        x = normalize(frames, self._mean, self._std, channel_order, self.config.input_channel_order, torch.float32)
        return resize_input(x, size).to(dtype)

    # --- the shared computation (also what the CUDA graphs capture) -----------------------------
    def forward_logits(self, frames: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(N, H, W, 3) uint8 on device -> the branch's low-resolution logits (N, C, h, w)."""
        x = self._network_input(frames, plan.channel_order, plan.network_size, PRECISIONS[plan.precision])
        return self._network(plan.precision)(x, plan.branch)

    def postprocess(self, frames: torch.Tensor, logits: torch.Tensor, plan: Plan,
                    alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Low-resolution logits -> the requested full-resolution outputs, on the device."""
        labels = upsample_argmax(logits, (plan.height, plan.width), plan.upsample, self.label_dtype)
        outputs = {"labels": labels} if plan.labels else {}
        if plan.color or plan.overlay:
            color = colorize_torch(labels, self._palette)
            if plan.color:
                outputs["color"] = color
            if plan.overlay:
                in_order = color.flip(-1) if plan.channel_order == "bgr" else color
                outputs["overlay"] = overlay_torch(frames, in_order, alpha)
        return outputs

    # --- internals ------------------------------------------------------------------------------
    def _network(self, precision: str):
        """The callable producing branch logits: the module's method, or its torch.compile'd form."""
        module = self.weights(precision)
        if not self.compile:
            return module.branch_logits
        if precision not in self._compiled:
            self._compiled[precision] = torch.compile(module.branch_logits, mode="reduce-overhead")
        return self._compiled[precision]

    def _make_runner(self, cuda_graphs: bool):
        if self.device.type == "cuda":
            from icnet_ros.inference.cuda import CudaRunner

            return CudaRunner(self, use_graphs=cuda_graphs and not self.compile)
        return EagerRunner(self)

    def _plan(self, frames, channel_order, labels, color, overlay) -> tuple[np.ndarray, bool, Plan]:
        batch, single = as_batch(frames)
        if not (labels or color or overlay):
            raise ValueError("nothing to compute: ask for at least one of labels, color, overlay")
        net_height, net_width = network_size(batch.shape[1:3], self.input_size)
        plan = Plan(batch.shape[0], batch.shape[1], batch.shape[2], self.branch, self.precision,
                    check_channel_order(channel_order), bool(labels), bool(color), bool(overlay), self.upsample,
                    net_height, net_width)
        return batch, single, plan

    def _alpha_for(self, alpha: float | None) -> int:
        return alpha_weight(self._alpha if alpha is None else alpha)

    def _split(self, outputs: dict[str, np.ndarray], plan: Plan, timings: StageTimings) -> list[Segmentation]:
        """Per-frame Segmentations from batched host outputs."""
        if "labels" in outputs and outputs["labels"].dtype != self.label_numpy_dtype:
            outputs["labels"] = outputs["labels"].astype(self.label_numpy_dtype)
        return [Segmentation(**{name: outputs[name][i] for name in plan.outputs}, timings=timings,
                             batch_size=plan.batch) for i in range(plan.batch)]


class EagerRunner:
    """Runs a Plan eagerly, synchronously; CPU (and any device without a dedicated runner)."""

    def __init__(self, engine: SegmentationEngine) -> None:
        self.engine = engine

    def submit(self, batch: np.ndarray, plan: Plan, alpha: int):
        clock = HostClock()
        frames = torch.from_numpy(batch).to(self.engine.device)
        clock.mark("upload")
        with torch.inference_mode():
            logits = self.engine.forward_logits(frames, plan)
            clock.mark("forward")
            outputs = self.engine.postprocess(frames, logits, plan, torch.tensor(alpha))
            clock.mark("postprocess")
        host = {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
        clock.mark("download")
        return host, clock.timings()

    def collect(self, handle):
        return handle
