"""An asynchronous stand-in for the torch.cuda calls cuda.py makes, for CPU tests of the CUDA runner.

Work issued on a stream runs late, as on a GPU, so that a missing wait_event / wait_stream shows as
wrong data instead of passing by luck:

- in-place copies and fills issued on a stream (uploads, downloads, device copies, `alpha.fill_`)
  and graph replays are queued on that stream, not run;
- a queued item runs only when something needs it: an Event.synchronize() or torch.cuda.synchronize()
  on the host, a wait on another stream that is being run, or host-side work on the same stream
  (any other torch operation issued on a stream first runs what that stream has queued: it would
  run after it on a GPU). Streams named in `eager` instead run each item as soon as what it waits
  for has run, so both orders of two unordered streams are tried by running a test under several
  schedules;
- wait_event / wait_stream make the waiting stream run the other one up to the recorded point
  first, and no further.

Each item runs with a vector clock (per stream, merged at waits and at host synchronizations), so a
test can ask whether two pieces of work were ordered at all, whichever order they happened to run
in (`ordered`): what a TensorRT execution context shared by two streams needs.

It also counts synchronize / empty_cache / graph pools / captures / streams, and records which of
them were made outside a `torch.cuda.device(...)` context (what a cuda:1 engine needs).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from itertools import count

import torch
from torch.overrides import TorchFunctionMode

_ids = count(1)
# tensor operations that only read metadata or allocate: they run at once, without running the stream
_PASS_THROUGH = {"__get__", "size", "dim", "numel", "element_size", "stride", "is_contiguous", "data_ptr",
                 "empty", "empty_like", "new_empty", "is_pinned", "__len__"}
_DEFERRED = {torch.Tensor.copy_, torch.Tensor.fill_}


class Token:
    """One recorded point of a stream: done once the stream has run up to it."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.done = False
        self.clock: dict[int, int] = {}
        self.time = 0.0


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str) -> None:
        self.fake = fake
        self.name = name
        self.cuda_stream = next(_ids)
        self.queue: deque = deque()
        self.clock: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<fake stream {self.name}>"

    # the API
    def wait_stream(self, other: FakeStream) -> None:
        self.fake.inside("wait_stream")
        self.fake.enqueue(self, ("wait", self.fake.mark(other)))

    def wait_event(self, event: FakeEvent) -> None:
        self.fake.inside("wait_event")
        if event.token is not None:  # waiting for an event never recorded is a no-op, as in CUDA
            self.fake.enqueue(self, ("wait", event.token))

    def synchronize(self) -> None:
        self.fake.complete(self.fake.mark(self))


class FakeEvent:
    def __init__(self, fake: FakeCuda) -> None:
        self.fake = fake
        self.token: Token | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.fake.inside("Event.record")
        self.token = self.fake.mark(stream or self.fake.current)

    def synchronize(self) -> None:
        assert self.token is not None, "waiting for an event that was never recorded"
        self.fake.complete(self.token)

    def query(self) -> bool:
        return self.token is None or self.token.done

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.token.done and end.token.done, "elapsed_time of events that have not completed"
        return (end.token.time - self.token.time) * 1e3


