"""The CUDA runner's plumbing on CPU: torch.cuda replaced by a recording stand-in, graphs by re-running.

What this can show without a GPU: the data flow (each frame reaches the static input before a replay,
the stages replay in order, outputs go through the double buffer to the right host arrays), that the
hot path of a prepared shape never synchronizes, captures or collects memory, that every stream, event
and capture is made inside the engine's device context (what a cuda:1 engine needs), and the eager
fallback after a failed capture. What it cannot show (real streams, graphs, pinned memory) is in
test_engine_gpu.py.
"""
from __future__ import annotations

import contextlib
import time
from itertools import count

import numpy as np
import pytest
import torch
from conftest import trained_bn_model

from icnet_ros.inference import SegmentationEngine
from icnet_ros.inference import cuda as cuda_module
from icnet_ros.inference.cuda import CudaRunner

OUTPUT_SETS = [("labels",), ("color",), ("overlay",), ("labels", "color", "overlay"), ("labels", "overlay")]


class FakeCuda:
    """Stands in for the torch.cuda calls cuda.py makes; records them and checks the device context."""

    def __init__(self):
        self.depth = 0  # nesting of torch.cuda.device(...)
        self.devices: list = []
        self.counts = {"synchronize": 0, "empty_cache": 0, "pool": 0, "capture": 0, "stream": 0}
        self.outside_device: list[str] = []
        self.default = self.Stream(None, check=False)
        self.current = self.default

    def inside(self, what: str) -> None:
        if self.depth == 0:
            self.outside_device.append(what)

    # the API
    def Stream(self, device=None, check=True):
        fake = self
        if check:
            self.inside("Stream()")
            self.counts["stream"] += 1

        class FakeStream:
            cuda_stream = next(_ids)

            def wait_stream(self, other):
                fake.inside("wait_stream")

            def wait_event(self, event):
                fake.inside("wait_event")

        return FakeStream()

    def Event(self, enable_timing=False):
        fake = self

        class FakeEvent:
            at = None

            def record(self, stream=None):
                fake.inside("Event.record")
                self.at = time.perf_counter()

            def synchronize(self):
                assert self.at is not None, "waiting for an event that was never recorded"

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3

        return FakeEvent()

    @contextlib.contextmanager
    def device(self, device):
        self.depth += 1
        self.devices.append(device)
        try:
            yield
        finally:
            self.depth -= 1

    @contextlib.contextmanager
    def stream(self, stream):
        self.inside("stream()")
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def current_stream(self, device=None):
        return self.current

    def set_stream(self, stream):
        self.current = stream

    def graph_pool_handle(self):
        self.inside("graph_pool_handle")
        self.counts["pool"] += 1
        return object()

    def synchronize(self, device=None):
        self.counts["synchronize"] += 1

    def empty_cache(self):
        self.counts["empty_cache"] += 1

    def current_device(self):
        return 0


_ids = count(1)


