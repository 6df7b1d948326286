"""Input frames that never arrived, counted from the gaps in a camera's header stamps (no ROS imports).

A camera means to send frame n at `anchor + n * period`; the stamp it writes is that time plus
jitter: a busy process sends late, a driver stamps on arrival, and tens of percent of the period
are common. Comparing a stamp with the previous one doubles that jitter (with +-30 % jitter a late
frame and an early one are up to 1.6 periods apart, which looks like a lost frame), so each stamp
is compared with the camera's grid instead: a line fitted to the recent stamps against their slot
numbers. A new stamp lands round((stamp - time of the last slot) / period) slots after the last
one; the slots it skipped are frames missing. A slot taken twice (a frame so late that it landed
in the next slot, then the next frame on time) takes back a frame counted missing.

Learning the grid: the intervals alone cannot tell a jittery period from one 15 % shorter, nor,
when most frames are lost, the period from a multiple of it. The stamps can: on the right grid
they all sit near one phase. So the period is the one, near a first guess from the intervals,
that puts the stamps closest to their slots, and the line fitted over the slots then sharpens
it. Regular stamps tell it after MIN_STAMP_INTERVALS; jittery ones after up to a full window,
as many as it takes for chance alignments of a wrong period to fade (acceptable_misfit). Until
then there is no verdict: frames missing among those stamps are counted once the grid is known.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

STAMPS_KEPT = 65  # the grid is learned from and fitted to the last 64 intervals
MIN_STAMP_INTERVALS = 8  # fewer intervals than this: no verdict yet (nor a rate)
# Misfit: the mean squared distance of stamps from their slots, in periods squared. Uniform +-30 %
# jitter gives 0.03; stamps at random 1/12, spread 0.0745 / sqrt(stamps) (the spread of a squared
# uniform residual). A grid is believed once the misfit is further below chance than the best of
# a search finds by chance (acceptable_misfit), or at REGULAR_ENOUGH (3 % of a period rms) after
# MIN_STAMP_INTERVALS, or whatever it is from a full window.
RANDOM_MISFIT = 1.0 / 12.0
RANDOM_MISFIT_SPREAD = 0.0745
CHANCE_MARGIN = 5.0
REGULAR_ENOUGH = 0.001
FINER_GRID_MARGIN = 2.0  # see _best_fit
SHORT_INTERVAL_PERCENTILE = 10  # near one period whatever was lost, unless nine in ten frames are
SINGLE_PERIOD_LIMIT = 2.0  # intervals under this many short ones span one period: a lost frame makes two
GUESS_RANGE = 1.5  # the period is searched from guess / 1.5 to guess * 1.5: never half or double of it
SEARCH_STEP_PERIODS = 0.2  # search step: the last stamp moves by this much of a period at most
# Bounds the search's cost (a few ms) when nearly every frame is lost and the stamps span
# thousands of periods; the grid is then searched more coarsely.
MAX_SEARCH_PERIODS = 2048
# Stamps closer than this many periods are no gap, whatever the grid says (jitter of +-30 % on a
# grid puts stamps at least 1.4 periods apart across a lost frame; a wandering clock rarely 1.35).
GAP_INTERVAL = 1.35
# A frame up to this many periods late still takes back the frame counted missing before it.
TAKE_BACK_SLOTS = 3
# A jump of more than this many periods is the camera's clock stepping, not frames lost: a stream
# this broken is better measured afresh than counted as thousands of missing frames.
CLOCK_STEP_SLOTS = 10 * STAMPS_KEPT
GRID_FIT_ROUNDS = 3  # slots -> line -> slots ...: settles in two rounds on jittery stamps
# Beyond this misfit (see REGULAR_ENOUGH) the grid no longer describes the camera (its rate
# changed, or its clock jumped): it is learned afresh.
GRID_MISFIT = 0.06


@dataclass
class _Grid:
    """stamp ~= origin_ns + anchor + slot * period (floats relative to origin_ns keep ns precision)."""

    origin_ns: int
    anchor: float
    period: float

    def slot_time(self, slot: int) -> float:
        return self.anchor + slot * self.period


class StampGaps:
    """One camera's stamps -> frames missing (see the module docstring). Not thread-safe: the caller locks."""

    def __init__(self) -> None:
        self._stamps: deque[int] = deque(maxlen=STAMPS_KEPT)
        self._slots: deque[int] = deque(maxlen=STAMPS_KEPT)
        self._grid: _Grid | None = None
        self._recent_gaps: deque[int] = deque()  # the slots before which frames were counted missing lately

    @property
    def period_ns(self) -> float | None:
        """The camera's frame interval, once the grid is known."""
        return None if self._grid is None else self._grid.period

    def restart(self) -> None:
        """Forget the stamps: a replay starting over, or a new activation after a pause."""
        self._stamps.clear()
        self._slots.clear()
        self._grid = None
        self._recent_gaps.clear()

    def add(self, stamp_ns: int) -> int:
        """Note a frame's stamp; frames missing since the previous one (negative: taken back).

        The first time the grid is known, the frames missing among the stamps it was learned from
        are returned too.
        """
        if self._stamps and stamp_ns <= self._stamps[-1]:  # started over, or out of order: measure afresh
            self.restart()
        self._stamps.append(stamp_ns)
        if self._grid is None:
            return self._learn()
        return self._follow(stamp_ns)

    def _learn(self) -> int:
        """Fit the grid once the stamps tell it; the frames missing among them."""
        count = len(self._stamps)
        if count <= MIN_STAMP_INTERVALS:
            return 0
        origin = self._stamps[0]
        offsets = (np.asarray(self._stamps, dtype=np.int64) - origin).astype(np.float64)
        full = count == STAMPS_KEPT or _spans_a_window(offsets)
        if (count - 1) % MIN_STAMP_INTERVALS and not full:
            return 0  # the search is tried every MIN_STAMP_INTERVALS stamps, not on every frame
        fit = _best_fit(offsets, full)
        if fit is None:
            return 0
        self._grid = _Grid(origin, fit.anchor, fit.period)
        slots = fit.slots
        self._slots.extend(int(slot) for slot in slots)
        steps, intervals = np.diff(slots), np.diff(offsets)
        return sum(self._missing(int(slot), int(step), float(interval))
                   for slot, step, interval in zip(slots[1:], steps, intervals))

    def _follow(self, stamp_ns: int) -> int:
        """Place the stamp on the grid and refit it; the slots skipped (-1: a slot taken twice)."""
        grid, last = self._grid, self._slots[-1]
        steps = max(0, round((float(stamp_ns - grid.origin_ns) - grid.slot_time(last)) / grid.period))
        if steps > CLOCK_STEP_SLOTS:  # the camera's clock stepped (boot time to PTP, another recording)
            self._relearn()
            return 0
        self._slots.append(last + steps)
        missing = self._missing(last + steps, steps, float(stamp_ns - self._stamps[-2]))
        slots = np.asarray(self._slots, dtype=np.float64)
        offsets = (np.asarray(self._stamps, dtype=np.int64) - grid.origin_ns).astype(np.float64)
        grid.anchor, grid.period = _fit_line(slots, offsets, grid.period)
        if _line_misfit(slots, offsets, grid.anchor, grid.period) > GRID_MISFIT:
            self._relearn()
        return missing

    def _missing(self, slot: int, steps: int, interval: float) -> int:
        """Frames missing before the stamp in `slot`, `steps` slots after the last one; -1 takes
        back a frame counted missing in the last TAKE_BACK_SLOTS slots.

        The grid says how many, and the interval must agree that there was a gap: a camera whose
        clock wanders (a loop that sleeps a period after each frame) drifts off any grid, but its
        frames do not come GAP_INTERVAL periods apart unless one is missing.
        """
        while self._recent_gaps and self._recent_gaps[0] < slot - TAKE_BACK_SLOTS:
            self._recent_gaps.popleft()
        if steps == 0:  # a slot taken twice: a frame before was late, not a frame after a gap
            if not self._recent_gaps:
                return 0
            self._recent_gaps.pop()
            return -1
        missing = steps - 1 if interval >= GAP_INTERVAL * self._grid.period else 0
        # only the last few can be taken back: a clock that steps days ahead must not cost a list
        # entry per frame it skipped
        self._recent_gaps.extend([slot - 1] * min(missing, TAKE_BACK_SLOTS))
        return missing

    def _relearn(self) -> None:
        """Learn the grid again from the stamps still to come (those seen are judged already)."""
        newest = self._stamps[-1]
        self.restart()
        self._stamps.append(newest)