class FakeCuda:
    """Stands in for torch.cuda's streams, events, device context and memory calls (see the module docstring)."""

    def __init__(self) -> None:
        self.depth = 0  # nesting of torch.cuda.device(...)
        self.devices: list = []
        self.counts = {"synchronize": 0, "empty_cache": 0, "pool": 0, "capture": 0, "stream": 0}
        self.outside_device: list[str] = []
        self.streams: list[FakeStream] = []
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.executing: FakeStream | None = None  # the stream whose queued item is running now
        self.capturing = False
        self.eager: set[FakeStream] = set()
        self.host_clock: dict[int, int] = {}

    def inside(self, what: str) -> None:
        if self.depth == 0:
            self.outside_device.append(what)

    # --- the queue machinery ----------------------------------------------------------------------
    def mark(self, stream: FakeStream) -> Token:
        token = Token(stream)
        self.enqueue(stream, ("record", token))
        return token

    def enqueue(self, stream: FakeStream, item: tuple) -> None:
        if item[0] == "op":  # it runs later in the inference mode it was issued in
            function, inference = item[1], torch.is_inference_mode_enabled()

            def run():
                with torch.inference_mode(inference):
                    function()

            item = ("op", run)
        if self.executing is stream:  # issued by a running item of this stream: part of it
            self._execute(stream, item)
            return
        stream.queue.append((*item, dict(self.host_clock)))
        self.pump()

    def enqueue_op(self, function) -> None:
        """Queue `function` on the current stream (run inline inside a running item or a capture)."""
        stream = self.executing or self.current
        if self.capturing:
            return  # a capture records work, it runs none
        self.enqueue(stream, ("op", function))

    def complete(self, token: Token) -> None:
        """Run token's stream up to the token (and whatever that waits for); the host then knows it ran."""
        while not token.done:
            self._step(token.stream)
        _merge(self.host_clock, token.clock)
        self.pump()

    def run_all(self) -> None:
        for stream in [self.default, *self.streams]:
            if stream.queue:
                self.complete(self.mark(stream))

    def pump(self) -> None:
        """Run what the eager streams can run without waiting for a lazy stream."""
        progress = True
        while progress:
            progress = False
            for stream in self.eager:
                while stream.queue and self._ready(stream.queue[0]):
                    self._step(stream)
                    progress = True

    @staticmethod
    def _ready(item) -> bool:
        return item[0] != "wait" or item[1].done

    def _step(self, stream: FakeStream) -> None:
        item = stream.queue.popleft()
        _merge(stream.clock, item[-1])
        self._execute(stream, item[:-1])

    def _execute(self, stream: FakeStream, item: tuple) -> None:
        kind = item[0]
        if kind == "wait":
            token = item[1]
            if not token.done:
                self.complete_quietly(token)
            _merge(stream.clock, token.clock)
            return
        stream.clock[stream.cuda_stream] = stream.clock.get(stream.cuda_stream, 0) + 1
        if kind == "record":
            token = item[1]
            token.done, token.clock, token.time = True, dict(stream.clock), time.perf_counter()
            return
        previous_executing, previous_current = self.executing, self.current
        self.executing = self.current = stream
        try:
            item[1]()
        finally:
            self.executing, self.current = previous_executing, previous_current

    def complete_quietly(self, token: Token) -> None:
        """complete() without telling the host: a stream waiting for another one."""
        while not token.done:
            self._step(token.stream)

    def flush(self, stream: FakeStream) -> None:
        """Run everything queued on `stream` (before host-side work issued on it)."""
        if stream.queue:
            self.complete_quietly(self.mark(stream))

    def ordered(self, first: tuple, second: tuple) -> bool:
        """Whether two executions (stream, clock) were ordered one before the other by waits or syncs."""
        (stream_a, clock_a), (stream_b, clock_b) = first, second
        a, b = stream_a.cuda_stream, stream_b.cuda_stream
        return clock_a.get(a, 0) <= clock_b.get(a, 0) or clock_b.get(b, 0) <= clock_a.get(b, 0)

    def where(self) -> tuple:
        """(stream, vector clock) of the work running now: call it from a queued op."""
        stream = self.executing or self.current
        return stream, dict(stream.clock)

    # --- the torch.cuda API -----------------------------------------------------------------------
    def Stream(self, device=None):
        self.inside("Stream()")
        self.counts["stream"] += 1
        stream = FakeStream(self, f"stream{len(self.streams)}")
        self.streams.append(stream)
        return stream

    def Event(self, enable_timing=False):
        return FakeEvent(self)

    @contextlib.contextmanager
    def device(self, device):
        self.depth += 1
        self.devices.append(device)
        try:
            yield
        finally:
            self.depth -= 1

    @contextlib.contextmanager
    def stream(self, stream):
        self.inside("stream()")
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def current_stream(self, device=None):
        return self.executing or self.current

    def set_stream(self, stream):
        self.current = stream

    def graph_pool_handle(self):
        self.inside("graph_pool_handle")
        self.counts["pool"] += 1
        return object()

    def synchronize(self, device=None):
        self.counts["synchronize"] += 1
        self.run_all()

    def empty_cache(self):
        self.counts["empty_cache"] += 1

    def current_device(self):
        return 0


def _merge(into: dict[int, int], other: dict[int, int]) -> None:
    for key, value in other.items():
        if into.get(key, 0) < value:
            into[key] = value


class LateWork(TorchFunctionMode):
    """Queues in-place copies and fills issued on a fake stream; any other operation on a stream first
    runs what that stream has queued (see the module docstring)."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fake = self.fake
        if fake.executing is None and not fake.capturing and getattr(func, "__name__", "") not in _PASS_THROUGH:
            stream = fake.current
            if func in _DEFERRED and stream is not fake.default:
                fake.enqueue(stream, ("op", lambda: func(*args, **kwargs)))
                return args[0]
            fake.flush(stream)
        return func(*args, **kwargs)


class FakeGraph:
    """A 'captured' function: a replay queues its recomputation, from the same static inputs into the
    same output, on the current stream."""

    def __init__(self, fake: FakeCuda, function, output):
        self.fake, self.function, self.output, self.replays = fake, function, output, 0

    def replay(self):
        self.replays += 1
        function, output = self.function, self.output
        self.fake.enqueue_op(lambda: output.copy_(function()))

    def reset(self):
        self.function = None


def install(monkeypatch, runner_class) -> FakeCuda:
    """Replace torch.cuda (and CudaRunner._capture, pinned memory) with a FakeCuda for one test."""
    from icnet_ros.inference import cuda as cuda_module

    fake = FakeCuda()
    for name in ("Stream", "Event", "device", "stream", "current_stream", "set_stream", "graph_pool_handle",
                 "synchronize", "empty_cache", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(cuda_module, "pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))

    def capture(runner, function, pool):
        """As torch.cuda.graph: a device-wide synchronize, then the capture on the capture stream,
        which runs nothing (the function runs once here only to give the output its shape)."""
        fake.inside("capture")
        fake.counts["capture"] += 1
        fake.run_all()
        previous, fake.current = fake.current, runner.capture_stream
        fake.capturing = True
        try:
            with torch.inference_mode():
                output = function()
        finally:
            fake.capturing = False
            fake.current = previous
        return FakeGraph(fake, function, output), output

    monkeypatch.setattr(runner_class, "_capture", capture)
    return fake
