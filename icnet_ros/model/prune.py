"""Model compression as in the paper (section 5.2): L1-norm filter pruning, applied progressively.

Each conv's filters are ranked by the L1 norm of their weights and the weakest are removed; the
layers that read those channels lose the same input channels. Channels joined by a residual sum
(or by a CFF sum, or the pyramid pooling sum) form one group: every conv writing into the group
keeps the same channel set, ranked by the L1 norms summed over those convs. The pruned weights
load into the same ICNet class built at the smaller keep rate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from icnet_ros.model.icnet import ICNet


@dataclass(frozen=True)
class ChannelGroup:
    """Channels written by `producers` (ConvBN module names) and read by `consumers` (Conv2d names)."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]


def channel_groups(model: ICNet) -> list[ChannelGroup]:
    """Every prunable channel group of ICNet, derived from its structure."""
    groups: list[ChannelGroup] = []

    def add(producers, consumers):
        groups.append(ChannelGroup(tuple(producers), tuple(f"{c}.conv" if not c.endswith("classifier") else c
                                                            for c in consumers)))

    # Plain chains: sub1 and the stem's three convs, and the inside of every bottleneck.
    add(["sub1.0"], ["sub1.1"])
    add(["sub1.1"], ["sub1.2"])
    add(["sub1.2"], ["cff_124.lateral"])
    add(["stem.0"], ["stem.1"])
    add(["stem.1"], ["stem.2"])
    add(["stem.2"], ["stage2.0.reduce", "stage2.0.projection"])
    stages = {
        "stage2": [f"stage2.{i}" for i in range(len(model.stage2))],
        "stage3": ["stage3_1"] + [f"stage3_rest.{i}" for i in range(len(model.stage3_rest))],
        "stage4": [f"stage4.{i}" for i in range(len(model.stage4))],
        "stage5": [f"stage5.{i}" for i in range(len(model.stage5))],
    }
    for blocks in stages.values():
        for block in blocks:
            add([f"{block}.reduce"], [f"{block}.conv"])
            add([f"{block}.conv"], [f"{block}.increase"])
    # Residual streams: the projection and every increase conv of a stage write the same channels.
    readers_after = {
        "stage2": ["stage3_1.reduce", "stage3_1.projection"],
        "stage3": ["stage4.0.reduce", "stage4.0.projection", "cff_24.lateral"],
        "stage4": ["stage5.0.reduce", "stage5.0.projection"],
        "stage5": ["conv5_4"],  # through the pyramid pooling sum, which is channel-wise
    }
    for stage, blocks in stages.items():
        producers = [f"{blocks[0]}.projection"] + [f"{b}.increase" for b in blocks]
        add(producers, [f"{b}.reduce" for b in blocks[1:]] + readers_after[stage])
    # Fusion: conv5_4 feeds CFF_24; each CFF's two convs are summed, feeding the next stage.
    add(["conv5_4"], ["cff_24.dilated", "cff_24.aux_classifier"])
    add(["cff_24.dilated", "cff_24.lateral"], ["cff_124.dilated", "cff_124.aux_classifier"])
    add(["cff_124.dilated", "cff_124.lateral"], ["classifier"])
    return groups


def filter_l1_scores(state: dict[str, torch.Tensor], producers) -> torch.Tensor:
    """Sum over producer convs of each output filter's L1 norm."""
    return sum(state[f"{p}.conv.weight"].abs().flatten(1).sum(1) for p in producers)


def _select(state, name, dim, keep):
    state[name] = state[name].index_select(dim, keep)


def prune_state(state: dict[str, torch.Tensor], groups, target_widths: dict[str, int]) -> dict:
    """Apply L1 pruning to a state dict; target_widths maps a producer name to its new width."""
    state = dict(state)
    for group in groups:
        width = target_widths[group.producers[0]]
        scores = filter_l1_scores(state, group.producers)
        keep = torch.topk(scores, width).indices.sort().values  # keep the original channel order
        for producer in group.producers:
            _select(state, f"{producer}.conv.weight", 0, keep)
            for stat in ("weight", "bias", "running_mean", "running_var"):
                _select(state, f"{producer}.bn.{stat}", 0, keep)
        for consumer in group.consumers:
            if f"{consumer}.weight" in state:  # networks without auxiliary heads lack their classifiers
                _select(state, f"{consumer}.weight", 1, keep)
    return state


def prune_model(model: ICNet, keep_rate: float) -> ICNet:
    """A new ICNet at `keep_rate` holding the strongest filters (by L1 norm) of `model`."""
    if keep_rate > model.config.keep_rate:
        raise ValueError(f"cannot prune from keep rate {model.config.keep_rate} up to {keep_rate}")
    if model.config.gate_region_size:
        raise ValueError("this model has a spatial-sparsity gate, which pruning does not carry over: prune the "
                         "model without a gate, then fine-tune with gate_region_size (config/train/"
                         "camvid_sparse_cpu.yaml)")
    target = ICNet(replace(model.config, keep_rate=keep_rate))
    groups = channel_groups(model)
    target_modules = dict(target.named_modules())
    target_widths = {p: target_modules[p].conv.out_channels for g in groups for p in g.producers}
    source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target.load_state_dict(prune_state(source_state, groups, target_widths), strict=True)
    return target.train(model.training)


def progressive_schedule(start: float, target: float, step: float = 0.25) -> list[float]:
    """Keep rates visited on the way from `start` to `target`, e.g. 1.0 -> 0.25: [0.75, 0.5, 0.25]."""
    if not 0 < target <= start <= 1:
        raise ValueError(f"need 0 < target <= start <= 1, got start={start}, target={target}")
    rates, rate = [], start
    while rate - step > target + 1e-9:
        rate = round(rate - step, 6)
        rates.append(rate)
    if target < start:
        rates.append(target)
    return rates


def compress_progressively(model: ICNet, schedule: list[float],
                           fine_tune: Callable[[ICNet, float], ICNet]) -> ICNet:
    """Prune to each rate of `schedule` in turn, calling `fine_tune(model, rate)` after every cut."""
    for rate in schedule:
        model = fine_tune(prune_model(model, rate), rate)
    return model
