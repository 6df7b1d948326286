"""argmax of bilinearly upsampled logits, computed exactly without upsampling every pixel.

ICNet's last step resizes the branch logits (H/4 for sub124) to H x W with bilinear interpolation,
align_corners=True, then takes the argmax over classes. Each full-resolution logit vector is a convex
combination of its four low-resolution neighbours, so where those four share one argmax c, c is the
label (a convex combination of vectors whose largest entry is c keeps c largest). Only the pixels
whose neighbours disagree need the interpolated logits, and there we compute them with the same
arithmetic as torch's own kernel, so the labels are identical to `F.interpolate(logits, size, mode="bilinear", align_corners=True).argmax(1)`:

1. low-resolution argmax and top-two margin of every logit vector;
2. a low-resolution cell (a 2x2 block of neighbours) is *settled* when its four labels agree and
   every margin clears the worst-case rounding error of the blend; a full-resolution pixel copies
   the label of its settled cell;
3. the other pixels gather their four neighbour vectors and blend them with torch's arithmetic.

Torch's CPU kernels fuse multiply-adds differently per memory layout and even per channel (vector
lanes vs the scalar tail), so the blend formula is not guessed: `kernel_formulas` calibrates it once
per (device, channels, layout) against F.interpolate on a random probe and keeps, per channel, the
candidate that reproduces it bit for bit (float64 where none does, which only matters at exact ties).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A cell is settled only if each neighbour's top-two margin exceeds this fraction of the largest
# |logit|: the blend's rounding error is a few float32 ulps (2**-23 = 1.2e-7) of that magnitude.
SETTLED_MARGIN = 1e-5
# Beyond this fraction of unsettled pixels (random weights, pure noise) a dense upsample is cheaper.
DENSE_FALLBACK_FRACTION = 0.25
UNSETTLED = -1


def source_weights(in_size: int, out_size: int, device: torch.device | str = "cpu"):
    """(i0, i1, lambda0, lambda1) per output index, for align_corners=True, in torch's float32 math.

    Mirrors ATen's area_pixel_compute_scale / compute_source_index_and_lambda: scale = (in - 1) /
    (out - 1) in float32, src = scale * dst in float32, i0 = floor(src) (clamped), lambda1 = src - i0.
    """
    out_index = torch.arange(out_size, device=device)
    if in_size == out_size:
        ones = torch.ones(out_size, device=device)
        return out_index, out_index, ones, torch.zeros(out_size, device=device)
    scale = torch.tensor(float(in_size - 1), dtype=torch.float32, device=device)
    if out_size > 1:
        scale = scale / torch.tensor(float(out_size - 1), dtype=torch.float32, device=device)
    else:
        scale = torch.zeros((), dtype=torch.float32, device=device)
    src = scale * out_index.to(torch.float32)
    i0 = torch.floor(src).to(torch.int64).clamp(max=in_size - 1)
    lambda1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, 1.0 - lambda1, lambda1


# --- blend formulas -------------------------------------------------------------------------------
def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, round(a * b + c): the float64 product of two float32s is exact."""
    return (a.double() * b.double() + c.double()).float()


def _cl_vector(x, a, b, w):
    # Vectorized channels of ATen's channels-last kernel: x00*w00 + (x01*w01 + (x10*w10 + x11*w11)),
    # with the compiler fusing each product into the following add.
    return _fma(x[0], w[0], _fma(x[1], w[1], _fma(x[3], w[3], x[2] * w[2])))


def _cl_tail(x, a, b, w):
    # Scalar tail channels of the same kernel: ((x00*w00 + x01*w01) + x10*w10) + x11*w11, fused.
    return _fma(x[3], w[3], _fma(x[2], w[2], _fma(x[0], w[0], x[1] * w[1])))


def _separable_fma(x, a, b, w):
    # ATen's generic (NCHW) kernel and the CUDA kernels: rows first, then columns, fused.
    return _fma(_fma(x[0], b[0], x[1] * b[1]), a[0], _fma(x[2], b[0], x[3] * b[1]) * a[1])


def _separable_fma_mirrored(x, a, b, w):
    return _fma(_fma(x[3], b[1], x[2] * b[0]), a[1], _fma(x[1], b[1], x[0] * b[0]) * a[0])


def _separable(x, a, b, w):
    return (x[0] * b[0] + x[1] * b[1]) * a[0] + (x[2] * b[0] + x[3] * b[1]) * a[1]


