"""The optional TensorRT backend: ONNX from our exporter -> a TensorRT engine, built once, cached on disk.

    pip install icnet-ros[tensorrt]      # TensorRT 10 (11 removed the fp16 builder flag used here)
    engine = SegmentationEngine.from_checkpoint(path, device="cuda", backend="tensorrt")

What runs: the engine's own channel handling and resize on the device (frames -> float32 RGB
0..255 at the network size, as the exported graph takes them), then the TensorRT engine of the
branch (normalization and the BN-folded network inside, low-resolution logits out), then the
engine's usual postprocess (labels at the frame size, colors, overlay). So both backends share
everything but the network, and label agreement with fp32 eager is measured the same way.

One TensorRT engine per (branch, network size, precision), static shape, batch 1: a batch of N
frames runs the engine N times on the same stream (this keeps one engine for every batch size, and
works for the released Caffe nets, whose pyramid pooling can only be exported at a fixed size).
TensorRT wants every tensor address 256-byte aligned, and a frame's slice of a batch is not (at
1025x2049 an input frame is 12 bytes past a multiple of 256; the CamVid model's logits at 1024x2048
128 bytes), so a batch is staged in buffers whose per-frame stride is rounded up to 256 bytes
(aligned_frames), and every set_tensor_address / execute_async_v3 status is checked.

One execution context per engine, shared by every graph that replays it: the context's activation
memory is baked into those graphs, so they must never run at the same time. The CUDA runner runs
them all on its compute stream, and orders the warm-up before a capture (on its capture stream)
after the compute stream's work and before its next frame (cuda.py, CudaRunner._warm_up).

Serialized engines are cached under $ICNET_ROS_CACHE/tensorrt (else ~/.cache/icnet_ros/tensorrt),
named by a key of GPU name and compute capability, TensorRT version, shape, precision, branch and a
hash of the model's weights and configuration: a new GPU, TensorRT or checkpoint builds anew.

Nothing here is imported by the core unless this backend is asked for; `available()` says whether
it can be. The build and run code needs CUDA and TensorRT and is exercised by the GPU tests; the
key, cache and selection logic is tested on CPU.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icnet_ros.atomic import atomic_write_bytes, atomic_write_text
from icnet_ros.inference.plan import Plan
from icnet_ros.model.icnet import ICNet
from icnet_ros.model.preprocess import normalize, resize_input

LOG = logging.getLogger(__name__)
ENGINE_FORMAT = 1  # bump when the exported graph or the build settings change: old cache files are ignored
WORKSPACE_BYTES = 1 << 30  # TensorRT's scratch memory limit while building (tactics that need more are skipped)
MODULES_KEPT = 4  # TensorRT engines kept deserialized (one per branch, network size and precision)
INSTALL_HINT = "pip install 'icnet-ros[tensorrt]' (TensorRT 10 with the ONNX exporter's packages)"


class TensorRTError(RuntimeError):
    """TensorRT could not be used: not installed, no CUDA, an unsupported version, or a failed build."""


# --- availability -----------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, or TensorRTError saying what to install. The exporter's packages are checked too."""
    missing = []
    for name in ("tensorrt", "onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a TensorRT wheel whose CUDA libraries do not load
            missing.append(f"{name} ({type(error).__name__}: {error})")
    if missing:
        raise TensorRTError(f"the TensorRT backend needs {', '.join(missing)}; {INSTALL_HINT}")
    return importlib.import_module("tensorrt")


def available() -> bool:
    """Whether import_tensorrt() would succeed."""
    try:
        import_tensorrt()
    except TensorRTError:
        return False
    return True


# --- the cache key ----------------------------------------------------------------------------------
def model_fingerprint(model: ICNet) -> str:
    """sha256 of the model's configuration and every parameter and buffer (names, dtypes, shapes, bytes)."""
    from icnet_ros.config import config_to_dict

    digest = hashlib.sha256(json.dumps(config_to_dict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized TensorRT engine depends on; its digest names the cache file."""

    gpu: str
    compute_capability: str
    tensorrt: str
    branch: str
    height: int
    width: int
    batch: int
    precision: str
    model: str  # model_fingerprint
    format: int = ENGINE_FORMAT

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    @property
    def filename(self) -> str:
        return f"icnet_{self.branch}_{self.height}x{self.width}_b{self.batch}_{self.precision}_{self.digest}.engine"


def engine_key(model_hash: str, plan: Plan, gpu: str, compute_capability: str, tensorrt_version: str) -> EngineKey:
    """The key of the engine that runs `plan`'s network (its network size, branch and precision, batch 1)."""
    height, width = plan.network_size
    return EngineKey(gpu, compute_capability, tensorrt_version, plan.branch, int(height), int(width), 1,
                     plan.precision, model_hash)


def cache_folder() -> Path:
    """$ICNET_ROS_CACHE/tensorrt, else $XDG_CACHE_HOME/icnet_ros/tensorrt, else ~/.cache/icnet_ros/tensorrt."""
    from icnet_ros.demo import cache_dir

    return cache_dir() / "tensorrt"


def cached_engine(folder: Path, key: EngineKey, build) -> bytes:
    """The serialized engine for `key`: read from `folder`, or made by build() and stored there atomically.

    A JSON file beside each engine records its key, for people looking at the cache.
    """
    path = Path(folder) / key.filename
    if path.is_file():
        return path.read_bytes()
    data = bytes(build())
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_suffix(".json"), json.dumps(asdict(key), indent=2) + "\n")
    return data


# --- ONNX and the build -----------------------------------------------------------------------------
def export_branch_onnx(model: ICNet, path: Path, branch: str, height: int, width: int) -> Path:
    """Our exporter's static-shape graph (normalization + folded network), ending at the branch logits:
    the engine upsamples to the frame size itself (exactly, on the device), as forward_logits does.

    Input `image`: float32 (1, 3, height, width) RGB 0..255; output `logits`: (1, C, h, w).
    """
    from icnet_ros.model.export import export_onnx

    network = copy.deepcopy(model).to("cpu").eval()
    return export_onnx(network, Path(path), branch, height, width, dynamic=False, full_resolution=False)


def timing_cache_path(folder: Path, key: EngineKey) -> Path:
    """The builder's layer-timing cache shared by every engine of one GPU, TensorRT version and precision.

    Keep rates and branches share most layers' shapes, so later builds reuse earlier timings.
    """
    shared = {"gpu": key.gpu, "compute_capability": key.compute_capability, "tensorrt": key.tensorrt,
              "precision": key.precision, "format": key.format}
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"timing_{key.precision}_{digest}.cache"


def build_engine(trt, onnx_path: Path, precision: str, workspace_bytes: int = WORKSPACE_BYTES,
                 timing_cache: Path | None = None) -> bytes:
    """A serialized TensorRT engine from an ONNX file (TensorRT 10 API), in `precision`.

    timing_cache: a file of layer timings to start from and to update (faster rebuilds).
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    flag = {"fp32": None, "fp16": "FP16", "bf16": "BF16"}[precision]
    if flag is not None:
        if not hasattr(trt.BuilderFlag, flag):
            raise TensorRTError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (TensorRT 11 removed the "
                                f"precision flags); use TensorRT 10 ({INSTALL_HINT}) or precision fp32")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: a cache from another GPU or version is not used
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} in {precision} (see its log above)")
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    return bytes(serialized)


# --- running ----------------------------------------------------------------------------------------
TENSOR_ALIGNMENT = 256  # bytes: TensorRT's requirement for every input and output address


def is_aligned(batch: torch.Tensor) -> bool:
    """Whether every frame of a contiguous (N, ...) batch starts at a TENSOR_ALIGNMENT-aligned address."""
    if not batch.is_contiguous():
        return False
    frame_bytes = batch[0].numel() * batch.element_size()
    return batch.data_ptr() % TENSOR_ALIGNMENT == 0 and (batch.shape[0] == 1 or frame_bytes % TENSOR_ALIGNMENT == 0)


def aligned_frames(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty (N, ...) tensor whose frames each start at a TENSOR_ALIGNMENT-aligned address: one
    buffer, the frame stride rounded up to the alignment, the start moved up to the next aligned byte."""
    shape = tuple(int(n) for n in shape)
    element = torch.empty((), dtype=dtype).element_size()
    frame = 1
    for n in shape[1:]:
        frame *= n
    step = TENSOR_ALIGNMENT // element
    stride = -(-frame // step) * step  # elements per frame, rounded up to whole alignment units
    storage = torch.empty(stride * shape[0] + step, dtype=dtype, device=device)
    offset = (-storage.data_ptr() % TENSOR_ALIGNMENT) // element
    frames = storage[offset:offset + stride * shape[0]].view(shape[0], stride)[:, :frame]
    return frames.reshape(shape) if stride == frame else frames.unflatten(1, shape[1:])


class TensorRTModule:
    """One deserialized engine and its execution context: (1, 3, h, w) float32 in, (1, C, h', w') logits out."""

    def __init__(self, trt, data: bytes, device: torch.device) -> None:
        self.device = device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise TensorRTError("TensorRT could not deserialize the cached engine; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise TensorRTError(f"expected one input and one output tensor, found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.output_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        self.output_dtype = torch.float16 if self.engine.get_tensor_dtype(self.output_name) == trt.DataType.HALF \
            else torch.float32
        self.serialized_bytes = len(data)

    def device_memory_bytes(self) -> int:
        """Activation memory TensorRT allocates for the context, plus the engine's size as a bound on weights."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        if size is None:
            size = getattr(self.engine, "device_memory_size", 0)
        return int(size) + self.serialized_bytes

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of x (N, 3, h, w) float32 contiguous, enqueued on the current stream, one frame at a time.

        Each frame's input and output lie at 256-byte aligned addresses (TensorRT refuses others):
        the batch is staged in padded buffers unless it is already aligned (a single frame from
        PyTorch's allocator is).
        """
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise TensorRTError(f"TensorRT engine built for input {self.input_shape}, got {tuple(x.shape)}")
        inputs = x if is_aligned(x) else aligned_frames(x.shape, x.dtype, x.device)
        if inputs is not x:
            inputs.copy_(x)
        outputs = aligned_frames((x.shape[0], *self.output_shape[1:]), self.output_dtype, x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        for index in range(x.shape[0]):
            self._bind(self.input_name, inputs[index])
            self._bind(self.output_name, outputs[index])
            if not self.context.execute_async_v3(stream):
                raise TensorRTError("TensorRT execute_async_v3 failed (see its log above)")
        return outputs if outputs.is_contiguous() else outputs.contiguous()

    def _bind(self, name: str, frame: torch.Tensor) -> None:
        address = frame.data_ptr()
        if not self.context.set_tensor_address(name, address):
            raise TensorRTError(f"TensorRT refused the address {address:#x} of tensor {name!r} (it must be "
                                f"{TENSOR_ALIGNMENT}-byte aligned; this one is {address % TENSOR_ALIGNMENT} bytes past)")


class TensorRTForward:
    """The engine's forward(frames, plan) through TensorRT; engines are built or loaded on first use.

    model: the (unfolded) ICNet the engine was made from; its CPU copy is exported when an engine
    has to be built. folder: the cache folder (default cache_folder()).
    """

    def __init__(self, model: ICNet, device: torch.device, folder: Path | None = None) -> None:
        self.trt = import_tensorrt()
        if device.type != "cuda":
            raise TensorRTError(f"the TensorRT backend runs on CUDA devices, not {device}")
        self.model = model
        self.device = device
        self.folder = Path(folder) if folder is not None else cache_folder()
        self.fingerprint = model_fingerprint(model)
        self._rgb_mean = torch.zeros((1, 3, 1, 1), device=device)
        self._unit_std = torch.ones((1, 3, 1, 1), device=device)
        self._modules: OrderedDict[EngineKey, TensorRTModule] = OrderedDict()
        self._keys: dict[tuple, EngineKey] = {}

    def key(self, plan: Plan) -> EngineKey:
        shape = (plan.branch, plan.network_size, plan.precision)
        key = self._keys.get(shape)
        if key is None:
            properties = torch.cuda.get_device_properties(self.device)
            key = self._keys[shape] = engine_key(self.fingerprint, plan, properties.name,
                                                 f"{properties.major}.{properties.minor}", self.trt.__version__)
        return key

    def module(self, plan: Plan) -> TensorRTModule:
        """The engine for plan's branch, network size and precision (built once, then from the cache)."""
        key = self.key(plan)
        module = self._modules.get(key)
        if module is None:
            with torch.cuda.device(self.device):
                module = TensorRTModule(self.trt, cached_engine(self.folder, key, lambda: self._build(key)),
                                        self.device)
            while len(self._modules) >= MODULES_KEPT:
                self._modules.popitem(last=False)  # graphs that replay it hold their own reference
            self._modules[key] = module
        else:
            self._modules.move_to_end(key)
        return module

    keepalive = module  # the CUDA runner keeps the module of every captured graph alive

    def __call__(self, frames: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(N, H, W, 3) uint8 frames on the device -> the branch logits (N, C, h, w), float32."""
        module = self.module(plan)
        # the exported graph normalizes itself and takes RGB 0..255: mean 0, std 1 here
        x = normalize(frames, self._rgb_mean, self._unit_std, plan.channel_order, "rgb", torch.float32)
        x = resize_input(x, plan.network_size).contiguous()  # NCHW, as TensorRT's input binding is
        return module.run(x).float()

    def memory_bytes(self, plan: Plan | None = None) -> int:
        """Device memory loaded engines hold outside PyTorch's allocator: all of them, or `plan`'s (0 if not loaded)."""
        if plan is not None:
            module = self._modules.get(self.key(plan))
            return module.device_memory_bytes() if module is not None else 0
        return sum(module.device_memory_bytes() for module in self._modules.values())

    def _build(self, key: EngineKey) -> bytes:
        LOG.warning("building a TensorRT engine for %s %dx%d %s on %s (once; cached in %s)", key.branch, key.height,
                    key.width, key.precision, key.gpu, self.folder)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="icnet_trt_") as tmp:
            onnx_path = export_branch_onnx(self.model, Path(tmp) / "network.onnx", key.branch, key.height, key.width)
            data = build_engine(self.trt, onnx_path, key.precision, timing_cache=timing_cache_path(self.folder, key))
        LOG.warning("TensorRT engine built in %.0f s", time.perf_counter() - start)
        return data


def describe_engine_cache(folder: Path | None = None) -> list[dict[str, Any]]:
    """The keys of the engines cached in `folder` (from their JSON files), for diagnostics."""
    folder = Path(folder) if folder is not None else cache_folder()
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
