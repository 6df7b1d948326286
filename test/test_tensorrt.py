"""The TensorRT backend: selection, cache keys and the engine cache on CPU; the build and run on a GPU.

TensorRT needs CUDA, so on a CPU machine these tests check what decides which engine is used and
where it is kept, and that the exported graph TensorRT would build from computes the engine's own
forward. The build/run test skips (saying why) without CUDA and TensorRT.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import trained_bn_model

from icnet_ros.inference import SegmentationEngine, label_agreement, tensorrt
from icnet_ros.inference import engine as engine_module
from icnet_ros.inference.plan import Plan

# torch.onnx's own deprecation warning inside the exporter (as in test_export.py)
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

PLAN = Plan(batch=4, height=1024, width=2048, branch="sub124", precision="fp16", network_height=512,
            network_width=1024)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")


# --- backend selection --------------------------------------------------------------------------------
def test_auto_and_torch_select_torch_on_the_cpu(model):
    cpu = torch.device("cpu")
    assert engine_module.resolve_backend("torch", cpu) == "torch"
    assert engine_module.resolve_backend("auto", cpu) == "torch"
    assert SegmentationEngine(model, device="cpu").backend == "torch"


def test_auto_selects_tensorrt_on_cuda_only_when_it_can_run(monkeypatch):
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    monkeypatch.setattr(tensorrt, "available", lambda: True)
    assert engine_module.resolve_backend("auto", cuda) == "tensorrt"
    assert engine_module.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(tensorrt, "available", lambda: False)
    assert engine_module.resolve_backend("auto", cuda) == "torch"


def test_tensorrt_asked_for_but_missing_says_what_to_install(monkeypatch):
    real_import = tensorrt.importlib.import_module

    def without_tensorrt(name, *args):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args)

    monkeypatch.setattr(tensorrt.importlib, "import_module", without_tensorrt)
    assert not tensorrt.available()
    with pytest.raises(tensorrt.TensorRTError, match=r"icnet-ros\[tensorrt\]"):
        engine_module.resolve_backend("tensorrt", torch.device("cuda", 0))


def test_tensorrt_on_the_cpu_and_unknown_backends_are_rejected(model):
    with pytest.raises(ValueError, match="CUDA"):
        SegmentationEngine(model, device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="backend must be one of"):
        SegmentationEngine(model, device="cpu", backend="onnxruntime")


# --- the cache key --------------------------------------------------------------------------------------
def key_for(plan=PLAN, model_hash="m" * 64, gpu="NVIDIA H200", capability="9.0", version="10.16.1"):
    return tensorrt.engine_key(model_hash, plan, gpu, capability, version)


def test_the_key_follows_the_network_not_the_frames_or_batch():
    key = key_for()
    assert (key.height, key.width, key.batch, key.branch, key.precision) == (512, 1024, 1, "sub124", "fp16")
    same_network = [replace(PLAN, batch=1), replace(PLAN, height=720, width=1280), replace(PLAN, color=True),
                    replace(PLAN, channel_order="bgr"), replace(PLAN, upsample="dense")]
    assert {key_for(plan).digest for plan in same_network} == {key.digest}
    assert key.filename.startswith("icnet_sub124_512x1024_b1_fp16_") and key.filename.endswith(".engine")


def test_every_part_of_the_key_changes_the_file():
    digests = {key_for().digest,
               key_for(replace(PLAN, branch="sub4")).digest,
               key_for(replace(PLAN, precision="fp32")).digest,
               key_for(replace(PLAN, network_height=0, network_width=0)).digest,  # the frame's own size
               key_for(model_hash="n" * 64).digest,
               key_for(gpu="NVIDIA H100 80GB HBM3").digest,
               key_for(capability="8.9").digest,
               key_for(version="10.13.3").digest,
               replace(key_for(), format=tensorrt.ENGINE_FORMAT + 1).digest}
    assert len(digests) == 9


def test_model_fingerprint_follows_the_weights_and_the_configuration(model):
    fingerprint = tensorrt.model_fingerprint(model)
    assert tensorrt.model_fingerprint(copy.deepcopy(model)) == fingerprint
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert tensorrt.model_fingerprint(changed) != fingerprint
    other_config = copy.deepcopy(model)
    other_config.config = replace(model.config, input_size=(512, 1024))
    assert tensorrt.model_fingerprint(other_config) != fingerprint


def test_engines_are_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    builds = []
    key = key_for()

    def build():
        builds.append(1)
        return b"serialized engine"

    assert tensorrt.cached_engine(tmp_path, key, build) == b"serialized engine"
    assert tensorrt.cached_engine(tmp_path, key, build) == b"serialized engine"
    assert len(builds) == 1
    assert (tmp_path / key.filename).read_bytes() == b"serialized engine"
    assert tensorrt.describe_engine_cache(tmp_path) == [json.loads(json.dumps(key.__dict__))]
    tensorrt.cached_engine(tmp_path, key_for(replace(PLAN, precision="fp32")), build)
    assert len(builds) == 2
    monkeypatch.setenv("ICNET_ROS_CACHE", str(tmp_path / "cache"))
    assert tensorrt.cache_folder() == tmp_path / "cache" / "tensorrt"


def test_a_failed_build_leaves_no_cache_file(tmp_path):
    def failing():
        raise tensorrt.TensorRTError("TensorRT failed to build (simulated)")

    with pytest.raises(tensorrt.TensorRTError):
        tensorrt.cached_engine(tmp_path, key_for(), failing)
    assert list(tmp_path.iterdir()) == []


# --- the build, against a stand-in of the TensorRT 10 Python API ----------------------------------------------
class FakeTensorRT:
    """Records the calls build_engine makes, with TensorRT 10's names; `flags` are the BuilderFlag members."""

    def __init__(self, flags=("FP16", "BF16"), parse_ok=True):
        calls = self.calls = []
        self.__version__ = "10.16.1"
        self.BuilderFlag = type("BuilderFlag", (), {name: name for name in flags})
        self.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "workspace"})

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                calls.append(("logger", level))

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def create_timing_cache(self, data):
                calls.append(("timing cache", data))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set timing cache", ignore_mismatch))

        class Builder:
            def __init__(self, logger):
                calls.append(("builder",))

            def create_network(self, flags):
                calls.append(("network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                calls.append(("build", network))
                return b"plan"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                calls.append(("parser", network))

            def parse_from_file(self, path):
                calls.append(("parse", path))
                return parse_ok

            def get_error(self, index):
                return "Unsupported operator (simulated)"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def test_build_engine_uses_the_tensorrt_10_calls_and_keeps_a_timing_cache(tmp_path):
    trt = FakeTensorRT()
    cache = tensorrt.timing_cache_path(tmp_path, key_for())
    assert tensorrt.build_engine(trt, tmp_path / "m.onnx", "fp16", timing_cache=cache) == b"plan"
    names = [call[0] for call in trt.calls]
    assert names.index("network") < names.index("parse") < names.index("flag") < names.index("build")
    assert ("network", 0) in trt.calls and ("flag", "FP16") in trt.calls
    assert ("pool", "workspace", tensorrt.WORKSPACE_BYTES) in trt.calls
    assert ("timing cache", b"") in trt.calls and cache.read_bytes() == b"+timings"
    tensorrt.build_engine(trt, tmp_path / "m.onnx", "fp32", timing_cache=cache)
    assert ("timing cache", b"+timings") in trt.calls  # the second build starts from the first one's timings
    assert [c for c in trt.calls if c[0] == "flag"] == [("flag", "FP16")]  # fp32: no precision flag


def test_timing_caches_are_shared_across_networks_but_not_precisions_or_gpus(tmp_path):
    path = tensorrt.timing_cache_path
    assert path(tmp_path, key_for()) == path(tmp_path, key_for(replace(PLAN, branch="sub4", network_height=256)))
    assert path(tmp_path, key_for()) == path(tmp_path, key_for(model_hash="n" * 64))
    assert path(tmp_path, key_for()) != path(tmp_path, key_for(replace(PLAN, precision="fp32")))
    assert path(tmp_path, key_for()) != path(tmp_path, key_for(gpu="NVIDIA L4"))


def test_tensorrt_11_and_parse_errors_are_reported_clearly(tmp_path):
    with pytest.raises(tensorrt.TensorRTError, match="TensorRT 11 removed"):
        tensorrt.build_engine(FakeTensorRT(flags=()), tmp_path / "m.onnx", "fp16")
    assert tensorrt.build_engine(FakeTensorRT(flags=()), tmp_path / "m.onnx", "fp32") == b"plan"
    with pytest.raises(tensorrt.TensorRTError, match="Unsupported operator"):
        tensorrt.build_engine(FakeTensorRT(parse_ok=False), tmp_path / "m.onnx", "fp16")


# --- what TensorRT is built from ---------------------------------------------------------------------------
def test_the_exported_graph_computes_the_engines_branch_logits(model, tmp_path):
    """The static ONNX graph TensorRT parses (float32 RGB 0..255 in, branch logits out), run with
    onnxruntime, against the torch backend's forward_logits on the same BGR frames."""
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    pytest.importorskip("onnxscript", reason="the exporter needs onnxscript (export extra)")
    engine = SegmentationEngine(model, device="cpu", branch="sub24")
    height, width = 64, 96
    path = tensorrt.export_branch_onnx(model, tmp_path / "branch.onnx", "sub24", height, width)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    image = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2)).astype(np.float32)  # what TensorRT gets
    (got,) = session.run(None, {"image": image})
    plan = engine._plan(bgr, "bgr", True, False, False)[2]
    with torch.inference_mode():
        expected = engine.forward_logits(torch.from_numpy(bgr), plan).float().numpy()
    assert got.shape == expected.shape and got.shape[2:] == (height // 8, width // 8)  # sub24: 1/8 resolution
    assert np.abs(got - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())
    assert label_agreement(got.argmax(1), expected.argmax(1)) >= 0.999


# --- on a GPU with TensorRT ------------------------------------------------------------------------------
def gpu_and_tensorrt() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (TensorRT runs on CUDA only)"
    if not tensorrt.available():
        return f"TensorRT is not installed: {tensorrt.INSTALL_HINT}"
    return None


@pytest.mark.skipif(gpu_and_tensorrt() is not None, reason=str(gpu_and_tensorrt()))
def test_tensorrt_fp16_agrees_with_fp32_eager_and_is_cached(model, tmp_path):
    frames = [np.ascontiguousarray(np.random.default_rng(s).integers(0, 256, (256, 512, 3), dtype=np.uint8))
              for s in range(3)]
    reference = SegmentationEngine(model, device="cuda", backend="torch", precision="fp32", cuda_graphs=False)
    engine = SegmentationEngine(model, device="cuda", backend="tensorrt", precision="fp16",
                                tensorrt_cache=tmp_path)
    engine.prepare(256, 512, outputs=("labels", "color"))
    cached = sorted(tmp_path.glob("*.engine"))
    assert len(cached) == 1
    mine = [engine.segment(frame).labels for frame in frames]
    assert label_agreement(mine, [reference.segment(frame).labels for frame in frames]) >= 0.99
    batch = engine.segment(frames, color=True)  # a batch runs the batch-1 engine per frame
    assert all(np.array_equal(seg.labels, labels) for seg, labels in zip(batch, mine))
    mtime = cached[0].stat().st_mtime_ns
    again = SegmentationEngine(model, device="cuda", backend="tensorrt", precision="fp16", tensorrt_cache=tmp_path)
    assert np.array_equal(again.segment(frames[0]).labels, mine[0])
    assert sorted(tmp_path.glob("*.engine")) == cached and cached[0].stat().st_mtime_ns == mtime
    assert engine.backend_memory_bytes() > 0


# --- running a batch, against a stand-in of TensorRT 10's runtime ------------------------------------------
class FakeRuntimeTensorRT:
    """TensorRT 10's runtime API as TensorRTModule uses it, run on the CPU: a 'network' of the static
    shapes given (input (1, 3, H, W) float32, output (1, C, h, w)), computing `network` from the memory
    at the addresses it was given (read through ctypes, as the real engine reads device memory).

    Like the real context, set_tensor_address refuses (returns False, keeps the old address) an
    address that is not 256-byte aligned, or a name it does not know; execute_async_v3 returns False
    while an address was never set, or when `fail_execute` is set.
    """

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class DataType:
        FLOAT, HALF = "float", "half"

    def __init__(self, input_shape, output_shape, network, output_dtype=torch.float32, fail_execute=False):
        fake = self
        self.executions: list[dict] = []
        self.refused: list[tuple[str, int]] = []

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                pass

        class Context:
            def __init__(self):
                self.addresses = {}

            def set_tensor_address(self, name, address):
                if name not in ("image", "logits") or address % 256:
                    fake.refused.append((name, address))
                    return False
                self.addresses[name] = address
                return True

            def execute_async_v3(self, stream):
                if fail_execute or set(self.addresses) != {"image", "logits"}:  # an address never set: refused
                    return False
                image = _at(self.addresses["image"], input_shape, torch.float32)
                logits = _at(self.addresses["logits"], output_shape, output_dtype)
                logits.copy_(network(image))
                fake.executions.append({"stream": stream, **self.addresses})
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, index):
                return ("image", "logits")[index]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name == "image" else fake.TensorIOMode.OUTPUT

            def get_tensor_shape(self, name):
                return input_shape if name == "image" else output_shape

            def get_tensor_dtype(self, name):
                if name == "logits" and output_dtype == torch.float16:
                    return fake.DataType.HALF
                return fake.DataType.FLOAT

            def create_execution_context(self):
                return Context()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine()

        self.Logger, self.Runtime = Logger, Runtime


