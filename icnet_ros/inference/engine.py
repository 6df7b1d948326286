"""The segmentation engine: camera frames in, labels / colors / overlays out. No ROS imports.

    engine = SegmentationEngine.from_checkpoint("icnet.safetensors")        # CUDA when present
    engine.prepare(1024, 2048, outputs=("labels", "color"))                 # capture before frames arrive
    seg = engine.segment(frame_rgb, color=True)                             # one HxWx3 uint8 frame
    segs = engine.segment([left, right], channel_order="bgr", overlay=True)  # one batch, two cameras
    engine.branch, engine.precision = "sub4", "fp16"                        # between frames, no reload

    pending = engine.submit(frame_k1)        # pipelined: frame k+1 uploads and computes ...
    seg_k = engine.collect(pending_k)        # ... while frame k downloads (one call in flight)

What it does per call:

- upload: the uint8 frames go to the device as uint8 (a quarter of float32's bytes); on CUDA
  through pinned host buffers and non-blocking copies;
- forward: channel order, float conversion, normalization and resize to the network size on the
  device, then the chosen branch of the BN-folded, channels-last network in the chosen precision
  (backend "torch"), or a TensorRT engine of it (backend "tensorrt", tensorrt.py);
- postprocess: labels at the frame's resolution (the exact upsampling shortcut of upsample.py on
  CPU, a dense upsample on CUDA where it is cheap and capturable), colors and overlay on the
  device, each computed only when asked for (plan.py);
- download: only the outputs asked for, as uint8 (or uint16 labels for big class maps).
- sparse (high_res_regions = k > 0, model/sparsity.py): sub124's high-resolution path runs in the
  k best regions per frame only, eagerly (never captured: the choice of regions goes back with the
  call's results, Segmentation.regions).

The runners get the computation as callables (plan.Stages): EagerRunner on CPU, cuda.CudaRunner on
CUDA (streams, double buffers, CUDA graphs in a bounded cache, graphs.py). Everything else in this
module runs the same on CPU and GPU and is tested on CPU.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icnet_ros.classmap import ClassMap, load_class_map
from icnet_ros.inference.frames import FrameError, as_batch, check_channel_order
from icnet_ros.inference.graphs import DEFAULT_CAPACITY
from icnet_ros.inference.optimize import prepare_for_inference
from icnet_ros.inference.plan import OUTPUTS, EagerRunner, Pending, Plan, Stages, postprocess, weak_method
from icnet_ros.inference.timing import StageTimings
from icnet_ros.inference.upsample import upsample_argmax
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import ICNet, check_branch
from icnet_ros.model.preprocess import network_size, normalization_constants, normalize, resize_input
from icnet_ros.model.sparsity import resolve_selector, sparse_input_size, sparse_logits
from icnet_ros.visualization import alpha_weight, colorize_torch, overlay_torch, palette_tensor

LOG = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UPSAMPLE_METHODS = ("sparse", "dense")

BACKENDS = ("auto", "torch", "tensorrt")

__all__ = ["FrameError", "Pending", "Plan", "Segmentation", "SegmentationEngine", "StageTimings", "label_agreement"]


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
    # sparse high-resolution regions (engine.high_res_regions > 0): (rows, cols) bool, the squares of
    # region_size pixels of the network input (network_size) where the high-resolution path ran; None when dense
    regions: np.ndarray | None = None
    network_size: tuple[int, int] | None = None
    region_size: int = 0

    @property
    def regions_computed(self) -> int:
        """Regions where the high-resolution path ran (0 when dense: see `regions`)."""
        return 0 if self.regions is None else int(self.regions.sum())

    @property
    def regions_total(self) -> int:
        return 0 if self.regions is None else int(self.regions.size)


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this PyTorch sees no CUDA GPU; use device='cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda":
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        resolved = torch.device("cuda", index)  # pinned now: "cuda" must not follow later set_device calls
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA (tensor cores), fp32 on CPU (no fast half-precision convolutions)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "tensorrt" on CUDA when TensorRT (and the ONNX exporter's packages) import, else "torch".

    An explicit "tensorrt" without CUDA or without TensorRT is an error saying what to install.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    from icnet_ros.inference import tensorrt

    if backend == "auto":
        return "tensorrt" if device.type == "cuda" and tensorrt.available() else "torch"
    if device.type != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on CUDA devices only, not {device}; use backend 'torch' "
                         "(or 'auto') on the CPU")
    tensorrt.import_tensorrt()  # raises TensorRTError naming what to install
    return "tensorrt"


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
    One caller thread at a time (the node's worker).
    """

    def __init__(self, model: ICNet, *, class_map: ClassMap | str | None = None, device: str = "auto",
                 branch: str = "sub124", precision: str = "auto", threads: int | None = None,
                 upsample: str = "auto", alpha: float = 0.5, cuda_graphs: bool = True,
                 compile: bool = False, fold: bool = True,
                 input_size: tuple[int, int] | None | str = "checkpoint", backend: str = "auto",
                 graph_cache_size: int = DEFAULT_CAPACITY, tensorrt_cache: str | Path | None = None,
                 high_res_regions: int = 0, region_selector: str = "auto", region_size: int = 256) -> None:
        """threads sets torch.set_num_threads (process-wide, CPU); None leaves PyTorch's default.

        upsample: "sparse" (exact shortcut, default on CPU) or "dense" (default on CUDA, where it is
        cheap and fits in a CUDA graph); both give labels identical to argmax of F.interpolate.
        cuda_graphs: capture static shapes in CUDA graphs (CUDA only). compile: use
        torch.compile(mode="reduce-overhead") for the network instead of manual graphs (torch backend).
        fold: fold BatchNorm into the convolutions (False only to measure what folding gives).
        input_size: the (height, width) frames are resized to before the network, labels coming back
        at the frame's size; 0 on one side keeps the aspect ratio, None runs at each frame's size,
        "checkpoint" (default) takes the size the model was trained at (ModelConfig.input_size).
        backend: "torch", "tensorrt" (CUDA + `pip install icnet-ros[tensorrt]`; engines built once per
        shape and cached on disk, see tensorrt.py) or "auto" (tensorrt when it can run, else torch).
        graph_cache_size: how many shapes (batch, frame and network size, branch, precision, channel
        order) keep their CUDA graphs; prepare() releases the least recently used beyond that, while a
        frame of a new shape with the cache full runs eagerly (a release synchronizes the device, so
        none happens while frames flow). The node sizes it for every batch its cameras can produce.
        tensorrt_cache: the folder of cached TensorRT engines (default $ICNET_ROS_CACHE/tensorrt).
        high_res_regions: 0 runs the network densely; k > 0 runs sub124's high-resolution path only in
        the k best regions per image (model/sparsity.py; torch backend; changeable between calls).
        region_selector: "gate" (a gated checkpoint's trained gate), "entropy" (sub24's entropy, any
        checkpoint with auxiliary heads) or "auto" (the gate when there is one); region_size: the
        entropy selector's region side in network-input pixels (a gate has its own).
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
        self.backend = resolve_backend("torch" if compile and backend == "auto" else backend, self.device)
        self._source, self._fold = model, fold
        self._weights: dict[str, ICNet] = {}
        if self.backend == "torch":  # TensorRT runs its own copy: the torch weights are made only if asked for
            self.weights("fp32")
            self._source = None  # the folded copy is all the torch backend needs
        self.branch = branch
        self.precision = precision
        self.upsample = upsample
        self.alpha = alpha
        self.compile = compile
        self.input_size = model.config.input_size if input_size == "checkpoint" else input_size
        self._mean, self._std = normalization_constants(model.config, self.device)
        self._palette = palette_tensor(self.class_map.palette(), self.num_classes, self.device)
        self._compiled: dict[str, Any] = {}
        self._tensorrt = None
        if self.backend == "tensorrt":
            from icnet_ros.inference.tensorrt import TensorRTForward

            self._tensorrt = TensorRTForward(model, self.device, tensorrt_cache)
        self.region_selector = resolve_selector(model, region_selector) if high_res_regions else region_selector
        self.region_size = model.config.gate_region_size if self.region_selector == "gate" else int(region_size)
        self.high_res_regions = high_res_regions
        self._chosen = None  # the regions of the last sparse forward, handed to its Pending
        self.stages = self._make_stages()
        self._runner = self._make_runner(cuda_graphs, graph_cache_size)

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
    def high_res_regions(self) -> int:
        return self._high_res_regions

    @high_res_regions.setter
    def high_res_regions(self, regions: int) -> None:
        self._high_res_regions = self.check_high_res_regions(regions)

    def check_high_res_regions(self, regions: int) -> int:
        """`regions` if this engine can run that many (0: dense), else ValueError saying why."""
        regions = int(regions)
        if regions < 0:
            raise ValueError(f"high_res_regions must be 0 (dense) or a number of regions per image, got {regions}")
        if regions and self.backend != "torch":
            raise ValueError(f"high_res_regions needs backend 'torch' (the {self.backend} engine is dense); "
                             f"set high_res_regions 0 or backend 'torch'")
        if regions:
            self.region_selector = resolve_selector(self.weights("fp32"), self.region_selector)
        return regions

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
        if "fp32" not in self._weights:
            self._weights["fp32"] = prepare_for_inference(self._source, self.device, self._fold)
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
        return self.collect(self.submit(frames, channel_order=channel_order, labels=labels, color=color,
                                        overlay=overlay, alpha=alpha))

    def submit(self, frames: np.ndarray | Sequence[np.ndarray], *, channel_order: str = "rgb",
               labels: bool = True, color: bool = False, overlay: bool = False,
               alpha: float | None = None) -> Pending:
        """Start segmenting `frames` (arguments as for segment()) and return at once with a handle.

        On CUDA the upload, compute and download are queued on the device's streams and the call
        returns before they finish, so the caller can prepare (and submit) the next frames while
        these compute: collect(handle) waits for them. On CPU the work is done here. The frames may
        be reused as soon as submit returns (they are copied). Handles may be collected in any order.
        """
        batch, single, plan = self._plan(frames, channel_order, labels, color, overlay)
        self._chosen = None
        try:
            work = self._runner.submit(batch, plan, self._alpha_for(alpha))
            regions = self._chosen  # this call's own: set by its forward, inside submit
        finally:
            self._chosen = None  # a failed call's choice never reaches the next call
        return Pending(plan, single, work, regions=regions)

    def collect(self, pending: Pending) -> Segmentation | list[Segmentation]:
        """The result of a submitted call (waiting for it): a Segmentation, or a list for a batch.

        The arrays are the call's own (nothing later overwrites them). Each handle is collected once.
        """
        if pending.collected:
            raise ValueError("this call was already collected; each submit() handle is collected once")
        pending.collected = True
        outputs, timings = self._runner.collect(pending.work)
        pending.work = None
        results = self._split(outputs, pending.plan, timings)
        if pending.regions is not None:
            chosen, region_size = pending.regions
            for result, regions in zip(results, chosen.cpu().numpy()):
                result.regions, result.network_size, result.region_size = regions, pending.plan.network_size, region_size
        return results[0] if pending.single else results

    def segment_stream(self, batches: Iterable[np.ndarray | Sequence[np.ndarray]], **options
                       ) -> Iterator[Segmentation | list[Segmentation]]:
        """segment() over an iterable, in order, with one call in flight: on CUDA frame k+1 is copied
        and its upload queued while frame k computes and downloads (frame k-1 was collected before
        frame k+1 was submitted: two frames overlap). Options as for segment()."""
        pending = None
        for frames in batches:
            submitted = self.submit(frames, **options)
            if pending is not None:
                yield self.collect(pending)
            pending = submitted
        if pending is not None:
            yield self.collect(pending)

    def prepare(self, height: int, width: int, batch: int = 1, *, channel_order: str = "rgb",
                outputs: Iterable[str] = ("labels",)) -> None:
        """Get frames of this size ready before they arrive (the node calls it before subscribing).

        On CUDA it allocates the shape's buffers, captures the forward and the postprocess of every
        output named in `outputs` (any of "labels", "color", "overlay"; later calls may ask for any
        subset of them without a capture), and builds or loads the TensorRT engine; then runs noise
        through so that every buffer exists. On CPU it runs noise through (oneDNN and upsampling set-up).
        Uses the engine's current branch, precision and upsample method.
        """
        wanted = {name: name in set(outputs) for name in OUTPUTS}
        unknown = set(outputs) - set(OUTPUTS)
        if unknown or not any(wanted.values()):
            raise ValueError(f"outputs must name at least one of {list(OUTPUTS)}, got {list(outputs)}")
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        _, _, plan = self._plan(frames, channel_order, **wanted)
        self._runner.prepare(plan)
        for _ in range(2 if self.device.type == "cuda" else 1):  # two calls: both buffer lanes
            self.segment(frames, channel_order=channel_order, **wanted)

    def warm_up(self, height: int, width: int, batch: int = 1, iterations: int = 2, **options) -> None:
        """prepare() for the outputs in `options`, then a few frames of noise (before timing)."""
        outputs = [name for name in OUTPUTS if options.get(name, name == "labels")]
        self.prepare(height, width, batch, channel_order=options.get("channel_order", "rgb"), outputs=outputs)
        rng = np.random.default_rng(1)
        frames = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        for _ in range(iterations):
            self.segment(frames, **options)

    def close(self) -> None:
        """Release captured graphs and their device memory (lifecycle deactivate); the engine stays usable."""
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()

    @property
    def graph_cache(self):
        """The CUDA graph cache (graphs.GraphCache) on CUDA, None on CPU: for diagnostics and tests."""
        return getattr(self._runner, "cache", None)

    def weight_bytes(self) -> int:
        """Bytes of the network weights the engine keeps on its device (every precision made so far)."""
        return sum(p.numel() * p.element_size() for module in self._weights.values() for p in module.parameters())

    def backend_memory_bytes(self, plan: Plan | None = None) -> int:
        """Device memory held outside PyTorch's allocator (TensorRT engines: all, or the one of `plan`)."""
        return self._tensorrt.memory_bytes(plan) if self._tensorrt is not None else 0

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

    # --- the shared computation (what the runners run and the CUDA graphs capture) --------------
    def forward_logits(self, frames: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(N, H, W, 3) uint8 on device -> the branch's low-resolution logits (N, C, h, w), torch backend."""
        x = self._network_input(frames, plan.channel_order, plan.network_size, PRECISIONS[plan.precision])
        if plan.high_res_regions:
            result = sparse_logits(self.weights(plan.precision), x, plan.high_res_regions, self.region_selector,
                                   self.region_size)
            self._chosen = (result.chosen, result.grid.size)
            return result.logits
        return self._network(plan.precision)(x, plan.branch)

    def postprocess(self, frames: torch.Tensor, logits: torch.Tensor, plan: Plan,
                    alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Low-resolution logits -> the requested full-resolution outputs, on the device."""
        return postprocess(self.stages, frames, logits, plan, alpha)

    def _labels(self, logits: torch.Tensor, plan: Plan) -> torch.Tensor:
        return upsample_argmax(logits, (plan.height, plan.width), plan.upsample, self.label_dtype)

    def _color(self, labels: torch.Tensor) -> torch.Tensor:
        return colorize_torch(labels, self._palette)

    def _overlay(self, frames: torch.Tensor, color: torch.Tensor, plan: Plan, alpha: torch.Tensor) -> torch.Tensor:
        in_order = color.flip(-1) if plan.channel_order == "bgr" else color
        return overlay_torch(frames, in_order, alpha)

    # --- internals ------------------------------------------------------------------------------
    def _network(self, precision: str):
        """The callable producing branch logits: the module's method, or its torch.compile'd form."""
        module = self.weights(precision)
        if not self.compile:
            return module.branch_logits
        if precision not in self._compiled:
            self._compiled[precision] = torch.compile(module.branch_logits, mode="reduce-overhead")
        return self._compiled[precision]

    def _make_stages(self) -> Stages:
        """The runner's callables. The engine's own methods go in without a reference to the engine
        (weak_method): the engine -> runner -> stages -> engine cycle would keep the model and its
        device memory alive after the last user let go, until some later garbage collection."""
        labels, color, overlay = (weak_method(method) for method in (self._labels, self._color, self._overlay))
        if self._tensorrt is not None:
            return Stages(self._tensorrt, labels, color, overlay, keepalive=self._tensorrt.keepalive)
        return Stages(weak_method(self.forward_logits), labels, color, overlay)

    def _make_runner(self, cuda_graphs: bool, graph_cache_size: int):
        if self.device.type == "cuda":
            from icnet_ros.inference.cuda import CudaRunner

            use_graphs = cuda_graphs and not (self.compile and self.backend == "torch")
            return CudaRunner(self.device, self.stages, use_graphs=use_graphs, cache_size=graph_cache_size)
        return EagerRunner(self.device, self.stages)

    def _plan(self, frames, channel_order, labels, color, overlay) -> tuple[np.ndarray, bool, Plan]:
        batch, single = as_batch(frames)
        if not (labels or color or overlay):
            raise ValueError("nothing to compute: ask for at least one of labels, color, overlay")
        net_height, net_width = network_size(batch.shape[1:3], self.input_size)
        regions = self.high_res_regions if self.branch == "sub124" else 0
        if regions:
            net_height, net_width = sparse_input_size(net_height, net_width)
        plan = Plan(batch.shape[0], batch.shape[1], batch.shape[2], self.branch, self.precision,
                    check_channel_order(channel_order), bool(labels), bool(color), bool(overlay), self.upsample,
                    net_height, net_width, regions)
        return batch, single, plan

    def _alpha_for(self, alpha: float | None) -> int:
        return alpha_weight(self._alpha if alpha is None else alpha)

    def _split(self, outputs: dict[str, np.ndarray], plan: Plan, timings: StageTimings) -> list[Segmentation]:
        """Per-frame Segmentations from batched host outputs."""
        if "labels" in outputs and outputs["labels"].dtype != self.label_numpy_dtype:
            outputs["labels"] = outputs["labels"].astype(self.label_numpy_dtype)
        return [Segmentation(**{name: outputs[name][i] for name in plan.outputs}, timings=timings,
                             batch_size=plan.batch) for i in range(plan.batch)]