def _spans_a_window(offsets: np.ndarray) -> bool:
    """True when the stamps span as many periods as a full window holds: under heavy loss (DDS
    dropping most multi-megabyte frames) the window may never fill, and a verdict must not wait
    for stamps that will not come; after a window's time the best grid found is taken."""
    return offsets[-1] >= (STAMPS_KEPT - 1) * min(first_guesses(np.diff(offsets)))


def acceptable_misfit(stamps: int) -> float:
    """The misfit below which a grid is believed from this many stamps: a wrong period fits stamps
    no better than chance, 1/12 on average, and its searched best only CHANCE_MARGIN spreads better."""
    return max(REGULAR_ENOUGH, RANDOM_MISFIT - CHANCE_MARGIN * RANDOM_MISFIT_SPREAD / np.sqrt(stamps))


def first_guesses(intervals: np.ndarray) -> tuple[float, float]:
    """Two guesses of the period from the intervals: their median, right while fewer than half of
    them span a lost frame, and the median of the shortest ones (those under SINGLE_PERIOD_LIMIT
    times a low percentile), right while some frames follow each other even when most are lost."""
    shortest = np.percentile(intervals, SHORT_INTERVAL_PERCENTILE, method="lower")
    return float(np.median(intervals)), float(np.median(intervals[intervals < SINGLE_PERIOD_LIMIT * shortest]))


