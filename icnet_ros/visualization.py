"""Label maps to pictures: colorize with a class palette, blend the colors over the camera image.

One place for both, in numpy (for tools working on host arrays) and in torch (for the inference
engine, which colorizes on the device before downloading). The two agree bit for bit: the blend is
integer arithmetic with alpha quantized to 1/256 steps, so no float rounding differs between them.

    color = colorize(labels, class_map.palette())      # HxW ids -> HxWx3 uint8
    shown = overlay(image, color, alpha=0.5)            # uint8 blend, same channel order as given
"""
from __future__ import annotations

import numpy as np
import torch

ALPHA_STEPS = 256  # alpha is applied as round(alpha * 256) / 256: exact integer arithmetic


def alpha_weight(alpha: float) -> int:
    """The integer blend weight in 0..256 for `alpha` in [0, 1]; raises ValueError outside it."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1] (0 = image only, 1 = colors only), got {alpha}")
    return round(alpha * ALPHA_STEPS)


# --- numpy ----------------------------------------------------------------------------------------
def padded_palette(palette: np.ndarray, size: int) -> np.ndarray:
    """(max(size, K), 3) uint8 palette: `palette` followed by black for ids it does not cover."""
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if size <= len(palette):
        return palette
    lut = np.zeros((size, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW (or any shape) integer class ids -> (..., 3) uint8 colors; ids outside the palette are black.

    Ids the palette does not cover (the ignore index 255 of a ground-truth map, say) come out black
    rather than raising, so ground truth and predictions can be shown with the same call.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array of class ids, got dtype {labels.dtype}")
    if labels.size == 0:
        return np.zeros((*labels.shape, 3), np.uint8)
    low, high = int(labels.min()), int(labels.max())
    lut = padded_palette(palette, high + 1)
    if low < 0:
        return np.where((labels >= 0)[..., None], lut[np.maximum(labels, 0)], np.uint8(0))
    return lut[labels]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 blend (1 - alpha) * image + alpha * color, rounded to nearest; shapes must match.

    The result keeps the channel order of the arguments: pass both RGB, or both BGR.
    """
    image, color = np.asarray(image), np.asarray(color)
    if image.dtype != np.uint8 or color.dtype != np.uint8:
        raise TypeError(f"overlay needs uint8 image and color, got {image.dtype} and {color.dtype}")
    if image.shape != color.shape:
        raise ValueError(f"overlay needs image and color of one shape, got {image.shape} and {color.shape}")
    weight = alpha_weight(alpha)
    # 255 * 256 + 128 < 65536, so uint16 holds every intermediate value.
    blended = image.astype(np.uint16) * np.uint16(ALPHA_STEPS - weight)
    blended += color.astype(np.uint16) * np.uint16(weight)
    blended += np.uint16(ALPHA_STEPS // 2)
    return (blended >> 8).astype(np.uint8)


# --- torch (the engine's device) ------------------------------------------------------------------
def palette_tensor(palette: np.ndarray, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The palette as a (max(size, K), 3) uint8 tensor on `device`, padded with black."""
    return torch.from_numpy(padded_palette(palette, size).copy()).to(device)


def colorize_torch(labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(...) integer ids -> (..., 3) uint8 on the labels' device; ids outside the palette are black."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    # index_select wants int32/int64 indices; a uint8 index would be taken as a boolean mask.
    index = labels.reshape(-1).to(torch.int64)
    inside = (index >= 0) & (index < palette.shape[0])
    colors = palette.index_select(0, index.clamp(0, palette.shape[0] - 1))
    colors = colors * inside[:, None].to(colors.dtype)
    return colors.reshape(*labels.shape, 3)


def overlay_torch(image: torch.Tensor, color: torch.Tensor, alpha: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Same blend as `overlay`, on tensors. `alpha` may be the int weight tensor from alpha_weight().

    A 0-dim integer tensor as alpha lets a captured CUDA graph change alpha without recapture.
    """
    if image.shape != color.shape:
        raise ValueError(f"overlay needs image and color of one shape, got {tuple(image.shape)} and "
                         f"{tuple(color.shape)}")
    weight = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha_weight(alpha))
    weight = weight.to(device=image.device, dtype=torch.int32)
    blended = image.to(torch.int32) * (ALPHA_STEPS - weight) + color.to(torch.int32) * weight
    return ((blended + ALPHA_STEPS // 2) >> 8).to(torch.uint8)
