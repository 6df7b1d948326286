"""What one engine call computes (Plan), the computation as callables (Stages), and the eager runner.

The runners (EagerRunner here, CudaRunner in cuda.py) know nothing of the engine: they get a Plan
per call and a Stages object of callables once. So cuda.py imports this module, never engine.py.

The postprocess is split into three stages so that each output is computed only when asked for,
and so that CUDA graphs of the stages can be captured once and replayed in any prefix:

    logits --labels--> labels --color--> color --overlay(frames, alpha)--> overlay

labels runs for every plan (color and overlay are drawn from it), color for color or overlay, and
overlay for overlay alone.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icnet_ros.inference.timing import HostClock, StageTimings

OUTPUTS = ("labels", "color", "overlay")
POST_STAGES = OUTPUTS  # stage names equal output names; stage order is capture and replay order


@dataclass(frozen=True)
class Plan:
    """Everything that fixes the shapes and the work of one call."""

    batch: int
    height: int
    width: int
    branch: str
    precision: str
    channel_order: str = "rgb"
    labels: bool = True
    color: bool = False
    overlay: bool = False
    upsample: str = "sparse"
    network_height: int = 0  # the size the network runs at (frames are resized to it); 0: the frame's
    network_width: int = 0
    high_res_regions: int = 0  # sub124 only: regions of the high-resolution path per image (0 = dense)

    @property
    def network_size(self) -> tuple[int, int]:
        return (self.network_height or self.height, self.network_width or self.width)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name in OUTPUTS if getattr(self, name))

    @property
    def forward_key(self) -> tuple:
        """What shapes the forward and its buffers: batch, frame and network size, branch, precision,
        channel order. The output set and upsample method are not in it: changing them reuses the
        captured forward (the postprocess stages are captured per upsample method inside)."""
        return (self.batch, self.height, self.width, *self.network_size, self.branch, self.precision,
                self.channel_order, self.high_res_regions)

    @property
    def stages(self) -> tuple[str, ...]:
        """The postprocess stages this plan runs, in order (see the module docstring)."""
        return stages_for(self.outputs)


def stages_for(outputs) -> tuple[str, ...]:
    """labels always; color when color or overlay is wanted; overlay when it is wanted."""
    wanted = set(outputs)
    unknown = wanted - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown output(s) {sorted(unknown)}; choose from {list(OUTPUTS)}")
    needed = ["labels"]
    if wanted & {"color", "overlay"}:
        needed.append("color")
    if "overlay" in wanted:
        needed.append("overlay")
    return tuple(needed)


@dataclass(frozen=True)
class Stages:
    """The computation of one call as callables over device tensors (all shared by CPU and CUDA).

    forward(frames, plan): (N, H, W, 3) uint8 frames -> the branch's low-resolution logits.
    labels(logits, plan): logits -> (N, H, W) labels at the frame size.
    color(labels): labels -> (N, H, W, 3) RGB uint8.
    overlay(frames, color, plan, alpha): the blend of frames and colors in the frames' channel order;
        alpha is a 0-dim int32 tensor, the weight of the colors in 0..256.
    keepalive(plan): optional; an object the runner keeps for as long as it keeps a graph of `plan`
        (a TensorRT execution context whose memory a captured graph reads).
    """

    forward: Callable[[torch.Tensor, Plan], torch.Tensor]
    labels: Callable[[torch.Tensor, Plan], torch.Tensor]
    color: Callable[[torch.Tensor], torch.Tensor]
    overlay: Callable[[torch.Tensor, torch.Tensor, Plan, torch.Tensor], torch.Tensor]
    keepalive: Callable[[Plan], Any] | None = None


def weak_method(method: Callable) -> Callable:
    """`method` (a bound method) without the reference to its object: the callable does not keep the
    object alive, so an object that keeps such callables of its own (the engine its Stages) is no
    reference cycle and is freed as soon as its last user lets go, not at a later garbage collection."""
    reference = weakref.WeakMethod(method)
    name = method.__name__

    def call(*args, **kwargs):
        bound = reference()
        if bound is None:
            raise ReferenceError(f"{name}: the object of this method is gone")
        return bound(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def run_stage(stages: Stages, stage: str, frames: torch.Tensor, plan: Plan, alpha: torch.Tensor,
              values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run one postprocess stage, reading what earlier stages left in `values` (logits, labels, color)."""
    if stage == "labels":
        return stages.labels(values["logits"], plan)
    if stage == "color":
        return stages.color(values["labels"])
    if stage == "overlay":
        return stages.overlay(frames, values["color"], plan, alpha)
    raise ValueError(f"unknown postprocess stage {stage!r}; stages are {list(POST_STAGES)}")


def postprocess(stages: Stages, frames: torch.Tensor, logits: torch.Tensor, plan: Plan,
                alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits -> the outputs the plan asks for, and nothing else, on the device."""
    values = {"logits": logits}
    for stage in plan.stages:
        values[stage] = run_stage(stages, stage, frames, plan, alpha, values)
    return {name: values[name] for name in plan.outputs}


@dataclass
class Pending:
    """A submitted call (SegmentationEngine.submit); pass it to collect(). Opaque to callers."""

    plan: Plan
    single: bool
    work: Any  # the runner's own record of the call
    collected: bool = False
    regions: Any = None  # sparse calls: ((N, rows, cols) bool tensor of the regions computed, region size)


class EagerRunner:
    """Runs a Plan eagerly and synchronously: the CPU runner (submit does the work, collect returns it)."""

    def __init__(self, device: torch.device, stages: Stages) -> None:
        self.device = device
        self.stages = stages

    def prepare(self, plan: Plan) -> None:
        """Nothing to capture on CPU; the engine's prepare runs frames through instead."""

    def submit(self, batch: np.ndarray, plan: Plan, alpha: int):
        clock = HostClock()
        frames = torch.from_numpy(batch).to(self.device)
        clock.mark("upload")
        with torch.inference_mode():
            logits = self.stages.forward(frames, plan)
            clock.mark("forward")
            outputs = postprocess(self.stages, frames, logits, plan, torch.tensor(alpha, dtype=torch.int32))
            clock.mark("postprocess")
        host = {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
        clock.mark("download")
        return host, clock.timings()

    def collect(self, work) -> tuple[dict[str, np.ndarray], StageTimings]:
        return work
