"""The CUDA runner on a GPU: graphs equal eager on every device, flat memory, failed captures, pipelining.

Skipped (with the reason) where PyTorch sees no CUDA GPU; ci/gpu_checks.sh runs them on a lent one.
The policy under the runner (keys, bound, fallback) is tested on CPU in test_graph_cache.py.
"""
from __future__ import annotations

import logging
from itertools import product

import numpy as np
import pytest
import torch
from conftest import trained_bn_model

from icnet_ros.inference import SegmentationEngine, label_agreement
from icnet_ros.inference.benchmark import current_rss_bytes
from icnet_ros.inference.cuda import CudaRunner
from icnet_ros.model import BRANCHES
from icnet_ros.visualization import colorize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none)")

HEIGHT, WIDTH = 128, 256
OUTPUT_SETS = [("labels",), ("color",), ("overlay",), ("labels", "color"), ("labels", "overlay"),
               ("color", "overlay"), ("labels", "color", "overlay")]


def devices() -> list[str]:
    return [f"cuda:{index}" for index in range(min(torch.cuda.device_count(), 2))]


def frames(count: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> list[np.ndarray]:
    """Smooth random frames: regions and edges, each frame different."""
    import cv2

    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
            for _ in range(count)]


def wanted(outputs) -> dict[str, bool]:
    return {name: name in outputs for name in ("labels", "color", "overlay")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")


@pytest.mark.parametrize("device", devices())
def test_graph_replays_equal_eager_for_every_plan(model, device):
    """Every branch x precision x batch x channel order x output set, on cuda:0 and on cuda:1 when present,
    with cuda:0 left the current device: a capture on the wrong device replays stale labels."""
    torch.cuda.set_device(0)
    graphs = SegmentationEngine(model, device=device, backend="torch")
    eager = SegmentationEngine(model, device=device, backend="torch", cuda_graphs=False)
    pool = frames(3, seed=1)
    for branch, precision, batch, order in product(BRANCHES, ("fp32", "fp16"), (1, 2), ("rgb", "bgr")):
        for engine in (graphs, eager):
            engine.branch, engine.precision = branch, precision
        graphs.prepare(HEIGHT, WIDTH, batch, channel_order=order, outputs=("labels", "color", "overlay"))
        for index, outputs in enumerate(OUTPUT_SETS):
            batch_frames = [pool[(index + j) % len(pool)] for j in range(batch)]
            mine = graphs.segment(batch_frames, channel_order=order, **wanted(outputs))
            theirs = eager.segment(batch_frames, channel_order=order, labels=True, color=True, overlay=True)
            where = f"{device} {branch} {precision} batch {batch} {order} {outputs}"
            for seg, ref in zip(mine, theirs):
                assert all((getattr(seg, name) is None) != (name in outputs) for name in wanted(outputs)), where
                if "labels" in outputs:
                    assert label_agreement(seg.labels, ref.labels) >= 0.9999, where
                if "color" in outputs:
                    assert label_agreement(seg.color, ref.color) >= 0.9999, where
                if "overlay" in outputs:
                    assert label_agreement(seg.overlay, ref.overlay) >= 0.999, where
        entry = graphs.graph_cache.peek(graphs._plan(pool[:batch], order, True, True, True)[2])
        assert entry is not None and entry.forward_graph and entry.stage_graphs["dense"] == ["labels", "color", "overlay"]
    consecutive = [graphs.segment(frame).labels for frame in pool]
    assert not np.array_equal(consecutive[0], consecutive[1])  # replays see each new frame
    assert graphs.graph_cache.failures() == {}


def test_memory_stays_flat_over_1000_frames_with_changing_output_sets(model):
    engine = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp16")
    engine.prepare(HEIGHT, WIDTH, outputs=("labels", "color", "overlay"))
    pool = frames(4, seed=2)
    for index in range(2 * len(OUTPUT_SETS)):
        engine.segment(pool[index % 4], **wanted(OUTPUT_SETS[index % len(OUTPUT_SETS)]))
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
    captures, rss = engine.graph_cache.captures, current_rss_bytes()
    pending = None
    for index in range(1000):
        submitted = engine.submit(pool[index % 4], **wanted(OUTPUT_SETS[index % len(OUTPUT_SETS)]))
        if pending is not None:
            engine.collect(pending)
        pending = submitted
    engine.collect(pending)
    torch.cuda.synchronize()
    assert engine.graph_cache.captures == captures  # no capture on the hot path
    assert torch.cuda.memory_allocated(0) - allocated <= 2**20
    assert torch.cuda.memory_reserved(0) == reserved
    assert current_rss_bytes() - rss < 64 * 2**20  # pinned host buffers are reused, not piled up


def test_the_graph_cache_is_bounded_and_evictions_give_memory_back(model):
    """prepare() (off the hot path) evicts to make room; a frame of a new shape with the cache full
    evicts nothing and runs eagerly, with labels equal to eager's."""
    engine = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp16", graph_cache_size=2)
    sizes = [(128, 256), (160, 320), (192, 384)]
    peaks = []
    for _ in range(6):
        for height, width in sizes:
            engine.prepare(height, width, outputs=("labels", "color"))
            engine.segment(frames(1, height, width)[0], color=True)
            assert len(engine.graph_cache) <= 2
        torch.cuda.synchronize()
        peaks.append(torch.cuda.memory_reserved(0))
    assert engine.graph_cache.evictions >= 10
    assert max(peaks[2:]) <= max(peaks[:2]) + 8 * 2**20  # churn does not pile up private pools
    evictions, captures = engine.graph_cache.evictions, engine.graph_cache.captures
    eager = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp16", cuda_graphs=False)
    for frame in frames(3, 224, 448, seed=6):  # a fourth size, never prepared: the cache is full
        assert label_agreement(engine.segment(frame).labels, eager.segment(frame).labels) >= 0.9999
    assert (engine.graph_cache.evictions, engine.graph_cache.captures) == (evictions, captures)
    assert engine.graph_cache.overflows == 3
    engine.close()
    assert len(engine.graph_cache) == 0
    assert engine.segment(frames(1)[0]).labels.shape == (HEIGHT, WIDTH)  # usable after close


def test_a_capture_that_fails_falls_back_to_eager_once(model, monkeypatch, caplog):
    """A forward with a host synchronization cannot be captured: it runs eagerly, logged once, not retried."""
    original = SegmentationEngine.forward_logits

    def syncing_forward(self, frames_, plan):
        logits = original(self, frames_, plan)
        float(logits.flatten()[0])  # .item(): a host sync, illegal while a stream is capturing
        return logits

    attempts = []
    capture_forward = CudaRunner.capture_forward

    def counting_capture(self, state, plan):
        attempts.append(plan.forward_key)
        return capture_forward(self, state, plan)

    monkeypatch.setattr(SegmentationEngine, "forward_logits", syncing_forward)
    monkeypatch.setattr(CudaRunner, "capture_forward", counting_capture)
    engine = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp32")
    eager = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp32", cuda_graphs=False)
    pool = frames(5, seed=3)
    graphs_log = logging.getLogger("icnet_ros.inference.graphs")
    graphs_log.addHandler(caplog.handler)  # under a sourced ROS 2 `launch` stops loggers propagating to root
    try:
        with caplog.at_level(logging.WARNING, logger="icnet_ros.inference.graphs"):
            results = [engine.segment(frame, color=True) for frame in pool]
    finally:
        graphs_log.removeHandler(caplog.handler)
    assert len(attempts) == 1 and len(engine.graph_cache.failures()) == 1
    # a set: where the logger also propagates to root, caplog's handler sees each record twice
    assert len({r for r in caplog.records if "runs eagerly" in r.getMessage()}) == 1
    for frame, seg in zip(pool, results):
        assert label_agreement(seg.labels, eager.segment(frame).labels) >= 0.9999
        assert np.array_equal(seg.color, colorize(seg.labels, engine.class_map.palette()))
    # the failed capture left nothing broken behind: random ops on the device work, and a new shape
    # (whose warm-up input is random) gets its own entry and runs
    assert torch.randint(0, 256, (4,), device="cuda:0").shape == (4,)
    other = frames(1, 96, 192, seed=4)[0]
    assert engine.segment(other).labels.shape == (96, 192)
    assert len(attempts) == 2 and len(engine.graph_cache) == 2


def test_pipelined_results_match_and_are_never_overwritten(model):
    engine = SegmentationEngine(model, device="cuda:0", backend="torch", precision="fp16")
    pool = frames(6, seed=4)
    expected = [engine.segment(frame, color=True) for frame in pool]
    kept = [(seg.labels.copy(), seg.color.copy()) for seg in expected]
    handles = [engine.submit(frame, color=True) for frame in pool[:3]]  # three in flight, two lanes
    results = [engine.collect(handle) for handle in handles]
    results += list(engine.segment_stream(pool[3:], color=True))
    for seg, (labels, color) in zip(results, kept):
        assert np.array_equal(seg.labels, labels) and np.array_equal(seg.color, color)
    for seg, (labels, color) in zip(expected, kept):  # later calls did not write into earlier results
        assert np.array_equal(seg.labels, labels) and np.array_equal(seg.color, color)
    timings = results[-1].timings
    assert timings.forward_ms > 0 and timings.download_ms > 0 and timings.upload_ms > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sparse_regions_on_cuda_agree_with_dense_and_with_the_cpu(model, precision):
    """Sparse inference on the GPU, pipelined (two calls in flight): every region computed gives the
    dense labels, each call gets its own regions, and the choice of regions matches the CPU's."""
    gpu = SegmentationEngine(model, device="cuda", backend="torch", precision=precision, region_size=64,
                             high_res_regions=8)  # 128x256 frames: 2 x 4 regions, all of them
    dense = SegmentationEngine(model, device="cuda", backend="torch", precision=precision)
    pool = frames(2, seed=5)
    first, second = gpu.submit(pool[0]), gpu.submit([pool[1], pool[0]])
    one, pair = gpu.collect(first), gpu.collect(second)
    for result, frame in ((one, pool[0]), (pair[0], pool[1]), (pair[1], pool[0])):
        assert result.regions_computed == 8 and result.labels.shape == (HEIGHT, WIDTH)
        assert label_agreement(result.labels, dense.segment(frame).labels) > 0.995
    gpu.high_res_regions = 2
    cpu = SegmentationEngine(model, device="cpu", region_size=64, high_res_regions=2)
    for frame in pool:
        on_gpu, on_cpu = gpu.segment(frame, color=True), cpu.segment(frame)
        assert on_gpu.regions_computed == 2 and on_gpu.color.shape == (HEIGHT, WIDTH, 3)
        if precision == "fp32":
            assert np.array_equal(on_gpu.regions, on_cpu.regions)
            assert label_agreement(on_gpu.labels, on_cpu.labels) > 0.995
