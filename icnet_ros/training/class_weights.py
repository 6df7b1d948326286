"""Per-class loss weights from the training labels (median frequency balancing, Eigen & Fergus 2015).

Road scenes are mostly road, building and sky; poles, signs, pedestrians and cyclists are a few
percent of the pixels. Unweighted cross-entropy learns the rare classes last, if at all, and mIoU
averages over classes. Median frequency balancing (as SegNet on CamVid) weighs class c by
median_freq / freq(c), where freq(c) is c's share of the pixels of the images that contain c.
`power` < 1 softens the weights (0.5: their square root), trading a little of the large classes'
precision for the small classes' recall.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from icnet_ros.data.datasets import DatasetError
from icnet_ros.training.targets import TargetVocabulary

log = logging.getLogger("icnet_ros.train")


def class_frequencies(datasets: Sequence, num_targets: int, ignore_index: int) -> np.ndarray:
    """freq(t): pixels of target t / pixels of the images containing t, over every dataset given
    (NaN for absent targets). A target is a class, or a set of classes (training/targets.py)."""
    class_pixels = np.zeros(num_targets, np.int64)
    image_pixels = np.zeros(num_targets, np.int64)
    for dataset in datasets:
        for index in range(len(dataset)):
            try:
                labels = dataset.class_ids(index)
            except DatasetError:
                if not getattr(dataset, "skip_bad", False):
                    raise
                continue
            counts = np.bincount(labels[labels != ignore_index].ravel(), minlength=num_targets)[:num_targets]
            class_pixels += counts
            image_pixels[counts > 0] += labels.size
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(image_pixels > 0, class_pixels / np.maximum(image_pixels, 1), np.nan)


def median_frequency_weights(frequencies: np.ndarray, power: float = 1.0) -> np.ndarray:
    """(median_freq / freq(c)) ** power; classes absent from the data get weight 1 (never a target)."""
    present = np.isfinite(frequencies) & (frequencies > 0)
    if not present.any():
        raise ValueError("no class occurs in the training labels: cannot balance the loss")
    weights = np.ones_like(frequencies, dtype=np.float64)
    weights[present] = (np.median(frequencies[present]) / frequencies[present]) ** power
    return weights


def resolve_class_weights(setting, power: float, datasets: Sequence, vocabulary: TargetVocabulary
                          ) -> tuple[float, ...] | None:
    """The loss's per-target weights for a TrainConfig.class_weights setting (None: unweighted).

    With set-valued targets the median frequency is taken over the targets (classes and sets)
    that occur, so a CamVid `building` label is weighed as one target, not as building and wall.
    """
    if setting == "none":
        return None
    if setting == "median_frequency":
        frequencies = class_frequencies(datasets, vocabulary.num_targets, vocabulary.ignore_index)
        weights = median_frequency_weights(frequencies, power)
        log.info("median-frequency weights (power %g): %s", power,
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(vocabulary.names, weights)))
        return tuple(float(w) for w in weights)
    weights = tuple(float(w) for w in setting)
    if len(weights) != vocabulary.num_targets or min(weights) < 0:
        sets = f" and {vocabulary.num_targets - vocabulary.class_map.num_classes} label sets" if vocabulary.has_sets else ""
        raise ValueError(f"class_weights has {len(weights)} values {list(weights)}; class map "
                         f"{vocabulary.class_map.name!r}{sets} need {vocabulary.num_targets} non-negative weights "
                         f"(in the order {list(vocabulary.names)}), or 'none' or 'median_frequency'")
    return weights
