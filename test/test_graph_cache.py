"""The CUDA graph cache's policy on CPU, with a fake capturer: keys, lazy stages, bound, failed captures.

The CUDA runner (cuda.py) implements the capturer with torch.cuda graphs; what it decides (when to
capture, what to evict, when to give up and run eagerly) is graphs.GraphCache, tested here.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from icnet_ros.inference.graphs import GraphCache
from icnet_ros.inference.plan import Plan, stages_for

PLAN = Plan(batch=1, height=64, width=96, branch="sub124", precision="fp16", upsample="dense")


class FakeCapturer:
    """Records every call; raises for the captures named in `fail` (("forward",) or stage names)."""

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.calls: list[tuple] = []
        self.live: set[int] = set()  # states allocated and not released
        self.count = 0

    def allocate(self, plan):
        self.count += 1
        self.live.add(self.count)
        self.calls.append(("allocate", plan.forward_key))
        return {"id": self.count, "stages": []}

    def capture_forward(self, state, plan):
        self.calls.append(("forward", state["id"]))
        if "forward" in self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")

    def capture_stage(self, state, plan, stage):
        self.calls.append((stage, state["id"]))
        if stage in self.fail:
            raise RuntimeError(f"operation not permitted when stream is capturing ({stage}, simulated)")
        state["stages"].append(stage)

    def discard_stages(self, state, upsample):
        self.calls.append(("discard", state["id"]))
        state["stages"].clear()

    def release(self, state):
        self.calls.append(("release", state["id"]))
        self.live.discard(state["id"])

    def captured(self, kind):
        return [call for call in self.calls if call[0] == kind]


def with_outputs(plan, *outputs):
    return replace(plan, **{name: name in outputs for name in ("labels", "color", "overlay")})


def test_stages_follow_the_outputs_in_capture_order():
    assert stages_for(["labels"]) == ("labels",)
    assert stages_for(["color"]) == ("labels", "color")
    assert stages_for(["overlay"]) == ("labels", "color", "overlay")
    assert stages_for(["labels", "overlay"]) == ("labels", "color", "overlay")
    with pytest.raises(ValueError, match="unknown output"):
        stages_for(["depth"])


def test_a_change_of_outputs_captures_only_the_missing_stages_once():
    capturer = FakeCapturer()
    cache = GraphCache(capturer, capacity=4)
    entry = cache.entry(with_outputs(PLAN, "labels"))
    assert entry.forward_graph and entry.graph_stages(with_outputs(PLAN, "labels"))
    assert not entry.graph_stages(with_outputs(PLAN, "color"))
    for outputs in [("labels",), ("color",), ("labels", "overlay"), ("color",), ("labels",), ("overlay",)] * 5:
        assert cache.entry(with_outputs(PLAN, *outputs)) is entry
    assert len(capturer.captured("forward")) == 1  # the output set is no part of the forward's key
    assert [c[0] for c in capturer.calls if c[0] in ("labels", "color", "overlay")] == ["labels", "color", "overlay"]
    assert cache.captures == 4 and len(cache) == 1


def test_sparse_upsample_runs_its_stages_eagerly_and_keeps_the_forward_graph():
    capturer = FakeCapturer()
    cache = GraphCache(capturer)
    sparse = replace(PLAN, upsample="sparse", color=True)
    entry = cache.entry(sparse)
    assert entry.forward_graph and not entry.graph_stages(sparse)
    assert capturer.captured("labels") == []
    dense = cache.entry(replace(sparse, upsample="dense"))
    assert dense is entry and entry.graph_stages(replace(sparse, upsample="dense"))
    assert len(capturer.captured("forward")) == 1


def test_the_cache_is_bounded_and_evicted_shapes_are_released():
    capturer = FakeCapturer()
    cache = GraphCache(capturer, capacity=2)
    shapes = [replace(PLAN, batch=batch) for batch in (1, 2, 3)]
    cache.entry(shapes[0])
    cache.entry(shapes[1])
    cache.entry(shapes[0])  # most recently used: shapes[1] goes first
    cache.entry(shapes[2])
    assert cache.keys() == [shapes[0].forward_key, shapes[2].forward_key]
    assert capturer.calls.count(("release", 2)) == 1 and len(capturer.live) == 2
    for _ in range(20):  # churn: never more than the bound alive
        for shape in shapes:
            cache.entry(shape)
            assert len(capturer.live) <= 2 and len(cache) <= 2
    assert cache.evictions == len(capturer.captured("release"))
    cache.clear()
    assert capturer.live == set() and len(cache) == 0
    with pytest.raises(ValueError, match="at least one"):
        GraphCache(capturer, capacity=0)


class RecordingLog:
    """A logger stand-in that keeps what was warned (independent of how logging is set up: under a
    sourced ROS 2, `launch` makes new loggers stop propagating to the root, where caplog listens)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args) -> None:
        self.warnings.append(message % args if args else message)