def _products_left(x, a, b, w):
    return x[0] * w[0] + x[1] * w[1] + x[2] * w[2] + x[3] * w[3]


def _products_right(x, a, b, w):
    return x[0] * w[0] + (x[1] * w[1] + (x[2] * w[2] + x[3] * w[3]))


def _float64(x, a, b, w):
    # No candidate matched: the most accurate blend; labels can then differ only at exact ties.
    x64 = [v.double() for v in x]
    return (x64[0] * b[0].double() + x64[1] * b[1].double()) * a[0].double() + \
        (x64[2] * b[0].double() + x64[3] * b[1].double()) * a[1].double()


FORMULAS: dict[str, Callable] = {
    "cl_vector": _cl_vector, "cl_tail": _cl_tail, "separable_fma": _separable_fma,
    "separable_fma_mirrored": _separable_fma_mirrored, "separable": _separable,
    "products_left": _products_left, "products_right": _products_right,
}
FALLBACK_FORMULA = "float64"


def _blend_terms(x00, x01, x10, x11, a0, a1, b0, b1):
    """(values, row weights, column weights, products) in the order every formula expects."""
    weights = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)  # float32 products, as the kernel forms them
    return (x00, x01, x10, x11), (a0, a1), (b0, b1), weights


# --- calibration ----------------------------------------------------------------------------------
def _probe_key(logits: torch.Tensor, out_size: tuple[int, int]) -> tuple:
    """What decides which ATen kernel F.interpolate runs: device, channels, layout, output size, threads."""
    channels_last = logits.dim() == 4 and logits.is_contiguous(memory_format=torch.channels_last) \
        and not logits.is_contiguous()
    small_output = out_size[0] + out_size[1] <= 128  # ATen's own threshold for its vectorized kernel
    single_thread = logits.device.type == "cpu" and torch.get_num_threads() == 1
    return logits.device.type, logits.shape[1], channels_last, small_output, single_thread


@functools.lru_cache(maxsize=64)
def _calibrate(device_type: str, channels: int, channels_last: bool, small_output: bool,
               single_thread: bool) -> tuple[str, ...]:
    """Per channel, the first formula that reproduces F.interpolate bit for bit on a random probe."""
    generator = torch.Generator().manual_seed(1234)
    in_size, out_size = (7, 9), ((40, 50) if small_output else (61, 83))
    probe = (torch.randn(1, channels, *in_size, generator=generator) * 4).to(device_type)
    if channels_last:
        probe = probe.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(probe, out_size, mode="bilinear", align_corners=True)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, channels)
    rows = source_weights(in_size[0], out_size[0], device_type)
    cols = source_weights(in_size[1], out_size[1], device_type)
    ys, xs = torch.meshgrid(torch.arange(out_size[0], device=device_type),
                            torch.arange(out_size[1], device=device_type), indexing="ij")
    terms = _gather_terms(probe, torch.zeros_like(ys.reshape(-1)), ys.reshape(-1), xs.reshape(-1), rows, cols)
    chosen = [FALLBACK_FORMULA] * channels
    for name, formula in FORMULAS.items():
        equal = (formula(*_blend_terms(*terms)) == expected).all(dim=0)
        for channel in range(channels):
            if chosen[channel] == FALLBACK_FORMULA and bool(equal[channel]):
                chosen[channel] = name
    return tuple(chosen)


def kernel_formulas(logits: torch.Tensor, out_size: tuple[int, int]) -> tuple[str, ...]:
    """The blend formula per channel that matches F.interpolate for logits like these (cached)."""
    return _calibrate(*_probe_key(logits, out_size))


def _gather_terms(logits, n, y, x, rows, cols):
    """The four neighbour logit vectors (K, C) and the four per-pixel weights (K, 1) of pixels (n, y, x)."""
    _, channels, height, width = logits.shape
    flat = logits.permute(0, 2, 3, 1).reshape(-1, channels)  # a view for channels-last logits
    y0, y1, a0, a1 = (t[y] for t in rows)
    x0, x1, b0, b1 = (t[x] for t in cols)
    base = n * (height * width)

    def vectors(yy, xx):
        return flat.index_select(0, base + yy * width + xx)

    return (vectors(y0, x0), vectors(y0, x1), vectors(y1, x0), vectors(y1, x1),
            a0[:, None], a1[:, None], b0[:, None], b1[:, None])


