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

import numpy as np

from icnet_ros.classmap import ClassMap
from icnet_ros.data.datasets import DatasetError

log = logging.getLogger("icnet_ros.train")


def class_frequencies(dataset, class_map: ClassMap) -> np.ndarray:
    """freq(c): pixels of class c / pixels of the images containing c (NaN for absent classes)."""
    num_classes = class_map.num_classes
    class_pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for index in range(len(dataset)):
        try:
            labels = dataset.class_ids(index)
        except DatasetError:
            if not getattr(dataset, "skip_bad", False):
                raise
            continue
        counts = np.bincount(labels[labels != class_map.ignore_index].ravel(), minlength=num_classes)
        class_pixels += counts[:num_classes]
        image_pixels[counts[:num_classes] > 0] += labels.size
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


def resolve_class_weights(setting, power: float, dataset, class_map: ClassMap) -> tuple[float, ...] | None:
    """The loss's per-class weights for a TrainConfig.class_weights setting (None: unweighted)."""
    if setting == "none":
        return None
    if setting == "median_frequency":
        weights = median_frequency_weights(class_frequencies(dataset, class_map), power)
        log.info("median-frequency class weights (power %g): %s", power,
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(class_map.names, weights)))
        return tuple(float(w) for w in weights)
    weights = tuple(float(w) for w in setting)
    if len(weights) != class_map.num_classes or min(weights) < 0:
        raise ValueError(f"class_weights has {len(weights)} values {list(weights)}; class map "
                         f"{class_map.name!r} needs {class_map.num_classes} non-negative weights, "
                         "or 'none' or 'median_frequency'")
    return weights
