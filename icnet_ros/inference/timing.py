"""Per-stage timings of the engine (upload, forward, postprocess, download) and their summaries.

The CPU clock reads time.perf_counter at each stage boundary. On CUDA the engine records events on
its streams instead (see cuda.py), so timing never adds a host synchronization between stages.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

STAGES = ("upload", "forward", "postprocess", "download")


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds spent in each stage of one engine call (shared by every frame of a batch)."""

    upload_ms: float = 0.0
    forward_ms: float = 0.0
    postprocess_ms: float = 0.0
    download_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.upload_ms + self.forward_ms + self.postprocess_ms + self.download_ms

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_ms": self.total_ms}


class HostClock:
    """Stage boundaries on the host clock: mark(stage) closes `stage` at the current time."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._ms: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self._ms[stage] = self._ms.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now

    def timings(self) -> StageTimings:
        return StageTimings(**{f"{stage}_ms": self._ms.get(stage, 0.0) for stage in STAGES})


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(values, q)) if values.size else float("nan")


@dataclass
class TimingLog:
    """Collects StageTimings per engine call and summarizes them as p50 / p95 per stage and fps."""

    calls: list[StageTimings] = field(default_factory=list)
    frames: int = 0

    def add(self, timings: StageTimings, frames: int = 1) -> None:
        self.calls.append(timings)
        self.frames += frames

    def stage_ms(self, stage: str) -> list[float]:
        if stage == "total":
            return [t.total_ms for t in self.calls]
        return [getattr(t, f"{stage}_ms") for t in self.calls]

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {"p50": ms, "p95": ms}} for every stage and "total" (end to end per call)."""
        return {stage: {"p50": percentile(self.stage_ms(stage), 50), "p95": percentile(self.stage_ms(stage), 95)}
                for stage in (*STAGES, "total")}

    def fps(self) -> float:
        """Frames per second from the median call time (a batch of N counts N frames)."""
        if not self.calls:
            return float("nan")
        per_call = self.frames / len(self.calls)
        median = percentile(self.stage_ms("total"), 50)
        return per_call * 1e3 / median if median > 0 else float("inf")

    def format(self) -> str:
        """One line per stage, for a summary printed at the end of a run."""
        lines = [f"{'stage':<12} {'p50 ms':>9} {'p95 ms':>9}"]
        for stage, stats in self.summary().items():
            lines.append(f"{stage:<12} {stats['p50']:>9.2f} {stats['p95']:>9.2f}")
        lines.append(f"{self.frames} frames in {len(self.calls)} calls, {self.fps():.2f} fps (from the p50 time)")
        return "\n".join(lines)