class FakeGraph:
    """A 'captured' function: replay recomputes it from the same static inputs into the same output."""

    def __init__(self, function, output):
        self.function, self.output, self.replays = function, output, 0

    def replay(self):
        self.output.copy_(self.function())
        self.replays += 1

    def reset(self):
        self.function = None


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Stream", "Event", "device", "stream", "current_stream", "set_stream", "graph_pool_handle",
                 "synchronize", "empty_cache", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(cuda_module, "pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))

    def capture(runner, function, pool):
        fake.inside("capture")
        fake.counts["capture"] += 1
        with torch.inference_mode():
            output = function()
        return FakeGraph(function, output), output

    monkeypatch.setattr(CudaRunner, "_capture", capture)
    return fake


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    return SegmentationEngine(model, device="cpu", upsample="dense")  # dense: the stages are captured


def frames(n, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    return [cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (0, 0), 3) for _ in range(n)]


def run(runner, engine, frame, outputs, order="rgb"):
    wanted = [name in outputs for name in ("labels", "color", "overlay")]
    batch, _, plan = engine._plan(frame, order, *wanted)
    return runner.submit(batch, plan, 128), plan


def expected(engine, frame, outputs, order="rgb"):
    return engine.segment(frame, channel_order=order, **{name: name in outputs for name in
                                                         ("labels", "color", "overlay")})


def assert_same(host, seg, outputs):
    assert sorted(host) == sorted(outputs)
    for name in outputs:
        assert np.array_equal(host[name][0], getattr(seg, name)), name


def test_graph_path_results_equal_the_eager_runner(fake_cuda, engine):
    runner = CudaRunner(torch.device("cpu"), engine.stages)
    pool = frames(4)
    for index, frame in enumerate(pool * 2):
        outputs = OUTPUT_SETS[index % len(OUTPUT_SETS)]
        order = "bgr" if index % 3 == 0 else "rgb"
        work, _ = run(runner, engine, frame, outputs, order)
        host, timings = runner.collect(work)
        assert_same(host, expected(engine, frame, outputs, order), outputs)
        assert 0 < timings.forward_ms <= timings.total_ms  # the forward is timed, and within the frame
    entry = runner.cache.peek(engine._plan(pool[0], "rgb", True, False, False)[2])
    assert entry.forward_graph and entry.state.forward_graph.replays >= 4  # the graphs really replayed
    assert runner.cache.failures() == {}


def test_calls_in_flight_keep_their_own_results(fake_cuda, engine):
    runner = CudaRunner(torch.device("cpu"), engine.stages)
    pool = frames(5, seed=1)
    works = [run(runner, engine, frame, ("labels", "color"))[0] for frame in pool]  # 5 in flight, 2 lanes
    for frame, work in reversed(list(zip(pool, works))):
        host, _ = runner.collect(work)
        assert_same(host, expected(engine, frame, ("labels", "color")), ("labels", "color"))


def test_a_prepared_shape_never_synchronizes_captures_or_frees_on_the_hot_path(fake_cuda, engine):
    runner = CudaRunner(torch.device("cpu"), engine.stages)
    prepared = engine._plan(frames(1)[0], "rgb", True, True, True)[2]
    runner.prepare(prepared)
    assert fake_cuda.counts["capture"] == 4  # forward, labels, color, overlay
    before = dict(fake_cuda.counts)
    for index, frame in enumerate(frames(3, seed=2) * 5):
        runner.collect(run(runner, engine, frame, OUTPUT_SETS[index % len(OUTPUT_SETS)])[0])
    assert fake_cuda.counts == before  # no synchronize, empty_cache, capture, pool or stream per frame


def test_every_stream_event_and_capture_is_made_on_the_engines_device(fake_cuda, engine):
    runner = CudaRunner(torch.device("cpu"), engine.stages)
    for index, frame in enumerate(frames(3, seed=3)):
        runner.collect(run(runner, engine, frame, OUTPUT_SETS[index])[0])
    runner.close()
    assert fake_cuda.outside_device == []
    assert set(map(str, fake_cuda.devices)) == {"cpu"}


def test_a_failed_capture_runs_that_shape_eagerly_with_equal_results(fake_cuda, engine, monkeypatch):
    attempts = []

    def failing(self, state, plan):
        attempts.append(plan.forward_key)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(CudaRunner, "capture_forward", failing)
    runner = CudaRunner(torch.device("cpu"), engine.stages)
    for index, frame in enumerate(frames(4, seed=4)):
        outputs = OUTPUT_SETS[index % len(OUTPUT_SETS)]
        host, _ = runner.collect(run(runner, engine, frame, outputs)[0])
        assert_same(host, expected(engine, frame, outputs), outputs)
    assert len(attempts) == 1 and fake_cuda.counts["capture"] == 0


def test_evicted_shapes_release_their_buffers(fake_cuda, engine):
    runner = CudaRunner(torch.device("cpu"), engine.stages, cache_size=1)
    small, large = frames(1)[0], np.ascontiguousarray(np.tile(frames(1)[0], (2, 1, 1)))
    first, _ = run(runner, engine, small, ("labels",))
    state = runner.cache.peek(engine._plan(small, "rgb", True, False, False)[2]).state
    runner.collect(first)
    runner.collect(run(runner, engine, large, ("labels",))[0])
    assert state.lanes == [] and state.forward_graph is None and state.static_in is None
    assert len(runner.cache) == 1 and runner.cache.evictions == 1
    assert fake_cuda.counts["synchronize"] >= 1 and fake_cuda.counts["empty_cache"] >= 1  # on eviction only