def test_a_failed_forward_capture_runs_eagerly_is_logged_once_and_never_retried():
    capturer, log = FakeCapturer(fail=("forward",)), RecordingLog()
    cache = GraphCache(capturer, capacity=1, log=log)
    other = replace(PLAN, batch=2)
    for _ in range(10):
        entry = cache.entry(with_outputs(PLAN, "labels", "color"))
        assert not entry.forward_graph and not entry.graph_stages(PLAN)
    cache.entry(other)  # evicts the failed shape ...
    entry = cache.entry(PLAN)  # ... which comes back without another try
    assert not entry.forward_graph
    assert len([c for c in capturer.captured("forward") if c[1] != 2]) == 1
    assert capturer.captured("labels") == []  # stages of an eager forward are not captured either
    failures = [text for text in log.warnings if "capture of the forward failed" in text]
    assert len(failures) == 2  # this shape once; the other shape (batch 2) once
    assert "runs eagerly" in failures[0] and "out of memory" in failures[0]
    assert PLAN.forward_key in cache.failures()


def test_a_failed_stage_capture_leaves_the_forward_graph_and_runs_the_stages_eagerly():
    capturer, log = FakeCapturer(fail=("color",)), RecordingLog()
    cache = GraphCache(capturer, log=log)
    for _ in range(5):
        entry = cache.entry(with_outputs(PLAN, "overlay"))
        labels_only = cache.entry(with_outputs(PLAN, "labels"))
    assert entry.forward_graph and not entry.graph_stages(with_outputs(PLAN, "overlay"))
    assert not labels_only.graph_stages(with_outputs(PLAN, "labels"))  # one pool: all stages eager together
    assert len(capturer.captured("color")) == 1 and capturer.captured("overlay") == []
    assert len(capturer.captured("discard")) == 1
    assert len([text for text in log.warnings if "color postprocess failed" in text]) == 1


def test_graphs_off_captures_nothing():
    capturer = FakeCapturer()
    cache = GraphCache(capturer, use_graphs=False)
    entry = cache.entry(with_outputs(PLAN, "overlay"))
    assert not entry.forward_graph and capturer.captured("forward") == [] and capturer.captured("labels") == []
    assert len(capturer.captured("allocate")) == 1  # buffers and lanes are still kept per shape


def test_a_frame_of_a_new_shape_never_evicts_and_is_logged_once():
    """On the hot path (a frame waiting) a full cache releases nothing: the call gets no entry and runs
    eagerly; prepare() (off the hot path) still makes room by evicting the least recently used."""
    capturer, log = FakeCapturer(), RecordingLog()
    cache = GraphCache(capturer, capacity=2, log=log)
    one, two, three = (replace(PLAN, batch=batch) for batch in (1, 2, 3))
    cache.entry(one)
    cache.entry(two, hot=True)  # room left: a new shape is captured on its first frame, as before
    for _ in range(5):
        assert cache.entry(three, hot=True) is None
        assert cache.entry(one, hot=True).forward_graph  # the held shapes keep replaying
    assert capturer.captured("release") == [] and cache.evictions == 0 and cache.overflows == 5
    assert len(capturer.captured("forward")) == 2 and cache.keys() == [two.forward_key, one.forward_key]
    warnings = [text for text in log.warnings if "graph cache is full" in text]
    assert len(warnings) == 1 and "batch 3" in warnings[0] and "runs eagerly" in warnings[0]
    assert cache.entry(three).forward_graph  # prepare: evicts the least recently used shape
    assert capturer.captured("release") == [("release", 2)] and cache.keys() == [one.forward_key, three.forward_key]
