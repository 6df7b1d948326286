"""The one-slot-per-camera buffer between the ROS callbacks and the worker threads (no ROS imports).

The image callback only swaps the newest message into its camera's slot, so the executor never
waits for the engine; the segmentation worker takes whatever is there. The same buffer sits between
the segmentation and the publishing worker, so a slow subscriber never delays the next frame.
An item replaced before it was taken is reported to the caller, who counts it as dropped.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IncomingFrame:
    """A message as the callback received it; nothing is converted on the executor's thread."""

    camera: int
    message: Any
    compressed: bool
    received_ns: int


class LatestFrameBuffer:
    """The newest untaken item of each camera (anything with a `camera` index). put() never blocks;
    take() waits for items."""

    def __init__(self, cameras: int) -> None:
        self._slots: list[Any] = [None] * cameras
        self._ready = threading.Condition()
        self._closed = False

    def put(self, frame: Any) -> bool:
        """Store `frame` as its camera's newest; True if it replaced one not yet taken (a drop)."""
        with self._ready:
            replaced = self._slots[frame.camera] is not None
            self._slots[frame.camera] = frame
            self._ready.notify()
        return replaced

    def take(self, timeout: float | None = None) -> list[Any]:
        """Every camera's waiting frame (emptying the slots); [] after `timeout` s or once closed."""
        with self._ready:
            self._ready.wait_for(lambda: self._closed or any(self._slots), timeout)
            frames = [frame for frame in self._slots if frame is not None]
            self._slots = [None] * len(self._slots)
        return frames

    def waiting(self) -> int:
        """How many cameras have an item waiting to be taken."""
        with self._ready:
            return sum(item is not None for item in self._slots)

    def close(self) -> None:
        """Wake take() for good (shutdown)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
