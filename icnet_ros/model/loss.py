"""Cascade label guidance (paper, section 3.3): a weighted cross-entropy on each branch's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BRANCH_WEIGHTS = {"sub4": 0.4, "sub24": 0.4, "sub124": 1.0}


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of an (N, H, W) integer label map: ids are never blended."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].to(labels.dtype)


class CascadeLoss(nn.Module):
    """Sum over branches of weight * cross-entropy(branch logits, labels resized to that branch).

    `forward` returns (total, per-branch losses) so training logs can show each branch.
    """

    def __init__(self, weights: dict[str, float] | None = None, ignore_index: int = 255,
                 class_weights: torch.Tensor | None = None):
        """weights: per branch; class_weights: optional per-class weights of the cross-entropy."""
        super().__init__()
        self.weights = dict(DEFAULT_BRANCH_WEIGHTS if weights is None else weights)
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))

    def forward(self, logits: dict[str, torch.Tensor], labels: torch.Tensor):
        missing = set(self.weights) - set(logits)
        if missing:
            raise KeyError(f"CascadeLoss needs logits for branches {sorted(missing)}; got {sorted(logits)}")
        per_branch = {}
        for branch, weight in self.weights.items():
            target = resize_labels(labels, logits[branch].shape[-2:]).long()
            per_branch[branch] = F.cross_entropy(logits[branch].float(), target, weight=self.class_weights,
                                                 ignore_index=self.ignore_index)
        total = sum(self.weights[b] * loss for b, loss in per_branch.items())
        return total, per_branch
