"""Throttled warnings that say how many were held back (no ROS imports).

rclpy's own `throttle_duration_sec` drops repeats silently; an operator debugging a broken camera
needs to know how many frames were affected, so this keeps the count.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogThrottle:
    """At most one message per kind every `interval_s`, saying how many were held back in between.

    A camera sending a broken stream at 30 Hz must not flood the log, and the operator must still
    learn how many frames were affected.
    """

    def __init__(self, emit: Callable[[str], None], interval_s: float, clock_s: Callable[[], float] = time.monotonic
                 ) -> None:
        self.emit = emit
        self.interval_s = interval_s
        self.clock_s = clock_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, text: str) -> None:
        now = self.clock_s()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            held = self._held.pop(kind, 0)
            self._last[kind] = now
        self.emit(text + (f" ({held} more like this since the last report)" if held else ""))