def blend(terms, formulas: tuple[str, ...]) -> torch.Tensor:
    """Interpolated logits (K, C) of gathered pixels, each channel by its calibrated formula."""
    values, rows, cols, products = _blend_terms(*terms)
    if len(set(formulas)) == 1:
        return _formula(formulas[0])(values, rows, cols, products).double()
    pieces, start = [], 0
    for end in range(1, len(formulas) + 1):  # contiguous runs of channels sharing one formula
        if end == len(formulas) or formulas[end] != formulas[start]:
            part = tuple(v[:, start:end] for v in values)
            pieces.append(_formula(formulas[start])(part, rows, cols, products).double())
            start = end
    return torch.cat(pieces, dim=1)


def _formula(name: str) -> Callable:
    return _float64 if name == FALLBACK_FORMULA else FORMULAS[name]


# --- the two ways of labelling ----------------------------------------------------------------------
def dense_upsample_argmax(logits: torch.Tensor, out_size: tuple[int, int],
                          dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(N, H, W) labels the plain way: F.interpolate every pixel in float32, then argmax."""
    full = F.interpolate(logits.float(), size=tuple(out_size), mode="bilinear", align_corners=True)
    return full.argmax(dim=1).to(dtype)


@dataclass(frozen=True)
class AxisMap:
    """How one output axis reads its input axis, and which output indices each input index owns.

    i0, i1, lambda0, lambda1: per output index, as torch computes them (source_weights).
    members[k], valid[k]: the output indices whose i0 is k (padded to the longest run).
    """

    i0: torch.Tensor
    i1: torch.Tensor
    lambda0: torch.Tensor
    lambda1: torch.Tensor
    members: torch.Tensor
    valid: torch.Tensor

    @property
    def weights(self):
        return self.i0, self.i1, self.lambda0, self.lambda1


@functools.lru_cache(maxsize=32)
def axis_map(in_size: int, out_size: int, device: str = "cpu") -> AxisMap:
    i0, i1, lambda0, lambda1 = source_weights(in_size, out_size, device)
    counts = torch.bincount(i0, minlength=in_size)
    start = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(max(int(counts.max()), 1), device=device)
    members = (start[:, None] + offsets).clamp(max=out_size - 1)
    return AxisMap(i0, i1, lambda0, lambda1, members, offsets < counts[:, None])


def top_two(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best, second best, index of best) along `dim`; a tie gives best == second.

    max + scatter is about 3x faster than topk(2) on CPU for a few dozen classes.
    """
    best, index = values.max(dim=dim)
    second = values.scatter(dim, index.unsqueeze(dim), float("-inf")).amax(dim=dim)
    return best, second, index


def low_res_labels(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, h, w) int64 argmax of each logit vector, or UNSETTLED where the top two are within rounding."""
    best, second, index = top_two(logits, dim=1)
    return torch.where(best - second > SETTLED_MARGIN * scale, index, torch.full_like(index, UNSETTLED))


def settled_cells(labels: torch.Tensor) -> torch.Tensor:
    """(N, h, w): the label of each low-resolution cell whose four corners agree surely, else UNSETTLED.

    Cell (i, j) holds corners (i, j), (i, j+1), (i+1, j), (i+1, j+1); the last row and column are
    replicated, as the kernel reads i1 = i0 at the border.
    """
    padded = torch.cat([labels, labels[:, -1:]], dim=1)
    padded = torch.cat([padded, padded[:, :, -1:]], dim=2)
    corners = (padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:])
    agree = (corners[0] == corners[1]) & (corners[0] == corners[2]) & (corners[0] == corners[3])
    return torch.where(agree, corners[0], torch.full_like(labels, UNSETTLED))


def expand_cells(cells: torch.Tensor, rows: AxisMap, cols: AxisMap) -> torch.Tensor:
    """(N, H, W): every output pixel takes its cell's value (a nearest-style gather by i0)."""
    if cells.device.type == "cpu":  # numpy's take is several times faster than index_select here
        expanded = np.take(np.take(cells.numpy(), rows.i0.numpy(), axis=1), cols.i0.numpy(), axis=2)
        return torch.from_numpy(expanded)
    return cells.index_select(1, rows.i0).index_select(2, cols.i0)


def sparse_upsample_argmax(logits: torch.Tensor, out_size: tuple[int, int], dtype: torch.dtype = torch.int64,
                           dense_fraction: float = DENSE_FALLBACK_FRACTION) -> torch.Tensor:
    """(N, H, W) labels identical to dense_upsample_argmax, interpolating only unsettled cells.

    When more than `dense_fraction` of the cells are unsettled (noise-like logits) the dense path
    is both exact by definition and faster, so it is used instead.
    """
    logits = logits.float()
    batch, channels, height, width = logits.shape
    out_size = (int(out_size[0]), int(out_size[1]))
    if channels == 1:
        return torch.zeros((batch, *out_size), dtype=dtype, device=logits.device)
    device = str(logits.device)
    rows, cols = axis_map(height, out_size[0], device), axis_map(width, out_size[1], device)
    scale = torch.maximum(logits.amax(dim=(1, 2, 3)), -logits.amin(dim=(1, 2, 3)))[:, None, None]
    cells = settled_cells(low_res_labels(logits, scale))
    unsettled = (cells == UNSETTLED).nonzero()
    if unsettled.shape[0] > dense_fraction * cells.numel():
        return dense_upsample_argmax(logits, out_size, dtype)
    labels = expand_cells(cells.clamp(min=0).to(dtype), rows, cols)
    for chunk in unsettled.split(CELL_CHUNK):
        _label_cells(logits, chunk, rows, cols, scale, labels)
    return labels


CELL_CHUNK = 4096  # cells interpolated at once: bounds the temporary (cells, rows, cols, classes) tensor


def _label_cells(logits, cells, rows: AxisMap, cols: AxisMap, scale, labels) -> None:
    """Interpolate every pixel of `cells` (K, 3: n, i, j) and write its label into `labels` (N, H, W)."""
    n, i, j = cells.unbind(1)
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])  # a view for channels-last logits
    height, width = logits.shape[2:]
    base = n * (height * width)
    i1, j1 = (i + 1).clamp(max=height - 1), (j + 1).clamp(max=width - 1)
    corners = [flat.index_select(0, base + r * width + c) for r, c in ((i, j), (i, j1), (i1, j), (i1, j1))]
    ys, xs = rows.members[i], cols.members[j]  # (K, my), (K, mx) output rows and columns of each cell
    b0, b1 = cols.lambda0[xs][..., None], cols.lambda1[xs][..., None]
    top = corners[0][:, None] * b0 + corners[1][:, None] * b1  # (K, mx, C)
    bottom = corners[2][:, None] * b0 + corners[3][:, None] * b1
    values = top[:, None] * rows.lambda0[ys][..., None, None] + bottom[:, None] * rows.lambda1[ys][..., None, None]
    best, second, index = top_two(values, dim=-1)  # (K, my, mx) each
    sure = best - second > SETTLED_MARGIN * scale[n]
    valid = rows.valid[i][:, :, None] & cols.valid[j][:, None, :]
    out_h, out_w = labels.shape[1:]
    pixel = (n * (out_h * out_w))[:, None, None] + ys[:, :, None] * out_w + xs[:, None, :]
    take = valid & sure
    labels.view(-1)[pixel[take]] = index[take].to(labels.dtype)
    _label_pixels_exactly(logits, pixel[valid & ~sure], rows, cols, labels)


def _label_pixels_exactly(logits, pixel, rows: AxisMap, cols: AxisMap, labels) -> None:
    """Near-ties: interpolate with torch's own arithmetic (calibrated), so even ties break the same way."""
    if pixel.numel() == 0:
        return
    out_h, out_w = labels.shape[1:]
    n, rest = pixel // (out_h * out_w), pixel % (out_h * out_w)
    terms = _gather_terms(logits, n, rest // out_w, rest % out_w, rows.weights, cols.weights)
    exact = blend(terms, kernel_formulas(logits, (out_h, out_w))).argmax(dim=1)
    labels.view(-1)[pixel] = exact.to(labels.dtype)


def upsample_argmax(logits: torch.Tensor, out_size: tuple[int, int], method: str = "sparse",
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Labels of `logits` bilinearly resized to out_size; method "sparse" (exact shortcut) or "dense"."""
    if method == "sparse":
        return sparse_upsample_argmax(logits, out_size, dtype)
    if method == "dense":
        return dense_upsample_argmax(logits, out_size, dtype)
    raise ValueError(f"upsample method must be 'sparse' or 'dense', got {method!r}")
