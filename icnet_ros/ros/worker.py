"""The node's two worker threads: segmentation and publishing (no ROS imports).

Each runs one function on whatever its LatestFrameBuffer holds, until stopped. With a `finish`
function the worker keeps one batch in flight: it starts batch k+1 before finishing batch k (the
segmentation worker: the GPU computes frame k while frame k+1 uploads). A worker never dies: an
exception in one batch (a bug, a publisher failing at shutdown) is logged and the loop goes on.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from icnet_ros.ros.frame_buffer import LatestFrameBuffer

Log = Callable[[str, str], None]


class BufferWorker:
    """Runs `handle(items)` on a thread of its own for every batch of items taken from `buffer`;
    with `finish`, `handle` only starts the work and `finish(started)` completes it one batch later."""

    def __init__(self, name: str, buffer: LatestFrameBuffer, handle: Callable[[list[Any]], Any],
                 log: Log | None = None, poll_s: float = 0.1, finish: Callable[[Any], Any] | None = None) -> None:
        self.name = name
        self.buffer = buffer
        self.handle = handle
        self.finish = finish
        self.log = log or (lambda kind, text: None)
        self.poll_s = poll_s
        self._thread = threading.Thread(target=self._run, name=f"icnet_{name}_worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the buffer and wait for the thread; True once it has ended (within `timeout`)."""
        self.buffer.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        in_flight = None
        while not self.buffer.closed:
            # with a batch in flight, look for the next one without waiting: finish this one instead
            items = self.buffer.take(0.0 if in_flight is not None else self.poll_s)
            started = self._call(self.handle, items) if items else None
            if in_flight is not None:
                self._call(self.finish, in_flight)
            in_flight = started if self.finish is not None else None
        if in_flight is not None:  # stopped with a batch started: complete it, a frame is never lost
            self._call(self.finish, in_flight)

    def _call(self, function: Callable[[Any], Any], argument: Any) -> Any:
        try:
            return function(argument)
        except Exception as error:  # report, keep going: the node must outlive one bad batch
            self.log(self.name, f"{self.name} failed: {type(error).__name__}: {error}")
            return None
