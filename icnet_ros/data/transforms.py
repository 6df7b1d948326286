"""The paper's training augmentation: random mirror, random scale in [0.5, 2.0], random crop.

Every random choice comes from the numpy Generator passed in, so a sample's augmentation is a
function of its seed. Labels are only ever resized with nearest-neighbour: ids are never blended.
"""
from __future__ import annotations

import cv2
import numpy as np


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """Resize image (bilinear) and label (nearest) to (height, width)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, label
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_scale(image, label, rng: np.random.Generator, scale_range: tuple[float, float]):
    scale = rng.uniform(*scale_range)
    height, width = image.shape[:2]
    return resize_pair(image, label, (max(1, round(height * scale)), max(1, round(width * scale))))


def random_crop(image, label, rng: np.random.Generator, crop_size: tuple[int, int], ignore_index: int,
                pad_value) -> tuple[np.ndarray, np.ndarray]:
    """Crop to crop_size, padding first (image with pad_value, label with ignore) when smaller."""
    crop_h, crop_w = crop_size
    pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
    if pad_h or pad_w:
        fill = [float(v) for v in np.broadcast_to(np.asarray(pad_value, dtype=np.float64), (3,))]
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=fill)
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=ignore_index)
    top = int(rng.integers(0, image.shape[0] - crop_h + 1))
    left = int(rng.integers(0, image.shape[1] - crop_w + 1))
    return image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]


def augment_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                   crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                   mirror: bool = True, ignore_index: int = 255, image_size: tuple[int, int] | None = None,
                   pad_value=0) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, label HxW) -> augmented crop of crop_size, in the paper's order."""
    if image_size is not None:
        image, label = resize_pair(image, label, image_size)
    if mirror and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image, label = random_scale(np.ascontiguousarray(image), np.ascontiguousarray(label), rng, scale_range)
    return random_crop(image, label, rng, crop_size, ignore_index, pad_value)
