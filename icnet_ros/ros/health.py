"""Per-camera counters and the diagnostic verdict the node publishes on /diagnostics (no ROS imports).

The node feeds events in (frame received with its stamp, replaced before processing, malformed,
published, engine failure, a stamp too far from the node's clock) with timestamps from its clock;
camera_report() turns them into a level, a one-line message and key/value pairs, which the node
hands to diagnostic_updater unchanged. The rules:

- ERROR: no frame for stall_timeout_s (input stalled, or nothing since start), or the engine failed
  on frames in the last window;
- WARN: waiting for a first frame, a rate below expected_rate_hz * (1 - rate_tolerance), a median
  latency above max_latency_ms, malformed frames, input frames missing (gaps in the cameras' header
  stamps: frames lost before they reached the node, e.g. in DDS), or input stamps that disagree
  with the node's clock by more than clock_mismatch_s (a recording replayed without use_sim_time);
- OK otherwise. Dropped frames alone are not a fault: latest-frame processing drops by design when
  the camera is faster than the engine. They are reported, and the rate check catches a slow engine.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from icnet_ros.ros.stamp_gaps import StampGaps

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
NS_PER_S = 1_000_000_000
# The node's clock going back by more than this is a jump (a looping bag on --clock), not the few
# milliseconds by which two threads' readings of one clock can arrive out of order.
CLOCK_JUMP_BACK_NS = NS_PER_S
# Gaps in the input stamps (frames lost before they reached the node) are counted by StampGaps,
# which holds each camera's frame grid: see stamp_gaps.py for why intervals alone are not enough.


@dataclass(frozen=True)
class Thresholds:
    """The diagnostic settings of NodeConfig (the node passes its current configuration)."""

    expected_rate_hz: float = 0.0
    rate_tolerance: float = 0.2
    max_latency_ms: float = 0.0
    stall_timeout_s: float = 2.0
    diagnostics_window_s: float = 5.0

    @classmethod
    def from_config(cls, config) -> Thresholds:
        return cls(config.expected_rate_hz, config.rate_tolerance, config.max_latency_ms, config.stall_timeout_s,
                   config.diagnostics_window_s)


@dataclass(frozen=True)
class FrameCounts:
    """A camera's totals since start, as the timing message reports them."""

    processed: int
    dropped: int
    malformed: int
    missing: int


@dataclass(frozen=True)
class DiagnosticReport:
    level: int
    message: str
    values: tuple[tuple[str, str], ...]

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]


@dataclass
class CameraStats:
    topic: str
    received: int = 0
    dropped: int = 0  # replaced in the input buffer before the worker took them
    unpublished: int = 0  # segmented, then replaced by a newer result before the publisher took them
    malformed: int = 0
    failed: int = 0
    processed: int = 0  # published (or, with no subscriber, handled without computing anything)
    idle: int = 0  # of those, frames nobody subscribed to: nothing was computed
    missing: int = 0  # frames that never arrived: gaps in the header stamps
    clock_mismatches: int = 0
    first_received_ns: int | None = None
    last_received_ns: int | None = None
    last_clock_offset_s: float = 0.0
    last_problem: str = ""
    # (publish time ns, latency ms or None, node time ms) of recent published frames
    segmented: deque = field(default_factory=deque)
    malformed_at: deque = field(default_factory=deque)  # times of recent malformed frames
    failed_at: deque = field(default_factory=deque)  # times of recent engine failures
    # (time, frames missing) of recent gaps; negative: frames counted missing that came late after all
    missing_at: deque = field(default_factory=deque)
    mismatch_at: deque = field(default_factory=deque)  # times of recent stamps far from the node's clock
    gaps: StampGaps = field(default_factory=StampGaps)

    def recent_missing(self) -> int:
        return sum(count for _, count in self.missing_at)


