"""The node's two worker threads: segmentation and publishing (no ROS imports).

Each runs one function on whatever its LatestFrameBuffer holds, until stopped. A worker never
dies: an exception in one batch (a bug, a publisher failing at shutdown) is logged and the loop
goes on with the next batch.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from icnet_ros.ros.frame_buffer import LatestFrameBuffer

Log = Callable[[str, str], None]


class BufferWorker:
    """Runs `handle(items)` on a thread of its own for every batch of items taken from `buffer`."""

    def __init__(self, name: str, buffer: LatestFrameBuffer, handle: Callable[[list[Any]], Any],
                 log: Log | None = None, poll_s: float = 0.1) -> None:
        self.name = name
        self.buffer = buffer
        self.handle = handle
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
        while not self.buffer.closed:
            items = self.buffer.take(self.poll_s)
            if not items:
                continue
            try:
                self.handle(items)
            except Exception as error:  # report, keep going: the node must outlive one bad batch
                self.log(self.name, f"{self.name} failed: {type(error).__name__}: {error}")
