"""Label maps to pictures: colorize with a class palette, blend the colors over the camera image.

One place for both, in numpy (for tools working on host arrays) and in torch (for the inference
engine, which colorizes on the device before downloading). The two agree bit for bit: the blend is
integer arithmetic with alpha quantized to 1/256 steps, so no float rounding differs between them.

    color = colorize(labels, class_map.palette())      # HxW ids -> HxWx3 uint8
    shown = overlay(image, color, alpha=0.5)            # uint8 blend, same channel order as given
    pair = side_by_side(image, shown, labels, class_map)  # camera | overlay over a legend of the classes
"""
from __future__ import annotations

import cv2
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


# --- legend (side-by-side pictures) ---------------------------------------------------------------
# A class with fewer pixels than this share of the frame gets no legend entry. 0.1 % is about a
# 23x23 pixel patch of a 1024x512 frame: small enough to keep a distant sign or pole, large enough
# that the few stray pixels argmax leaves along class boundaries do not each add a row for a class
# nobody can find in the picture. 0 lists every class with at least one pixel.
LEGEND_MIN_SHARE = 0.001
LEGEND_BACKGROUND = (255, 255, 255)  # dark text on a white strip, swatches outlined in the text color
LEGEND_TEXT = (0, 0, 0)
LEGEND_FONT = cv2.FONT_HERSHEY_SIMPLEX
LEGEND_WIDTH_PER_SCALE = 1500  # font scale 1 (text about 20 px high) per 1500 px of picture width
LEGEND_MIN_SCALE = 0.4  # below this Hershey text is no longer legible


def present_classes(labels: np.ndarray, num_classes: int, min_share: float = LEGEND_MIN_SHARE) -> list[int]:
    """Class ids in 0..num_classes-1 that cover at least `min_share` of `labels` (and at least one
    pixel), in id order. Ids outside the class map (the ignore index) are never listed."""
    labels = np.asarray(labels)
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"legend min_share must be a fraction of the picture in [0, 1], got {min_share}")
    if labels.size == 0:
        return []
    flat = labels.reshape(-1).astype(np.int64)
    counts = np.bincount(flat[(flat >= 0) & (flat < num_classes)], minlength=num_classes)
    needed = max(1, min_share * labels.size)
    return [int(i) for i in np.flatnonzero(counts >= needed)]


def _legend_metrics(scale: float) -> tuple[int, int, int]:
    thickness = max(1, round(scale * 1.4))
    (_, cap), descent = cv2.getTextSize("Ag", LEGEND_FONT, scale, thickness)
    return thickness, cap, descent


def _fit_name(name: str, max_width: int, scale: float, thickness: int) -> str:
    """`name`, shortened with '..' until it is at most `max_width` pixels wide."""
    if cv2.getTextSize(name, LEGEND_FONT, scale, thickness)[0][0] <= max_width:
        return name
    for keep in range(len(name) - 1, 0, -1):
        short = name[:keep] + ".."
        if cv2.getTextSize(short, LEGEND_FONT, scale, thickness)[0][0] <= max_width:
            return short
    return ""