class HealthMonitor:
    """Thread-safe counters per camera: the executor thread reports arrivals, the worker the rest."""

    def __init__(self, topics: list[str], started_ns: int) -> None:
        self.cameras = [CameraStats(topic) for topic in topics]
        self.started_ns = started_ns
        self._lock = threading.Lock()
        self._latest_ns = started_ns  # the latest node time seen, to notice the clock jumping back

    # --- events ---------------------------------------------------------------------------------
    def _follow_clock(self, now_ns: int) -> None:
        """Forget the windows when the node's clock jumps back (a bag looping on its own clock):
        their times are then in the future and would never age out. Threads report times taken a
        little apart, so only a jump of more than CLOCK_JUMP_BACK_NS counts."""
        if now_ns < self._latest_ns - CLOCK_JUMP_BACK_NS:
            for stats in self.cameras:
                for events in (stats.segmented, stats.malformed_at, stats.failed_at, stats.missing_at,
                               stats.mismatch_at):
                    events.clear()
                stats.first_received_ns = stats.last_received_ns = None
                stats.gaps.restart()
            self._latest_ns = now_ns
        self._latest_ns = max(self._latest_ns, now_ns)

    def activated(self, now_ns: int) -> None:
        """A new activation: wait for a first frame again, and do not count the frames a camera sent
        while the node was inactive as missing. Counters go on from the previous activation."""
        with self._lock:
            self.started_ns = now_ns
            for stats in self.cameras:
                stats.last_received_ns = None
                stats.gaps.restart()

    def frame_received(self, camera: int, now_ns: int, replaced_unprocessed: bool,
                       stamp_ns: int | None = None) -> None:
        with self._lock:
            self._follow_clock(now_ns)
            stats = self.cameras[camera]
            stats.received += 1
            stats.dropped += int(replaced_unprocessed)
            if stats.first_received_ns is None:
                stats.first_received_ns = now_ns
            stats.last_received_ns = now_ns
            if stamp_ns is not None:
                self._note_stamp(stats, now_ns, stamp_ns)

    @staticmethod
    def _note_stamp(stats: CameraStats, now_ns: int, stamp_ns: int) -> None:
        """Count the frames missing before this stamp (StampGaps); a frame counted missing that
        turns out to have come late is taken back, never below zero."""
        change = max(stats.gaps.add(stamp_ns), -stats.missing)
        if change:
            stats.missing += change
            stats.missing_at.append((now_ns, change))

    def result_dropped(self, camera: int) -> None:
        """A segmented frame was replaced by a newer one before the publisher took it."""
        with self._lock:
            self.cameras[camera].unpublished += 1

    def clock_mismatch(self, camera: int, now_ns: int, offset_s: float) -> None:
        """A frame's stamp is `offset_s` behind the node's clock, more than any latency could be."""
        with self._lock:
            self._follow_clock(now_ns)
            stats = self.cameras[camera]
            stats.clock_mismatches += 1
            stats.mismatch_at.append(now_ns)
            stats.last_clock_offset_s = offset_s

    def frame_malformed(self, camera: int, now_ns: int, problem: str) -> None:
        with self._lock:
            self._follow_clock(now_ns)
            stats = self.cameras[camera]
            stats.malformed += 1
            stats.malformed_at.append(now_ns)
            stats.last_problem = problem

    def frames_failed(self, cameras: list[int], now_ns: int, problem: str) -> None:
        with self._lock:
            self._follow_clock(now_ns)
            for camera in cameras:
                stats = self.cameras[camera]
                stats.failed += 1
                stats.failed_at.append(now_ns)
                stats.last_problem = problem

    def frame_published(self, camera: int, now_ns: int, latency_ms: float | None, node_ms: float,
                        computed: bool = True) -> None:
        """A frame's outputs went out; latency None when its stamp cannot be compared (clock mismatch).
        computed False: nobody subscribed to any image, so nothing was computed (timing only)."""
        with self._lock:
            self._follow_clock(now_ns)
            stats = self.cameras[camera]
            stats.processed += 1
            stats.idle += int(not computed)
            stats.segmented.append((now_ns, latency_ms, node_ms))

    def counts(self, camera: int) -> FrameCounts:
        """One camera's totals, for the timing message."""
        with self._lock:
            stats = self.cameras[camera]
            return FrameCounts(stats.processed, stats.dropped, stats.malformed, stats.missing)

    # --- verdicts -------------------------------------------------------------------------------
    def camera_report(self, camera: int, now_ns: int, thresholds: Thresholds) -> DiagnosticReport:
        with self._lock:
            self._follow_clock(now_ns)
            stats = self.cameras[camera]
            window_ns = int(thresholds.diagnostics_window_s * NS_PER_S)
            self._forget_before(stats, now_ns - window_ns)
            rate = self._rate(stats, now_ns, window_ns)
            latencies = [latency for _, latency, _ in stats.segmented if latency is not None]
            node_times = [node_ms for _, _, node_ms in stats.segmented]
            problems = self._problems(stats, now_ns, thresholds, rate, latencies)
            typical = stats.gaps.period_ns
            values = (
                ("topic", stats.topic),
                ("rate_hz", f"{rate:.2f}"),
                ("input_rate_hz", f"{NS_PER_S / typical:.2f}" if typical else "n/a"),
                ("latency_ms_median", _median_text(latencies)),
                ("node_time_ms_median", _median_text(node_times)),
                ("frames_received", str(stats.received)),
                ("frames_segmented", str(stats.processed - stats.idle)),
                ("frames_without_subscribers", str(stats.idle)),
                ("frames_dropped", str(stats.dropped)),
                ("frames_unpublished", str(stats.unpublished)),
                ("frames_missing", str(stats.missing)),
                ("frames_malformed", str(stats.malformed)),
                ("frames_failed", str(stats.failed)),
                ("clock_offset_s", f"{stats.last_clock_offset_s:.1f}" if stats.mismatch_at else "n/a"),
                ("last_problem", stats.last_problem or "none"),
            )
        level = max((level for level, _ in problems), default=OK)
        message = "; ".join(text for _, text in problems) or f"segmenting at {rate:.1f} Hz"
        return DiagnosticReport(level, message, values)

    @staticmethod
    def _forget_before(stats: CameraStats, cutoff_ns: int) -> None:
        for events in (stats.malformed_at, stats.failed_at, stats.mismatch_at):
            while events and events[0] < cutoff_ns:
                events.popleft()
        while stats.missing_at and stats.missing_at[0][0] < cutoff_ns:
            stats.missing_at.popleft()
        while stats.segmented and stats.segmented[0][0] < cutoff_ns:
            stats.segmented.popleft()

    @staticmethod
    def _rate(stats: CameraStats, now_ns: int, window_ns: int) -> float:
        """Segmented frames per second: over the whole window, or between the first and last frame while
        the stream is younger than the window (so a fresh stream is neither under- nor over-counted)."""
        times = [t for t, _, _ in stats.segmented]
        if stats.first_received_ns is not None and now_ns - stats.first_received_ns >= window_ns:
            return len(times) * NS_PER_S / window_ns
        if len(times) >= 2 and times[-1] > times[0]:
            return (len(times) - 1) * NS_PER_S / (times[-1] - times[0])
        return 0.0

    def _problems(self, stats: CameraStats, now_ns: int, thresholds: Thresholds, rate: float,
                  latencies: list[float]) -> list[tuple[int, str]]:
        window = f"in the last {thresholds.diagnostics_window_s:g} s"
        input_problem = self._input_problem(stats, now_ns, thresholds)
        problems = [input_problem] if input_problem else []
        if stats.failed_at:
            problems.append((ERROR, f"segmentation failed on {len(stats.failed_at)} frame(s) {window}: "
                                    f"{stats.last_problem}"))
        if stats.malformed_at:
            problems.append((WARN, f"{len(stats.malformed_at)} malformed frame(s) {window}: {stats.last_problem}"))
        if stats.recent_missing() > 0:
            typical = stats.gaps.period_ns
            rate = f" (camera at {NS_PER_S / typical:.1f} Hz)" if typical else ""
            problems.append((WARN, f"{stats.recent_missing()} input frame(s) missing {window}, by the "
                                   f"gaps in the header stamps{rate}: frames are lost before they reach the node, "
                                   "e.g. in DDS (see README: large images over DDS)"))
        if stats.mismatch_at:
            problems.append((WARN, f"input stamps are {stats.last_clock_offset_s:.0f} s away from the node's clock "
                                   f"({len(stats.mismatch_at)} frame(s) {window}), so no latency is reported; "
                                   "replaying a recording? use_sim_time:=true with `ros2 bag play --clock`"))
        minimum_rate = thresholds.expected_rate_hz * (1.0 - thresholds.rate_tolerance)
        if thresholds.expected_rate_hz > 0 and input_problem is None and rate < minimum_rate:
            problems.append((WARN, f"rate {rate:.1f} Hz is below the expected {thresholds.expected_rate_hz:g} Hz "
                                   f"(minimum {minimum_rate:.1f} Hz); {stats.dropped} frame(s) dropped so far"))
        median_latency = float(np.median(latencies)) if latencies else 0.0
        if thresholds.max_latency_ms > 0 and median_latency > thresholds.max_latency_ms:
            problems.append((WARN, f"median latency {median_latency:.0f} ms is above {thresholds.max_latency_ms:g} ms"))
        return problems

    def _input_problem(self, stats: CameraStats, now_ns: int, thresholds: Thresholds) -> tuple[int, str] | None:
        """ERROR for a stalled (or never started) camera, WARN while waiting for its first frame."""
        if stats.last_received_ns is None:
            waited_s = (now_ns - self.started_ns) / NS_PER_S
            if waited_s > thresholds.stall_timeout_s:
                return ERROR, f"no image received on {stats.topic} in {waited_s:.1f} s since start"
            return WARN, f"waiting for the first image on {stats.topic}"
        silent_s = (now_ns - stats.last_received_ns) / NS_PER_S
        if silent_s > thresholds.stall_timeout_s:
            return ERROR, f"input stalled: no image on {stats.topic} for {silent_s:.1f} s"
        return None


def _median_text(values: list[float]) -> str:
    return f"{float(np.median(values)):.2f}" if values else "n/a"
