"""The CUDA-only pieces of the engine: pinned buffers, streams, events and CUDA graphs.

Everything here is plumbing around two calls that are shared with the CPU path and tested there:
SegmentationEngine.forward_logits and SegmentationEngine.postprocess. Per Plan (batch, size, branch,
precision, channel order, outputs, upsample method) the runner keeps a `_Frame`: static device
tensors, a captured graph for the network (and one for the postprocess when it has static shapes,
i.e. the dense upsample), and two lanes of pinned host buffers so that one call can be in flight
while the next is prepared (SegmentationEngine.segment_stream).

Three streams: uploads, compute and downloads. Upload k+1 overlaps compute k; download k overlaps
compute k+1. Events order them and time the stages on the device clock.

Written against the documented APIs (torch.cuda.Stream / Event / CUDAGraph / graph, pinned memory,
non_blocking copies); it cannot run on a machine without CUDA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from icnet_ros.inference.timing import StageTimings

if TYPE_CHECKING:
    from icnet_ros.inference.engine import Plan, SegmentationEngine

WARMUP_RUNS = 3  # eager runs on a side stream before capture: cuDNN autotuning and lazy allocations
LANES = 2  # pinned buffer sets per plan: one call in flight while the next one is filled


@dataclass
class _Lane:
    """Host and device buffers of one call in flight."""

    pinned_in: torch.Tensor
    device_in: torch.Tensor
    pinned_out: dict[str, torch.Tensor] = field(default_factory=dict)
    done: Any = None  # event: this lane's download finished


@dataclass
class _Frame:
    """Static tensors and captured graphs for one Plan."""

    static_in: torch.Tensor
    alpha: torch.Tensor
    lanes: list[_Lane]
    forward_graph: Any = None
    post_graph: Any = None
    logits: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] | None = None
    outputs_free: Any = None  # event: the last download from the static outputs finished
    next_lane: int = 0


@dataclass
class _Pending:
    frame: _Frame
    lane: _Lane
    plan: Any
    events: dict[str, Any]
    host_upload_ms: float


class CudaRunner:
    """Submit / collect engine calls on one CUDA device."""

    def __init__(self, engine: SegmentationEngine, use_graphs: bool = True) -> None:
        self.engine = engine
        self.device = engine.device
        self.use_graphs = use_graphs
        torch.backends.cudnn.benchmark = True  # fixed shapes per plan: let cuDNN pick its fastest kernels
        self.upload_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.download_stream = torch.cuda.Stream(self.device)
        self._frames: dict[Plan, _Frame] = {}

    # --- per plan state -------------------------------------------------------------------------
    def _frame(self, plan: Plan) -> _Frame:
        frame = self._frames.get(plan)
        if frame is None:
            frame = self._new_frame(plan)
            if self.use_graphs:
                self._capture(frame, plan)
            self._frames[plan] = frame
        return frame

    def _new_frame(self, plan: Plan) -> _Frame:
        shape = (plan.batch, plan.height, plan.width, 3)
        static_in = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)  # warm-up content
        lanes = [_Lane(torch.empty(shape, dtype=torch.uint8, pin_memory=True),
                       torch.empty(shape, dtype=torch.uint8, device=self.device)) for _ in range(LANES)]
        frame = _Frame(static_in, torch.zeros((), dtype=torch.int32, device=self.device), lanes)
        # The buffers were filled on the default stream; the worker streams must not race with that.
        torch.cuda.synchronize(self.device)
        return frame

    def _capture(self, frame: _Frame, plan: Plan) -> None:
        """Warm up on a side stream, then capture the network (and a static postprocess) as graphs."""
        capture_post = plan.upsample == "dense"  # the sparse shortcut has data-dependent shapes
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                logits = self.engine.forward_logits(frame.static_in, plan)
                if capture_post:
                    self.engine.postprocess(frame.static_in, logits, plan, frame.alpha)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # the two graphs replay in capture order: one pool is safe
        frame.forward_graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(frame.forward_graph, pool=pool):
            frame.logits = self.engine.forward_logits(frame.static_in, plan)
        if capture_post:
            frame.post_graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(frame.post_graph, pool=pool):
                frame.outputs = self.engine.postprocess(frame.static_in, frame.logits, plan, frame.alpha)

    # --- one call -------------------------------------------------------------------------------
    def submit(self, batch: np.ndarray, plan: Plan, alpha: int) -> _Pending:
        """Queue upload, compute and download of `batch`; returns at once (the GPU works on)."""
        frame = self._frame(plan)
        lane = frame.lanes[frame.next_lane]
        frame.next_lane = (frame.next_lane + 1) % LANES
        if lane.done is not None:
            lane.done.synchronize()  # the lane's last download has landed before its buffers are reused
        events = {name: torch.cuda.Event(enable_timing=True) for name in
                  ("upload_start", "uploaded", "compute_start", "forwarded", "processed", "download_start",
                   "downloaded")}
        start = time.perf_counter()
        np.copyto(lane.pinned_in.numpy(), batch)  # pageable -> pinned on the host: enables async DMA
        host_ms = (time.perf_counter() - start) * 1e3
        self._upload(lane, events)
        outputs = self._compute(frame, lane, plan, alpha, events)
        self._download(frame, lane, outputs, events)
        return _Pending(frame, lane, plan, events, host_ms)

    def _upload(self, lane: _Lane, events: dict) -> None:
        with torch.cuda.stream(self.upload_stream):
            events["upload_start"].record()
            lane.device_in.copy_(lane.pinned_in, non_blocking=True)
            events["uploaded"].record()

    def _compute(self, frame: _Frame, lane: _Lane, plan: Plan, alpha: int, events: dict) -> dict:
        stream = self.compute_stream
        with torch.cuda.stream(stream), torch.inference_mode():
            stream.wait_event(events["uploaded"])
            if frame.outputs_free is not None:
                stream.wait_event(frame.outputs_free)  # static outputs are still being downloaded
            events["compute_start"].record()
            frame.static_in.copy_(lane.device_in)  # device-to-device: the graph reads fixed addresses
            frame.alpha.fill_(alpha)
            logits = self._run_forward(frame, plan)
            events["forwarded"].record()
            outputs = self._run_postprocess(frame, plan, logits)
            events["processed"].record()
        return outputs

    def _run_forward(self, frame: _Frame, plan: Plan) -> torch.Tensor:
        if frame.forward_graph is None:
            return self.engine.forward_logits(frame.static_in, plan)
        frame.forward_graph.replay()
        return frame.logits

    def _run_postprocess(self, frame: _Frame, plan: Plan, logits: torch.Tensor) -> dict:
        if frame.post_graph is not None:
            frame.post_graph.replay()
            return frame.outputs
        outputs = self.engine.postprocess(frame.static_in, logits, plan, frame.alpha)
        for tensor in outputs.values():
            tensor.record_stream(self.download_stream)  # freshly allocated, read by another stream
        return outputs

    def _download(self, frame: _Frame, lane: _Lane, outputs: dict, events: dict) -> None:
        with torch.cuda.stream(self.download_stream):
            self.download_stream.wait_event(events["processed"])
            events["download_start"].record()
            for name, tensor in outputs.items():
                pinned = lane.pinned_out.get(name)
                if pinned is None or pinned.shape != tensor.shape or pinned.dtype != tensor.dtype:
                    pinned = lane.pinned_out[name] = torch.empty(tensor.shape, dtype=tensor.dtype,
                                                                 pin_memory=True)
                pinned.copy_(tensor, non_blocking=True)
            events["downloaded"].record()
        lane.done = events["downloaded"]
        frame.outputs_free = events["downloaded"]

    def collect(self, pending: _Pending) -> tuple[dict[str, np.ndarray], StageTimings]:
        """Wait for a submitted call; host copies of its outputs (the pinned lane is reused) and timings."""
        events = pending.events
        events["downloaded"].synchronize()
        outputs = {name: pending.lane.pinned_out[name].numpy().copy() for name in pending.plan.outputs}
        timings = StageTimings(
            upload_ms=pending.host_upload_ms + events["upload_start"].elapsed_time(events["uploaded"]),
            forward_ms=events["compute_start"].elapsed_time(events["forwarded"]),
            postprocess_ms=events["forwarded"].elapsed_time(events["processed"]),
            download_ms=events["download_start"].elapsed_time(events["downloaded"]),
        )
        return outputs, timings
