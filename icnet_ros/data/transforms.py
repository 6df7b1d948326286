"""The paper's training augmentation: random mirror, random scale in [0.5, 2.0], random crop, plus an
optional photometric jitter (brightness, contrast, saturation) for models meant for other cameras.

Every random choice comes from the numpy Generator passed in, so a sample's augmentation is a
function of its seed. Labels are only ever resized with nearest-neighbour: ids are never blended.
"""
from __future__ import annotations

import cv2
import numpy as np

from icnet_ros.model.preprocess import network_size


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """Resize image (bilinear) and label (nearest) to (height, width)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, label
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_scale(image, label, rng: np.random.Generator, scale_range: tuple[float, float],
                 base_size: tuple[int, int] | None = None):
    """Resize by a random factor of `base_size` (default: the image's size), in one resize."""
    scale = rng.uniform(*scale_range)
    height, width = base_size or image.shape[:2]
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


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation, each a factor in [1 - strength, 1 + strength].

    Another camera differs from the training one in exposure and colour response far more than in
    geometry; a little jitter keeps a model trained on one data set usable on the next. The three
    factors compose into one affine blend of the image and its gray version:
    out = b*c*(s*rgb + (1-s)*gray) + (1-c)*b*mean(gray).
    """
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    gain = brightness * contrast
    offset = (1.0 - contrast) * brightness * float(gray.mean())
    return cv2.addWeighted(image, gain * saturation, cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB),
                           gain * (1.0 - saturation), offset)


def white_balance_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Each channel scaled by its own factor in [1 - strength, 1 + strength]: another camera's colour cast.

    color_jitter scales the three channels together; cameras also differ in white balance (the
    Cityscapes frames are green-tinted next to CamVid's), which only per-channel gains imitate.
    """
    gains = rng.uniform(1.0 - strength, 1.0 + strength, size=3).astype(np.float32)
    return np.clip(image.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def augment_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                   crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                   mirror: bool = True, ignore_index: int = 255, image_size: tuple[int, int] | None = None,
                   pad_value=0, jitter: float = 0.0, white_balance: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, label HxW) -> augmented crop of crop_size, in the paper's order.

    image_size: the network input size the frames are brought to first (0 on one side keeps the
    aspect ratio, as ModelConfig.input_size); the random scale is relative to it.

    With jitter > 0 the crop's colours are jittered last (color_jitter), after the geometry, and with
    white_balance > 0 its channels get gains of their own (white_balance_jitter).
    """
    if mirror and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    # image_size and the random scale are one resize: resampling twice would blur the frame twice.
    base_size = network_size(image.shape[:2], image_size)
    image, label = random_scale(np.ascontiguousarray(image), np.ascontiguousarray(label), rng, scale_range,
                                base_size)
    image, label = random_crop(image, label, rng, crop_size, ignore_index, pad_value)
    if jitter > 0:
        image = color_jitter(image, rng, jitter)
    if white_balance > 0:
        image = white_balance_jitter(image, rng, white_balance)
    return image, label
