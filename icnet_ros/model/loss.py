"""Cascade label guidance (paper, section 3.3): a weighted cross-entropy on each branch's logits.

Targets may be sets of classes (training/targets.py): a label from a coarser class map names the
set of the model's classes it stands for, and its loss is -log of the set's summed probability,
which is the plain cross-entropy when every set has one class.
"""
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


def set_cross_entropy(logits: torch.Tensor, target: torch.Tensor, members: torch.Tensor,
                      weight: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """Mean over labelled pixels of -log(sum of p(c) over the classes c of the pixel's target set).

    logits (N, C, H, W); target (N, H, W) target ids; members (T, C) bool, each row non-empty;
    weight (T,) per target. The mean is weighted as F.cross_entropy's: sum(w * loss) / sum(w).
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_probs = F.log_softmax(logits.float(), dim=1).permute(0, 2, 3, 1)  # N, H, W, C
    in_set = members[safe]  # N, H, W, C
    per_pixel = -torch.logsumexp(log_probs.masked_fill(~in_set, float("-inf")), dim=-1)
    pixel_weight = valid.to(per_pixel.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight[safe]
    # Like F.cross_entropy, an all-ignored batch is 0/0; callers stop on the non-finite loss.
    return (per_pixel * pixel_weight).sum() / pixel_weight.sum()


class CascadeLoss(nn.Module):
    """Sum over branches of weight * cross-entropy(branch logits, labels resized to that branch).

    `forward` returns (total, per-branch losses) so training logs can show each branch.
    """

    def __init__(self, weights: dict[str, float] | None = None, ignore_index: int = 255,
                 class_weights: torch.Tensor | None = None, target_sets: torch.Tensor | None = None):
        """weights: per branch; class_weights: optional per-target weights of the cross-entropy;
        target_sets: (targets, classes) bool membership (TargetVocabulary.membership()) when some
        targets are sets of classes, None when every target is one class."""
        super().__init__()
        self.weights = dict(DEFAULT_BRANCH_WEIGHTS if weights is None else weights)
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))
        self.register_buffer("target_sets", None if target_sets is None else torch.as_tensor(target_sets).bool())

    def forward(self, logits: dict[str, torch.Tensor], labels: torch.Tensor):
        missing = set(self.weights) - set(logits)
        if missing:
            raise KeyError(f"CascadeLoss needs logits for branches {sorted(missing)}; got {sorted(logits)}")
        per_branch = {}
        for branch in self.weights:
            target = resize_labels(labels, logits[branch].shape[-2:]).long()
            per_branch[branch] = self._branch_loss(logits[branch].float(), target)
        total = sum(self.weights[b] * loss for b, loss in per_branch.items())
        return total, per_branch

    def _branch_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.target_sets is None:
            return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index)
        return set_cross_entropy(logits, target, self.target_sets, self.class_weights, self.ignore_index)