def slot_misfit(offsets: np.ndarray, periods: np.ndarray) -> np.ndarray:
    """Per period: the mean squared distance of the stamps from the nearest slot of a grid of that
    period (in periods squared), its phase their circular mean. 0: on the grid; 1/12: at random."""
    cycles = np.outer(1.0 / periods, offsets)
    phases = np.angle(np.exp(2j * np.pi * cycles).mean(axis=1)) / (2 * np.pi)
    residuals = cycles - phases[:, None]
    return np.mean((residuals - np.round(residuals)) ** 2, axis=1)


@dataclass(frozen=True)
class _GridFit:
    period: float
    misfit: float
    anchor: float
    slots: np.ndarray


def _best_fit(offsets: np.ndarray, full: bool) -> _GridFit | None:
    """Near each first guess the grid that puts the stamps closest to their slots; of the two
    the coarser one the stamps support (acceptable_misfit; from a full window: unless the finer
    fits FINER_GRID_MARGIN times better). A finer grid always fits at least as well (a grid of
    half the period fits frames half a period late), but it says that half the frames were lost,
    which needs better evidence. None: no grid yet."""
    fits = sorted((_closest_fit(offsets, guess) for guess in first_guesses(np.diff(offsets))),
                  key=lambda fit: fit.period, reverse=True)
    limit = FINER_GRID_MARGIN * min(fit.misfit for fit in fits) if full else acceptable_misfit(len(offsets))
    return next((fit for fit in fits if fit.misfit <= limit), None)


def _closest_fit(offsets: np.ndarray, guess: float) -> _GridFit:
    """The grid, its period from guess / GUESS_RANGE to guess * GUESS_RANGE, closest to the stamps."""
    step = SEARCH_STEP_PERIODS * guess / offsets[-1]  # relative: the last stamp moves SEARCH_STEP_PERIODS
    count = min(MAX_SEARCH_PERIODS, int(np.ceil(2 * np.log(GUESS_RANGE) / step)) + 1)
    periods = np.geomspace(guess / GUESS_RANGE, guess * GUESS_RANGE, count)
    return _fitted_grid(offsets, float(periods[int(np.argmin(slot_misfit(offsets, periods)))]))


def _fitted_grid(offsets: np.ndarray, period: float) -> _GridFit:
    """The line through the stamps and their slots, from a period close to the camera's."""
    slots = np.maximum.accumulate(np.round((offsets - _phase(offsets, period)) / period))
    for _ in range(GRID_FIT_ROUNDS):
        anchor, period = _fit_line(slots, offsets, period)
        slots = np.maximum.accumulate(np.round((offsets - anchor) / period))
    anchor, period = _fit_line(slots, offsets, period)
    return _GridFit(period, _line_misfit(slots, offsets, anchor, period), anchor, slots)


def _phase(offsets: np.ndarray, period: float) -> float:
    """Where in the period the stamps sit (their circular mean), as an offset."""
    return float(np.angle(np.exp(2j * np.pi * offsets / period).mean()) / (2 * np.pi) * period)


def _fit_line(slots: np.ndarray, offsets: np.ndarray, fallback_period: float) -> tuple[float, float]:
    """Least-squares (anchor, period) of offsets ~ anchor + slots * period."""
    centred = slots - slots.mean()
    spread = float(centred @ centred)
    period = float(centred @ (offsets - offsets.mean())) / spread if spread > 0 else fallback_period
    return float(offsets.mean() - period * slots.mean()), period


def _line_misfit(slots: np.ndarray, offsets: np.ndarray, anchor: float, period: float) -> float:
    """Mean squared distance of the stamps from their slots' times, in periods squared."""
    return float(np.mean(((offsets - anchor) / period - slots) ** 2))