def _at(address: int, shape, dtype) -> torch.Tensor:
    """The CPU memory at `address` as a tensor of `shape` (what an engine reads and writes)."""
    import ctypes

    count = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_uint8 * count).from_address(address), dtype=torch.uint8).view(dtype).view(shape)


def toy_network(channels, size):
    def network(image):  # (1, 3, H, W) -> (1, channels, h, w), every channel different
        pooled = torch.nn.functional.adaptive_avg_pool2d(image, size)
        return torch.cat([pooled.sum(1, keepdim=True) * (c + 1) + c for c in range(channels)], 1)
    return network


@pytest.fixture
def cpu_stream(monkeypatch):
    """torch.cuda.current_stream on a CPU machine: a stream handle for execute_async_v3."""
    stream = type("Stream", (), {"cuda_stream": 1234})()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    return stream


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("size, batch", [((33, 65), 4), ((33, 65), 1), ((32, 64), 3)])
def test_every_frame_of_a_batch_runs_at_aligned_addresses(cpu_stream, size, batch, output_dtype):
    """A frame's slice of a batch is not 256-byte aligned (here 3x33x65 float32 is 140 bytes past),
    which TensorRT refuses: each frame must still be computed from its own pixels."""
    network = toy_network(5, (9, 17))
    trt = FakeRuntimeTensorRT((1, 3, *size), (1, 5, 9, 17), network, output_dtype)
    module = tensorrt.TensorRTModule(trt, b"engine", torch.device("cpu"))
    x = torch.rand(batch, 3, *size) * 255
    if batch == 1:
        x = torch.rand(2 * x.numel() + 64)[16:16 + x.numel()].view(x.shape)  # a misaligned start: 64 bytes past
    out = module.run(x)
    assert trt.refused == [] and len(trt.executions) == batch
    assert out.shape == (batch, 5, 9, 17) and out.dtype == output_dtype and out.is_contiguous()
    for index in range(batch):
        assert torch.equal(out[index:index + 1], network(x[index:index + 1]).to(output_dtype)), index
    images = {run["image"] for run in trt.executions}
    assert len(images) == batch and all(address % 256 == 0 for address in images)
    assert {run["stream"] for run in trt.executions} == {1234}