def draw_legend(class_map, class_ids, width: int) -> np.ndarray:
    """An (H, width, 3) uint8 RGB strip listing `class_ids` in the given order: a swatch of the class
    map's color and the class name per entry, black text on white, in equal columns that wrap into as
    many rows as needed. Text size scales with `width` (the width of the picture the strip goes
    under). No ids -> an empty (0, width, 3) strip. Names and colors come from `class_map` only."""
    width = int(width)
    if width <= 0:
        raise ValueError(f"legend width must be positive, got {width}")
    class_ids = [int(i) for i in class_ids]
    bad = [i for i in class_ids if not 0 <= i < class_map.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are not in class map {class_map.name!r} (0..{class_map.num_classes - 1})")
    if not class_ids:
        return np.zeros((0, width, 3), np.uint8)
    palette = class_map.palette()
    names = [class_map.names[i] for i in class_ids]

    def layout(scale: float) -> tuple[int, ...]:
        thickness, cap, descent = _legend_metrics(scale)
        swatch = max(6, cap + descent)
        pad, gap = max(2, swatch // 2), max(2, swatch // 3)
        text_width = max(cv2.getTextSize(n, LEGEND_FONT, scale, thickness)[0][0] for n in names)
        return thickness, cap, swatch, pad, gap, swatch + gap + text_width

    scale = max(LEGEND_MIN_SCALE, width / LEGEND_WIDTH_PER_SCALE)
    thickness, cap, swatch, pad, gap, entry = layout(scale)
    if entry > width - 2 * pad:  # a narrow picture: smaller text first, then shortened names
        scale = max(LEGEND_MIN_SCALE, scale * (width - 2 * pad) / entry)
        thickness, cap, swatch, pad, gap, entry = layout(scale)
    inner = width - 2 * pad
    column_gap = swatch
    columns = max(1, min(len(names), (inner + column_gap) // (entry + column_gap)))
    column_width = min(entry, inner) if columns == 1 else (inner + column_gap) // columns - column_gap
    rows = -(-len(names) // columns)
    row_height = swatch + pad
    strip = np.full((pad + rows * row_height, width, 3), LEGEND_BACKGROUND, np.uint8)
    for slot, (class_id, name) in enumerate(zip(class_ids, names)):
        row, column = divmod(slot, columns)
        x, y = pad + column * (column_width + column_gap), pad + row * row_height
        color = tuple(int(v) for v in palette[class_id])
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), color, thickness=-1)
        cv2.rectangle(strip, (x, y), (x + swatch - 1, y + swatch - 1), LEGEND_TEXT, thickness=1)
        text = _fit_name(name, column_width - swatch - gap, scale, thickness)
        cv2.putText(strip, text, (x + swatch + gap, y + (swatch + cap) // 2), LEGEND_FONT, scale, LEGEND_TEXT,
                    thickness, cv2.LINE_AA)
    return strip


def side_by_side(image: np.ndarray, shown: np.ndarray, labels: np.ndarray, class_map,
                 min_share: float = LEGEND_MIN_SHARE) -> np.ndarray:
    """camera | segmentation (overlay or colors), with a legend strip below of the classes in
    `labels` (present_classes(labels, ..., min_share)). RGB in, RGB out; both panels of one size."""
    image, shown = np.asarray(image), np.asarray(shown)
    if image.shape != shown.shape or image.ndim != 3 or image.dtype != np.uint8 or shown.dtype != np.uint8:
        raise ValueError(f"side_by_side needs two HxWx3 uint8 panels of one shape, got {image.shape} "
                         f"{image.dtype} and {shown.shape} {shown.dtype}")
    if np.shape(labels) != image.shape[:2]:
        raise ValueError(f"side_by_side needs labels of the panels' size {image.shape[:2]}, got {np.shape(labels)}")
    panels = np.concatenate([image, shown], axis=1)
    legend = draw_legend(class_map, present_classes(labels, class_map.num_classes, min_share), panels.shape[1])
    return np.concatenate([panels, legend], axis=0)


# --- spatial sparsity ------------------------------------------------------------------------------
REGION_DIM = 0.45  # brightness kept outside the computed regions in pictures of them


def region_mask(regions: np.ndarray, region_size: int, network_size, frame_size) -> np.ndarray:
    """(rows, cols) bool regions computed -> (H, W) uint8 of the frame, 255 inside them, 0 elsewhere.

    Regions are squares of `region_size` network-input pixels; the network ran at `network_size`
    (height, width) and the mask is scaled to `frame_size` as the labels are.
    """
    net_h, net_w = network_size
    mask = np.repeat(np.repeat(np.asarray(regions, bool), region_size, 0), region_size, 1)[:net_h, :net_w]
    mask = mask.astype(np.uint8) * np.uint8(255)
    if tuple(frame_size) != (net_h, net_w):
        mask = cv2.resize(mask, (frame_size[1], frame_size[0]), interpolation=cv2.INTER_NEAREST)
    return mask


def draw_regions(image: np.ndarray, mask: np.ndarray, color=(255, 255, 0)) -> np.ndarray:
    """`image` dimmed outside the mask's regions, each region outlined: where full resolution ran."""
    shown = np.where(mask[..., None] > 0, image, (image * REGION_DIM).astype(np.uint8))
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(2, image.shape[0] // 300)
    return cv2.drawContours(np.ascontiguousarray(shown), contours, -1, color, thickness)
