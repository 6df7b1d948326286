"""The CUDA runner of the engine: pinned uploads, three streams, double buffers and CUDA graphs.

It knows nothing of the engine: it gets the computation as plan.Stages (callables shared with the
CPU path and tested there) and a Plan per call. Which graphs exist, when they are captured and what
happens when a capture fails is graphs.GraphCache (also tested on the CPU); this module is the
CUDA plumbing under it.

Everything runs on the engine's device: every call enters torch.cuda.device(device), the streams
are created on it, and graphs are captured on a capture stream of that device (torch.cuda.graph's
own default stream belongs to whichever device was current when it was first used, which is how a
cuda:1 engine captured nothing and replayed stale labels).

One call, three streams, ordered by events (never by the host):

    upload stream    pinned host -> lane.device_in                        (frame k+1)
    compute stream   device_in -> static input, forward, postprocess,     (frame k)
                     outputs copied into lane.device_out
    download stream  lane.device_out -> fresh pinned host buffers         (frame k-1)

Each shape keeps two lanes of device buffers (input and outputs), so with two calls in flight the
upload of the next call and the download of the previous one overlap the compute of this one (the
node and segment_stream keep one call in flight: they collect frame k-1 before submitting frame
k+1, so the upload of k+1 overlaps the compute and download of k); the static graph outputs are
copied into the lane (a few microseconds of device bandwidth) so the next replay may overwrite them
while they download. Host buffers come from PyTorch's pinned caching allocator per call, which
reuses a block only once the copies that used it have finished; the arrays handed back are views of
them (no host copy).

Written against the documented APIs (torch.cuda.Stream / Event / CUDAGraph / graph / device,
pinned memory, non_blocking copies); it cannot run on a machine without CUDA.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from icnet_ros.inference.graphs import DEFAULT_CAPACITY, Entry, GraphCache
from icnet_ros.inference.plan import Plan, Stages, postprocess, run_stage
from icnet_ros.inference.timing import StageTimings

WARMUP_RUNS = 3  # eager runs on the capture stream before a capture: cuDNN autotuning, lazy allocations
LANES = 2  # device buffer sets per shape: one call computing while the next uploads and the last downloads
EVENTS = ("upload_start", "uploaded", "compute_start", "forwarded", "processed", "download_start", "downloaded")


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor from PyTorch's pinned caching allocator (which reuses a block only after
    the copies recorded on it have finished)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


@dataclass
class _Lane:
    """Device buffers of one call in flight, and the events that say when they are free again."""

    device_in: torch.Tensor
    device_out: dict[str, torch.Tensor] = field(default_factory=dict)
    consumed: Any = None  # event: the compute that read device_in (and wrote device_out) finished
    downloaded: Any = None  # event: the download that read device_out finished


@dataclass
class _Shape:
    """Static tensors, graphs and lanes of one forward key (a GraphCache entry's state)."""

    static_in: torch.Tensor
    alpha: torch.Tensor
    lanes: list[_Lane]
    pool: Any = None
    forward_graph: Any = None
    logits: torch.Tensor | None = None
    stage_graphs: dict[tuple[str, str], tuple[Any, torch.Tensor]] = field(default_factory=dict)
    keepalive: Any = None  # e.g. the TensorRT context whose memory the forward graph reads
    next_lane: int = 0


@dataclass
class _Work:
    """One submitted call: its host output buffers (filled by the download) and its events."""

    host: dict[str, torch.Tensor]
    events: dict[str, Any]
    host_upload_ms: float
    own_buffers: Any = None  # the device buffers of a call that has no cache entry, kept until collected


class CudaRunner:
    """Submit / collect engine calls on one CUDA device. Not thread-safe: one caller thread."""

    def __init__(self, device: torch.device, stages: Stages, *, use_graphs: bool = True,
                 cache_size: int = DEFAULT_CAPACITY) -> None:
        """device: a CUDA device with its index (engine.resolve_device gives one)."""
        self.device = device
        self.stages = stages
        torch.backends.cudnn.benchmark = True  # fixed shapes per plan: let cuDNN pick its fastest kernels
        with torch.cuda.device(self.device):
            self.upload_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)
            self.download_stream = torch.cuda.Stream(self.device)
            self.capture_stream = torch.cuda.Stream(self.device)
        # the cache calls back through a weak proxy: runner <-> cache would be a reference cycle
        self.cache = GraphCache(weakref.proxy(self), capacity=cache_size, use_graphs=use_graphs)

    # --- the GraphCache's Capturer ----------------------------------------------------------------
    def allocate(self, plan: Plan) -> _Shape:
        shape = (plan.batch, plan.height, plan.width, 3)
        current = torch.cuda.current_stream(self.device)
        static_in = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)  # warm-up content
        lanes = [_Lane(torch.empty(shape, dtype=torch.uint8, device=self.device)) for _ in range(LANES)]
        state = _Shape(static_in, torch.zeros((), dtype=torch.int32, device=self.device), lanes)
        if self.stages.keepalive is not None:
            state.keepalive = self.stages.keepalive(plan)
        for stream in (self.upload_stream, self.compute_stream, self.capture_stream):
            stream.wait_stream(current)  # the buffers were filled on the current stream: order, don't block
        return state

    def capture_forward(self, state: _Shape, plan: Plan) -> None:
        def forward():
            return self.stages.forward(state.static_in, plan)

        self._warm_up(forward)
        state.pool = torch.cuda.graph_pool_handle()
        state.forward_graph, state.logits = self._capture(forward, state.pool)

    def capture_stage(self, state: _Shape, plan: Plan, stage: str) -> None:
        values = {"logits": state.logits}
        values.update({name: out for (method, name), (_, out) in state.stage_graphs.items()
                       if method == plan.upsample})

        def run():
            return run_stage(self.stages, stage, state.static_in, plan, state.alpha, values)

        self._warm_up(run)
        state.stage_graphs[(plan.upsample, stage)] = self._capture(run, state.pool)

    def discard_stages(self, state: _Shape, upsample: str) -> None:
        for key in [key for key in state.stage_graphs if key[0] == upsample]:
            graph, _ = state.stage_graphs.pop(key)
            graph.reset()

    def release(self, state: _Shape) -> None:
        """Free a shape's graphs, pool and buffers (on eviction or close: never on a hot path)."""
        torch.cuda.synchronize(self.device)  # nothing in flight may still read them
        for graph, _ in state.stage_graphs.values():
            graph.reset()
        if state.forward_graph is not None:
            state.forward_graph.reset()
        state.stage_graphs.clear()
        state.forward_graph = state.logits = state.keepalive = state.pool = None
        state.lanes.clear()
        state.static_in = state.alpha = None
        with torch.cuda.device(self.device):
            torch.cuda.empty_cache()  # a released graph's private pool returns to the device only here

    def _warm_up(self, function) -> None:
        """Run `function` on the capture stream, ordered after the compute stream's work and before its
        next: the frame in flight and the warm-up may share state beyond PyTorch's allocator (the
        TensorRT backend's one execution context per engine, whose activation memory every graph of
        that engine replays), so they must never run at the same time."""
        current = torch.cuda.current_stream(self.device)
        self.capture_stream.wait_stream(current)
        self.capture_stream.wait_stream(self.compute_stream)
        with torch.cuda.stream(self.capture_stream), torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                function()
        current.wait_stream(self.capture_stream)
        self.compute_stream.wait_stream(self.capture_stream)

    def _capture(self, function, pool) -> tuple[Any, Any]:
        """(graph, output) of `function` captured on this device's capture stream, into `pool`."""
        graph = torch.cuda.CUDAGraph()
        previous = torch.cuda.current_stream(self.device)
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
                output = function()
        except BaseException:
            torch.cuda.set_stream(previous)  # a failed capture_end leaves the capture stream current
            with contextlib.suppress(Exception):
                graph.reset()
            self.capture_stream = torch.cuda.Stream(self.device)  # a fresh one: no trace of the failed capture
            self._end_generator_capture()
            raise
        return graph, output

    def _end_generator_capture(self) -> None:
        """Clear the mark a failed capture leaves on the device's random number generator.

        torch.cuda.graph marks the default CUDA generator as capturing when a capture begins and unmarks
        it only when the capture ends well; after a failed one every later random op on the device (our
        own warm-up input for the next shape, and any of the user's) raises "Offset increment outside
        graph capture encountered unexpectedly" (seen on an H200, torch 2.11). Capturing one trivial
        graph runs the generator's begin/end pair again and leaves it unmarked."""
        scratch = torch.zeros(1, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with contextlib.suppress(Exception):  # best effort: the capture's own error is the one to report
            with torch.inference_mode(), torch.cuda.graph(graph, stream=self.capture_stream):
                scratch.add_(1)
            graph.reset()

    # --- the engine's calls ------------------------------------------------------------------------
    def prepare(self, plan: Plan) -> None:
        """Allocate and capture everything `plan` needs now (start-up), not on its first frame; off the
        hot path, so it may evict the least recently used shape to make room."""
        if plan.high_res_regions:
            return  # sparse forwards run eagerly (submit): nothing to capture or keep
        with torch.cuda.device(self.device):
            self.cache.entry(plan)

    def submit(self, batch: np.ndarray, plan: Plan, alpha: int) -> _Work:
        """Queue upload, compute and download of `batch`; returns at once (the GPU works on).

        A shape the cache has no room for runs eagerly in buffers of its own: nothing is evicted (a
        release synchronizes the device) while frames flow.
        """
        with torch.cuda.device(self.device):
            # a sparse forward hands its choice of regions to the engine: never captured, no cache slot
            entry = None if plan.high_res_regions else self.cache.entry(plan, hot=True)
            own = None
            if entry is None:
                own = entry = self._uncached(plan)
            state: _Shape = entry.state
            lane = state.lanes[state.next_lane]
            state.next_lane = (state.next_lane + 1) % LANES
            events = {name: torch.cuda.Event(enable_timing=True) for name in EVENTS}
            start = time.perf_counter()
            pinned = pinned_empty(batch.shape, torch.uint8)
            np.copyto(pinned.numpy(), batch)  # pageable -> pinned on the host: the upload is then async DMA
            host_ms = (time.perf_counter() - start) * 1e3
            self._upload(pinned, lane, events)
            outputs = self._compute(entry, state, lane, plan, alpha, events)
            host = self._download(outputs, lane, events)
            if own is not None:
                self._record_streams(state, lane)
        return _Work(host, events, host_ms, own)

    def _uncached(self, plan: Plan) -> Entry:
        """An entry outside the cache for one eager call: one lane of fresh buffers, no graphs."""
        shape = (plan.batch, plan.height, plan.width, 3)
        current = torch.cuda.current_stream(self.device)
        lane = _Lane(torch.empty(shape, dtype=torch.uint8, device=self.device))
        state = _Shape(None, torch.zeros((), dtype=torch.int32, device=self.device), [lane])
        for stream in (self.upload_stream, self.compute_stream):
            stream.wait_stream(current)  # the allocator handed out blocks ordered on the current stream
        return Entry(plan.forward_key, state)

    def _record_streams(self, state: _Shape, lane: _Lane) -> None:
        """Tell the caching allocator which streams use an uncached call's buffers, so that freeing them
        (after collect, or if the call is dropped) never hands their memory out while a stream still uses it."""
        if not lane.device_in.is_cuda:
            return
        for stream in (self.upload_stream, self.compute_stream):
            lane.device_in.record_stream(stream)
        state.alpha.record_stream(self.compute_stream)
        for tensor in lane.device_out.values():
            tensor.record_stream(self.download_stream)

    def collect(self, work: _Work) -> tuple[dict[str, np.ndarray], StageTimings]:
        """Wait for a submitted call; its outputs as numpy views of its own pinned buffers, and timings."""
        events = work.events
        events["downloaded"].synchronize()
        timings = StageTimings(
            upload_ms=work.host_upload_ms + events["upload_start"].elapsed_time(events["uploaded"]),
            forward_ms=events["compute_start"].elapsed_time(events["forwarded"]),
            postprocess_ms=events["forwarded"].elapsed_time(events["processed"]),
            download_ms=events["download_start"].elapsed_time(events["downloaded"]),
        )
        return {name: tensor.numpy() for name, tensor in work.host.items()}, timings

    def close(self) -> None:
        """Release every captured shape (lifecycle deactivate); the runner stays usable."""
        with torch.cuda.device(self.device):
            self.cache.clear()

    # --- the three streams -------------------------------------------------------------------------
    def _upload(self, pinned: torch.Tensor, lane: _Lane, events: dict) -> None:
        with torch.cuda.stream(self.upload_stream):
            if lane.consumed is not None:
                self.upload_stream.wait_event(lane.consumed)  # the lane's last frame was read by its compute
            events["upload_start"].record()
            lane.device_in.copy_(pinned, non_blocking=True)
            events["uploaded"].record()

    def _compute(self, entry, state: _Shape, lane: _Lane, plan: Plan, alpha: int, events: dict) -> dict:
        stream = self.compute_stream
        with torch.cuda.stream(stream), torch.inference_mode():
            stream.wait_event(events["uploaded"])
            if lane.downloaded is not None:
                stream.wait_event(lane.downloaded)  # the lane's outputs of two calls ago have left the device
            events["compute_start"].record()
            state.alpha.fill_(alpha)
            if entry.forward_graph:
                state.static_in.copy_(lane.device_in)  # device-to-device: the graph reads fixed addresses
                frames = state.static_in
                state.forward_graph.replay()
                logits = state.logits
            else:
                frames = lane.device_in
                logits = self.stages.forward(frames, plan)
            events["forwarded"].record()
            if entry.forward_graph and entry.graph_stages(plan):
                for stage in plan.stages:
                    state.stage_graphs[(plan.upsample, stage)][0].replay()
                outputs = {name: state.stage_graphs[(plan.upsample, name)][1] for name in plan.outputs}
            else:
                outputs = postprocess(self.stages, frames, logits, plan, state.alpha)
            for name, tensor in outputs.items():  # the double buffer: the next replay may overwrite outputs
                lane_out = lane.device_out.get(name)
                if lane_out is None or lane_out.shape != tensor.shape or lane_out.dtype != tensor.dtype:
                    lane_out = lane.device_out[name] = torch.empty_like(tensor)
                lane_out.copy_(tensor)
            events["processed"].record()
        lane.consumed = events["processed"]
        return {name: lane.device_out[name] for name in plan.outputs}

    def _download(self, outputs: dict[str, torch.Tensor], lane: _Lane, events: dict) -> dict[str, torch.Tensor]:
        host = {}
        with torch.cuda.stream(self.download_stream):
            self.download_stream.wait_event(events["processed"])
            events["download_start"].record()
            for name, tensor in outputs.items():
                host[name] = pinned_empty(tensor.shape, tensor.dtype)
                host[name].copy_(tensor, non_blocking=True)
            events["downloaded"].record()
        lane.downloaded = events["downloaded"]
        return host
