"""The CUDA runner's plumbing on CPU: torch.cuda replaced by an asynchronous stand-in (fake_cuda.py).

Work issued on the fake streams runs late, only when something waits for it (or, for the stream a
schedule names, as early as it may), so a missing wait between the upload, compute, download and
capture streams gives wrong labels here instead of passing by luck; every data-flow test runs under
each schedule. What this can show without a GPU: the data flow (each frame reaches the static input
before a replay, the stages replay in order, outputs go through the double buffer to the right host
arrays, calls in flight keep their own results), that the streams are ordered wherever they share
memory or a TensorRT context, that the hot path of a prepared shape never synchronizes, captures or
collects memory, that every stream, event and capture is made inside the engine's device context
(what a cuda:1 engine needs), and the eager fallback after a failed capture. What it cannot show
(real streams, graphs, pinned memory) is in test_engine_gpu.py.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import trained_bn_model
from fake_cuda import LateWork, install

from icnet_ros.inference import SegmentationEngine
from icnet_ros.inference.cuda import CudaRunner

OUTPUT_SETS = [("labels",), ("color",), ("overlay",), ("labels", "color", "overlay"), ("labels", "overlay")]
# which streams run their work as early as they may (the others only when something waits for it)
SCHEDULES = ["lazy", "upload", "compute", "download", "upload+compute"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Plumbing, not speed: one thread runs these tiny frames fastest (and does not fight other work)."""
    torch.set_num_threads(1)


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = install(monkeypatch, CudaRunner)
    with LateWork(fake):
        yield fake


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    return request.param


def make_runner(fake, engine, schedule="lazy", stages=None, **options) -> CudaRunner:
    runner = CudaRunner(torch.device("cpu"), stages or engine.stages, **options)
    if schedule != "lazy":
        fake.eager = {getattr(runner, f"{name}_stream") for name in schedule.split("+")}
    return runner


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    torch.set_num_threads(1)
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


def test_graph_path_results_equal_the_eager_runner(fake_cuda, engine, schedule):
    runner = make_runner(fake_cuda, engine, schedule)
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


def test_calls_in_flight_keep_their_own_results(fake_cuda, engine, schedule):
    runner = make_runner(fake_cuda, engine, schedule)
    pool = frames(5, seed=1)
    works = [run(runner, engine, frame, ("labels", "color"))[0] for frame in pool]  # 5 in flight, 2 lanes
    for frame, work in reversed(list(zip(pool, works))):
        host, _ = runner.collect(work)
        assert_same(host, expected(engine, frame, ("labels", "color")), ("labels", "color"))


def test_a_prepared_shape_never_synchronizes_captures_or_frees_on_the_hot_path(fake_cuda, engine):
    runner = make_runner(fake_cuda, engine)
    prepared = engine._plan(frames(1)[0], "rgb", True, True, True)[2]
    runner.prepare(prepared)
    assert fake_cuda.counts["capture"] == 4  # forward, labels, color, overlay
    before = dict(fake_cuda.counts)
    for index, frame in enumerate(frames(3, seed=2) * 5):
        runner.collect(run(runner, engine, frame, OUTPUT_SETS[index % len(OUTPUT_SETS)])[0])
    assert fake_cuda.counts == before  # no synchronize, empty_cache, capture, pool or stream per frame


def test_every_stream_event_and_capture_is_made_on_the_engines_device(fake_cuda, engine):
    runner = make_runner(fake_cuda, engine)
    for index, frame in enumerate(frames(3, seed=3)):
        runner.collect(run(runner, engine, frame, OUTPUT_SETS[index])[0])
    runner.close()
    assert fake_cuda.outside_device == []
    assert set(map(str, fake_cuda.devices)) == {"cpu"}


def test_a_failed_capture_runs_that_shape_eagerly_with_equal_results(fake_cuda, engine, monkeypatch, schedule):
    attempts = []

    def failing(self, state, plan):
        attempts.append(plan.forward_key)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(CudaRunner, "capture_forward", failing)
    runner = make_runner(fake_cuda, engine, schedule)
    for index, frame in enumerate(frames(4, seed=4)):
        outputs = OUTPUT_SETS[index % len(OUTPUT_SETS)]
        host, _ = runner.collect(run(runner, engine, frame, outputs)[0])
        assert_same(host, expected(engine, frame, outputs), outputs)
    assert len(attempts) == 1 and fake_cuda.counts["capture"] == 0


