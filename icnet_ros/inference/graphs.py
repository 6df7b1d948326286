"""Which CUDA graphs exist, when they are captured, and what happens when a capture fails.

The policy, kept apart from the CUDA plumbing (cuda.py) so that it runs and is tested on a CPU
with a fake capturer:

- one entry per Plan.forward_key (batch, frame and network size, branch, precision, channel
  order): a change of output set or upsample method never recaptures the forward;
- inside an entry, the postprocess stages (labels, color, overlay; plan.py) are captured per
  upsample method, lazily and in stage order, so that any replay is a prefix of the capture order
  (graphs sharing one memory pool must replay in capture order); only the dense upsample has
  static shapes, the sparse one always runs eagerly;
- at most `capacity` entries, least recently used first out; an evicted entry releases its graphs,
  memory pool and buffers through the capturer (a device-wide synchronize and empty_cache on CUDA);
- eviction only off the hot path: prepare() may evict, but a frame (entry(plan, hot=True)) whose
  shape is new while the cache is full gets no entry (None: the runner runs it eagerly, with buffers
  of its own, logged once per shape), so frames never wait for a release or thrash the cache. The
  node sizes the cache for every batch its cameras can produce and prepares them at configure;
- a failed capture (out of memory, an operation graphs cannot hold) is tried once per key: the
  forward, or the postprocess of that upsample method, then runs eagerly for good, logged once.
  The failed keys outlive eviction, so churn through the cache does not retry them either.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from icnet_ros.inference.plan import Plan

LOG = logging.getLogger(__name__)
DEFAULT_CAPACITY = 4  # shapes kept captured; each holds its graphs' pool and two lanes of buffers
CAPTURABLE_UPSAMPLE = ("dense",)  # the sparse shortcut has data-dependent shapes


class Capturer(Protocol):
    """What the cache asks of the device side (cuda.py's CudaRunner; a fake in the CPU tests)."""

    def allocate(self, plan: Plan) -> Any:
        """Static buffers for a new entry (its `state`)."""

    def capture_forward(self, state: Any, plan: Plan) -> None:
        """Warm up and capture the forward of `plan` into `state`; raise if it cannot be captured."""

    def capture_stage(self, state: Any, plan: Plan, stage: str) -> None:
        """Capture one postprocess stage (after the earlier ones); raise if it cannot be captured."""

    def discard_stages(self, state: Any, upsample: str) -> None:
        """Drop the stage graphs of `upsample` after one of them failed (the rest run eagerly)."""

    def release(self, state: Any) -> None:
        """Free everything `state` holds: graphs, memory pool, buffers."""


@dataclass
class Entry:
    """The captured state of one forward key."""

    key: tuple
    state: Any
    forward_graph: bool = False  # the forward replays a graph
    stage_graphs: dict[str, list[str]] = field(default_factory=dict)  # upsample -> stages captured, in order
    eager_stages: set[str] = field(default_factory=set)  # upsample methods whose stages run eagerly

    def graph_stages(self, plan: Plan) -> bool:
        """Whether every postprocess stage of `plan` replays a graph."""
        captured = self.stage_graphs.get(plan.upsample, [])
        return plan.upsample not in self.eager_stages and list(plan.stages) == captured[:len(plan.stages)]


class GraphCache:
    """The bounded, least-recently-used set of captured entries; see the module docstring."""

    def __init__(self, capturer: Capturer, capacity: int = DEFAULT_CAPACITY, use_graphs: bool = True,
                 log: logging.Logger = LOG) -> None:
        if capacity < 1:
            raise ValueError(f"the graph cache must hold at least one shape, got capacity {capacity}")
        self.capturer = capturer
        self.capacity = int(capacity)
        self.use_graphs = use_graphs
        self.log = log
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._failed: dict[tuple, str] = {}  # (forward key[, upsample]) -> why its capture failed
        self._overflowed: set[tuple] = set()  # forward keys met on the hot path with the cache full (logged)
        self.captures = 0  # graphs captured so far (forward and stages), for tests and diagnostics
        self.evictions = 0
        self.overflows = 0  # hot-path calls that found their shape missing and the cache full

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple]:
        """Forward keys held, least recently used first."""
        return list(self._entries)

    def failures(self) -> dict[tuple, str]:
        return dict(self._failed)

    def entry(self, plan: Plan, hot: bool = False) -> Entry | None:
        """The entry for `plan`, made and captured on first use; afterwards a dict look-up.

        Stage graphs the plan needs that are not captured yet are captured now (once each).
        hot: a frame is waiting (the engine's submit). A new shape then gets an entry only while the
        cache has room: with the cache full nothing is evicted, and None says "run this call eagerly".
        """
        key = plan.forward_key
        entry = self._entries.get(key)
        if entry is None:
            if hot and len(self._entries) >= self.capacity:
                self._overflow(plan)
                return None
            entry = self._add(plan)
        else:
            self._entries.move_to_end(key)
        if (self.use_graphs and entry.forward_graph and plan.upsample not in entry.eager_stages
                and not entry.graph_stages(plan)):
            self._capture_stages(entry, plan)
        return entry

    def peek(self, plan: Plan) -> Entry | None:
        """The entry of `plan` if one is held, without capturing or touching the LRU order."""
        return self._entries.get(plan.forward_key)

    def clear(self) -> None:
        """Release every entry (the engine's close)."""
        while self._entries:
            self._evict()

    # --- internals --------------------------------------------------------------------------------
    def _add(self, plan: Plan) -> Entry:
        while len(self._entries) >= self.capacity:
            self._evict()
        entry = Entry(plan.forward_key, self.capturer.allocate(plan))
        self._entries[entry.key] = entry
        if self.use_graphs and entry.key not in self._failed:
            entry.forward_graph = self._try(entry.key, plan, "forward",
                                            lambda: self.capturer.capture_forward(entry.state, plan))
        return entry

    def _capture_stages(self, entry: Entry, plan: Plan) -> None:
        failed_key = (*entry.key, plan.upsample)
        if plan.upsample not in CAPTURABLE_UPSAMPLE or failed_key in self._failed:
            entry.eager_stages.add(plan.upsample)
            return
        captured = entry.stage_graphs.setdefault(plan.upsample, [])
        for stage in plan.stages[len(captured):]:
            ok = self._try(failed_key, plan, f"{stage} postprocess",
                           lambda stage=stage: self.capturer.capture_stage(entry.state, plan, stage))
            if not ok:
                self.capturer.discard_stages(entry.state, plan.upsample)
                entry.stage_graphs.pop(plan.upsample, None)
                entry.eager_stages.add(plan.upsample)
                return
            captured.append(stage)

    def _try(self, failed_key: tuple, plan: Plan, what: str, capture) -> bool:
        try:
            capture()
        except Exception as error:  # out of memory, an operation graphs cannot hold, ...
            self._failed[failed_key] = f"{type(error).__name__}: {error}"
            self.log.warning("CUDA graph capture of the %s failed for %s (%s: %s); this shape runs eagerly "
                             "from now on", what, describe(plan), type(error).__name__, error)
            return False
        self.captures += 1
        return True

    def _overflow(self, plan: Plan) -> None:
        self.overflows += 1
        if plan.forward_key not in self._overflowed:
            self._overflowed.add(plan.forward_key)
            self.log.warning("the CUDA graph cache is full (%d shapes): %s runs eagerly, without graphs; nothing "
                             "is released while frames flow (prepare() this shape, or give a larger "
                             "graph_cache_size)", self.capacity, describe(plan))

    def _evict(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.capturer.release(entry.state)
        self.evictions += 1


def describe(plan: Plan) -> str:
    """A short human description of a plan, for log lines."""
    height, width = plan.network_size
    return (f"batch {plan.batch} of {plan.height}x{plan.width} {plan.channel_order} frames (network "
            f"{height}x{width}), {plan.branch}, {plan.precision}, {plan.upsample} upsample")