def test_a_refused_address_or_a_failed_execution_is_an_error(cpu_stream, monkeypatch):
    network = toy_network(2, (4, 8))
    x = torch.rand(2, 3, 32, 64)
    refusing = FakeRuntimeTensorRT((1, 3, 32, 64), (1, 2, 4, 8), network)
    module = tensorrt.TensorRTModule(refusing, b"engine", torch.device("cpu"))
    module.output_name = "scores"  # a name this engine does not have: the context refuses it
    with pytest.raises(tensorrt.TensorRTError, match="refused the address .* of tensor 'scores'"):
        module.run(x)
    failing = FakeRuntimeTensorRT((1, 3, 32, 64), (1, 2, 4, 8), network, fail_execute=True)
    with pytest.raises(tensorrt.TensorRTError, match="execute_async_v3 failed"):
        tensorrt.TensorRTModule(failing, b"engine", torch.device("cpu")).run(x)
    # an unaligned address never reaches the context: the module stages the batch instead
    monkeypatch.setattr(tensorrt, "is_aligned", lambda batch: True)  # as the old code assumed
    trusting = FakeRuntimeTensorRT((1, 3, 33, 65), (1, 2, 4, 8), network)
    with pytest.raises(tensorrt.TensorRTError, match=r"must be 256-byte aligned; this one is \d+ bytes past"):
        tensorrt.TensorRTModule(trusting, b"engine", torch.device("cpu")).run(
            tensorrt.aligned_frames((2, 3, 33, 65), torch.float32, "cpu").contiguous())