def test_prepare_evicts_and_releases_the_least_recently_used_shape(fake_cuda, engine):
    runner = make_runner(fake_cuda, engine, cache_size=1)
    small, large = frames(1)[0], np.ascontiguousarray(np.tile(frames(1)[0], (2, 1, 1)))
    first, _ = run(runner, engine, small, ("labels",))
    state = runner.cache.peek(engine._plan(small, "rgb", True, False, False)[2]).state
    runner.collect(first)
    runner.prepare(engine._plan(large, "rgb", True, False, False)[2])  # start-up, off the hot path
    assert state.lanes == [] and state.forward_graph is None and state.static_in is None
    assert len(runner.cache) == 1 and runner.cache.evictions == 1
    assert fake_cuda.counts["synchronize"] >= 1 and fake_cuda.counts["empty_cache"] >= 1  # on eviction only


def test_a_new_shape_with_the_cache_full_runs_eagerly_and_releases_nothing(fake_cuda, engine, schedule, caplog):
    """On the hot path a full cache evicts nothing (a release synchronizes the device): the new shape
    runs eagerly in buffers of its own, with the same results, logged once."""
    runner = make_runner(fake_cuda, engine, schedule, cache_size=1)
    small, large = frames(1)[0], np.ascontiguousarray(np.tile(frames(1, seed=5)[0], (2, 1, 1)))
    runner.prepare(engine._plan(small, "rgb", True, True, True)[2])
    before = dict(fake_cuda.counts)
    for index in range(4):
        outputs = OUTPUT_SETS[index]
        works = [(frame, run(runner, engine, frame, outputs)[0]) for frame in (small, large, large)]
        for frame, work in works:
            assert_same(runner.collect(work)[0], expected(engine, frame, outputs), outputs)
    assert fake_cuda.counts == before  # no synchronize, empty_cache, capture, pool or stream
    assert runner.cache.keys() == [engine._plan(small, "rgb", True, False, False)[2].forward_key]
    assert runner.cache.evictions == 0 and runner.cache.overflows == 8
    assert len([r for r in caplog.records if "graph cache is full" in r.getMessage()]) == 1


def test_the_node_prepares_every_batch_its_cameras_make_and_never_releases_while_frames_flow(fake_cuda, engine):
    """Four cameras of one size: the node batches whatever frames wait, so batches of 1 to 4 come in
    any order. Configure prepares each (both channel orders) in a cache sized for them; then no
    frame synchronizes, captures or releases."""
    from icnet_ros.ros.node_config import NodeConfig
    from icnet_ros.ros.session import graph_cache_size, warm_up

    config = NodeConfig(image_topics=[f"/{name}/image" for name in ("front", "left", "right", "rear")],
                        device="cpu", warmup_height=64, warmup_width=96, publish_color=False, publish_overlay=False)
    pool = frames(4, seed=9)
    reference = {(index, order): expected(engine, frame, ("labels",), order).labels
                 for index, frame in enumerate(pool) for order in ("rgb", "bgr")}
    runner = make_runner(fake_cuda, engine, cache_size=graph_cache_size(config))
    original, engine._runner = engine._runner, runner
    try:
        warm_up(engine, config)
        assert len(runner.cache) == 8 and runner.cache.evictions == 0  # batches 1-4, rgb and bgr
        before = dict(fake_cuda.counts)
        for index, batch in enumerate([1, 3, 2, 4, 1, 4, 2, 3, 3, 1]):
            order = "bgr" if index % 3 == 2 else "rgb"
            results = engine.segment(pool[:batch], channel_order=order)
            for camera, seg in enumerate(results):
                assert np.array_equal(seg.labels, reference[camera, order])
        assert fake_cuda.counts == before and runner.cache.evictions == 0 and runner.cache.overflows == 0
    finally:
        engine._runner = original


