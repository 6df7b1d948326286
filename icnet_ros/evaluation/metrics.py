"""Confusion-matrix metrics: per-class IoU, mIoU and pixel accuracy, reducible across processes.

IoU follows cityscapesScripts' pixel-level evaluation: pixels whose ground truth is the ignore
label are left out, a class that is neither in the ground truth nor predicted has no IoU (NaN),
and the mean skips such classes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """rows: ground truth class, columns: predicted class."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        target = torch.as_tensor(target).reshape(-1).to(torch.int64)
        prediction = torch.as_tensor(prediction).reshape(-1).to(torch.int64).to(target.device)
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        cells = target[valid] * self.num_classes + prediction[valid]
        counts = torch.bincount(cells, minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def reduce_across_processes(self) -> None:
        if dist.is_available() and dist.is_initialized():
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            matrix = self.matrix.to(backend_device)
            dist.all_reduce(matrix)
            self.matrix = matrix.cpu()

    def iou(self) -> np.ndarray:
        matrix = self.matrix.double().numpy()
        true_positive = np.diag(matrix)
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, true_positive / union, np.nan)

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else math.nan

    def split_within_sets(self, set_of) -> ConfusionMatrix:
        """This matrix as if every prediction inside the ground truth's own set had been right.

        set_of[c] is the set (a class of a coarser class map) that class c belongs to, negative for
        none (LabelMap.source_sets). The result bounds what telling each set's members apart better,
        and nothing else, could give: a model trained on coarser labels learns its sets from them,
        their splits elsewhere.
        """
        set_of = np.asarray(set_of)
        if set_of.shape != (self.num_classes,):
            raise ValueError(f"set_of needs one set per class ({self.num_classes}), got shape {set_of.shape}")
        same_set = (set_of[:, None] == set_of[None, :]) & (set_of[:, None] >= 0)
        matrix = self.matrix.numpy().copy()
        moved = np.where(same_set, matrix, 0)
        np.fill_diagonal(moved, 0)
        matrix -= moved
        matrix[np.diag_indices(self.num_classes)] += moved.sum(1)
        result = ConfusionMatrix(self.num_classes, self.ignore_index)
        result.matrix = torch.from_numpy(matrix)
        return result

    def report(self, class_names) -> dict:
        """{'miou', 'miou_labelled', 'pixel_acc', 'iou': {class: value or None}}, NaN shown as None (JSON-safe).

        miou_labelled averages only the classes the ground truth contains: on a handful of frames a
        class predicted somewhere but absent from every label scores 0 in mIoU, which then says
        as much about the frames chosen as about the model.
        """
        iou = self.iou()
        present = iou[~np.isnan(iou)]
        labelled = iou[self.matrix.sum(1).numpy() > 0]
        return {
            "miou": float(present.mean()) if present.size else None,
            "miou_labelled": float(labelled.mean()) if labelled.size else None,
            "pixel_acc": _none_if_nan(self.pixel_accuracy()),
            "iou": {name: _none_if_nan(float(v)) for name, v in zip(class_names, iou)},
        }


def _none_if_nan(value: float):
    return None if math.isnan(value) else value