class SharedContext:
    """A TensorRT execution context as the TensorRT backend shares it: one per engine, used by every
    graph and warm-up of that engine, whatever the batch. Its activation memory allows one user at a
    time: each use is recorded where it runs on the device, with its vector clock."""

    def __init__(self, fake, forward):
        self.fake, self.forward, self.uses = fake, forward, []

    def __call__(self, frames_, plan):
        logits = self.forward(frames_, plan)
        self.fake.enqueue_op(lambda: self.uses.append(self.fake.where()))
        return logits

    def overlapping(self):
        """Pairs of uses on different streams that nothing ordered (they could run at the same time)."""
        return [(a[0], b[0]) for i, a in enumerate(self.uses) for b in self.uses[i + 1:]
                if a[0] is not b[0] and not self.fake.ordered(a, b)]


def test_a_new_shape_is_warmed_up_only_after_the_frame_in_flight_has_used_the_shared_context(
        fake_cuda, engine, schedule):
    """A batch of two arrives while a batch of one computes: its warm-up (on the capture stream) uses
    the execution context the frame in flight uses (on the compute stream), so they must be ordered."""
    context = SharedContext(fake_cuda, engine.stages.forward)
    stages = replace(engine.stages, forward=context)
    runner = make_runner(fake_cuda, engine, schedule, stages=stages)
    single, pair = frames(1, seed=7), frames(2, seed=8)
    runner.prepare(engine._plan(single[0], "rgb", True, False, False)[2])
    in_flight, _ = run(runner, engine, single[0], ("labels",))
    second, _ = run(runner, engine, pair, ("labels",))  # a new shape: allocated and captured in submit
    third, _ = run(runner, engine, single[0], ("labels",))  # after the warm-up, on the compute stream again
    for work, frame in ((in_flight, single[0]), (third, single[0])):
        assert_same(runner.collect(work)[0], expected(engine, frame, ("labels",)), ("labels",))
    host, _ = runner.collect(second)
    for index, frame in enumerate(pair):
        assert np.array_equal(host["labels"][index], expected(engine, frame, ("labels",)).labels)
    fake_cuda.run_all()
    streams = {stream for stream, _ in context.uses}
    assert {runner.compute_stream, runner.capture_stream} <= streams  # both streams did use it
    assert context.overlapping() == []


def test_the_engine_its_runner_and_graphs_are_freed_at_once(fake_cuda):
    """As on CUDA: an engine with a CudaRunner, graphs captured. Dropping it must free the engine, its
    runner and its weights by reference counting alone (the node's cleanup then empties the cache):
    runner <-> graph cache and engine <-> stages must be no cycles."""
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    engine = SegmentationEngine(model, device="cpu", upsample="dense")
    engine._runner = make_runner(fake_cuda, engine)  # what the engine makes on a CUDA device
    engine.prepare(64, 96, outputs=("labels", "color"))
    engine.segment(frames(1)[0], color=True)
    assert engine.graph_cache.captures == 3
    gone = [weakref.ref(item) for item in (engine, engine._runner, engine.graph_cache, engine.weights("fp32"), model)]
    gc.collect()
    gc.disable()
    try:
        engine.close()
        del engine, model
        assert [ref() is None for ref in gone] == [True] * len(gone)
    finally:
        gc.enable()


def test_sparse_calls_in_flight_keep_their_own_regions_and_are_never_captured(fake_cuda, schedule):
    torch.manual_seed(0)
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    eager = SegmentationEngine(model, device="cpu", upsample="dense", region_size=32, high_res_regions=2)
    engine = SegmentationEngine(model, device="cpu", upsample="dense", region_size=32, high_res_regions=2)
    engine._runner = make_runner(fake_cuda, engine, schedule)  # the CUDA runner's plumbing on the fake
    pool = frames(4, seed=3)
    handles = [engine.submit(frame, color=True) for frame in pool]  # all in flight before any is collected
    chosen = set()
    for frame, handle in reversed(list(zip(pool, handles))):
        result, reference = engine.collect(handle), eager.segment(frame, color=True)
        assert np.array_equal(result.regions, reference.regions) and result.regions_computed == 2
        chosen.add(result.regions.tobytes())
        assert np.array_equal(result.labels, reference.labels) and np.array_equal(result.color, reference.color)
    assert len(chosen) > 1  # the frames choose different regions: a mix-up would show
    # the choice of regions leaves the eager forward: no capture, no cache slot
    assert engine._runner.cache.peek(engine._plan(pool[0], "rgb", True, True, False)[2]) is None
