"""Spatial sparsity (Wu, Shen, van den Hengel, "Real-time semantic image segmentation via spatial
sparsity"): run ICNet's high-resolution path only in the square regions where it helps.

The network input is cut into square regions of `region_size` pixels (the last row and column may
be shorter). A gate, one tau x tau convolution with stride tau on F_24 (the sub24 features, H/16;
tau = region_size / 16), scores every region (paper, section 3.3). Its sigmoid is the
coarse-to-fine weight of the region: with g the weight spread over the region's pixels,

    output = g * sub124 + (1 - g) * upsample(sub24)                     ("classic" inference)

so training teaches the gate where the full-resolution branch changes the answer. The sparsity
term (Eq. 1, 2, 4) holds each image's mean weight near a target active probability p.

Fast inference (`sparse_logits`) keeps the k best-scored regions per image (winner-take-all, k
fixed, so the time per frame is constant) and runs the high-resolution path (sub1, cff_124,
classifier) only there; every other region takes the upsampled sub24 prediction. The k regions are
gathered into one batch of equal crops, each with just enough context that its pixels come out as
in the dense network: one row of F_124 around the region for the corner-aligned upsample, two more
rows of up(F_24) for the dilated convolution (taken from a zero-padded copy, as the dense
convolution pads), one more F_sub1 row for sub1's stride-2 chain (crops are shifted inside the
image at its borders instead of padded, so the image border pads exactly as the dense network
does). With k equal to the number of regions the result is the classic inference above.

A network without a gate can still run sparse, with the regions chosen by the mean entropy of the
sub24 prediction (the "trivial" winner-take-all the paper compares with); computed regions then take
sub124 alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SELECTORS = ("gate", "entropy")
GATE_STRIDE = 16  # F_24, the gate's input, is at 1/16 of the network input
CELL = 8  # F_sub1 and F_124 are at 1/8 of the network input; crops start on this grid
SPARSITY_MOMENTUM = 0.9  # the paper's alpha in Eq. 2, used throughout its experiments


def check_region_size(region_size: int) -> int:
    if region_size < GATE_STRIDE or region_size % GATE_STRIDE:
        raise ValueError(f"gate_region_size must be a positive multiple of {GATE_STRIDE} input pixels (the gate "
                         f"reads features at 1/{GATE_STRIDE} of the input), got {region_size}; e.g. 256")
    return region_size


@dataclass(frozen=True)
class RegionGrid:
    """Square regions of `size` network-input pixels over an input of height x width."""

    height: int
    width: int
    size: int

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.size)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.size)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def regions_for(self, fraction: float) -> int:
        """k for a fraction of the regions (N/4 -> 0.25), at least one unless fraction is 0."""
        return 0 if fraction <= 0 else max(1, min(self.count, round(self.count * fraction)))


class RegionGate(nn.Module):
    """One score per region from F_24: a tau x tau convolution with stride tau (paper, section 3.3).

    `active_mean` is the moving average q of the mean activation (Eq. 2), kept with the weights
    so that a resumed training continues it exactly.
    """

    def __init__(self, in_channels: int, region_size: int, target_active: float = 0.25):
        super().__init__()
        self.region_size = check_region_size(region_size)
        tau = region_size // GATE_STRIDE
        self.score = nn.Conv2d(in_channels, 1, tau, stride=tau, bias=True)
        # The window's sum of w . x is divided by tau: summed over tau^2 cells, every score moves
        # tau^2 times faster than one weight and the sigmoid saturates (no gradient left) within a
        # few SGD steps of fine-tuning; the window's mean (1 / tau^2) barely moves in 250 steps.
        self.window_scale = 1.0 / tau
        nn.init.normal_(self.score.weight, std=0.01)  # every region starts near weight 0.5
        nn.init.zeros_(self.score.bias)
        self.register_buffer("active_mean", torch.tensor(float(target_active)))

    def forward(self, f_24: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
        """(N, rows, cols) region scores (logits of the coarse-to-fine weight)."""
        tau = self.score.kernel_size[0]
        pad_h, pad_w = grid.rows * tau - f_24.shape[-2], grid.cols * tau - f_24.shape[-1]
        # F_24 ends inside the last region when the input is not a multiple of the region size:
        # zeros stand for the missing part, as they would for a dense zero-padded convolution.
        windows = F.conv2d(F.pad(f_24, (0, pad_w, 0, pad_h)), self.score.weight, None, self.score.stride)
        return (windows * self.window_scale + self.score.bias.view(1, -1, 1, 1))[:, 0]


def sparsity_loss(scores: torch.Tensor, q_old: torch.Tensor, target: float, weight: float,
                  momentum: float = SPARSITY_MOMENTUM) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, new q_old) of Eq. 1 with q from Eq. 2 and the per-image activation of Eq. 4.

    r_i = mean over the regions of image i of sigmoid(s); q_i = momentum * q_old + (1 - momentum) * r_i;
    loss = weight * mean_i(-p log q_i - (1 - p) log(1 - q_i)). The moving average carried to the
    next iteration is momentum * q_old + (1 - momentum) * mean_i r_i (no gradient through it).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"gate_target_active must be in (0, 1), got {target}")
    r = torch.sigmoid(scores.float()).flatten(1).mean(dim=1)
    q = (momentum * q_old.detach() + (1.0 - momentum) * r).clamp(1e-6, 1.0 - 1e-6)
    loss = weight * (-target * torch.log(q) - (1.0 - target) * torch.log1p(-q)).mean()
    return loss, momentum * q_old.detach() + (1.0 - momentum) * r.detach().mean()


def spread(values: torch.Tensor, grid: RegionGrid, block: int, size) -> torch.Tensor:
    """(N, rows, cols) per-region values -> (N, 1, *size) with each region's value over its block."""
    full = values.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return full[:, None, : size[0], : size[1]]


def blend(coarse: torch.Tensor, fine: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight * fine + (1 - weight) * coarse."""
    return coarse + weight * (fine - coarse)


def region_entropy(logits: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
    """(N, rows, cols) mean entropy of softmax(logits) over each region's cells."""
    probabilities = torch.softmax(logits.float(), dim=1)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=1, keepdim=True)
    cells = grid.size // CELL  # logits at 1/8 of the input
    padded_h, padded_w = grid.rows * cells, grid.cols * cells
    pad = (0, padded_w - entropy.shape[-1], 0, padded_h - entropy.shape[-2])
    total = F.avg_pool2d(F.pad(entropy, pad), cells, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(entropy), pad), cells, divisor_override=1)
    return (total / count)[:, 0]


# --- fast inference ------------------------------------------------------------------------------
@dataclass
class SparseResult:
    """logits: (N, C, H/4, W/4), as ICNet.branch_logits(image, "sub124"); chosen: (N, rows, cols) bool."""

    logits: torch.Tensor
    chosen: torch.Tensor
    grid: RegionGrid


def sparse_input_size(height: int, width: int) -> tuple[int, int]:
    """The network input size sparse inference runs at: each side to the nearest multiple of 8 (the
    crops start on the 1/8 grid); frames are resized to it and labels come back at the frame's size."""
    return tuple(max(4 * CELL, int(side / CELL + 0.5) * CELL) for side in (height, width))  # ties up


def check_sparse_input(height: int, width: int) -> None:
    if height % CELL or width % CELL:
        raise ValueError(f"sparse high-resolution regions need a network input whose height and width are "
                         f"multiples of {CELL}, got {height}x{width}; set the model's input size (e.g. 720x960) "
                         f"or use high_res_regions 0 (dense)")


@dataclass
class Trunk:
    """What every region shares: the low-resolution column's outputs and the region scores."""

    grid: RegionGrid
    coarse: torch.Tensor  # (N, C, H/4, W/4) upsampled sub24 logits
    scores: torch.Tensor  # (N, rows, cols): higher runs the high-resolution path first
    weights: torch.Tensor  # (N, rows, cols) coarse-to-fine weight of a computed region
    f_24_up: torch.Tensor  # F_24 at 1/8, the input of cff_124's dilated convolution


def sparse_logits(model, image: torch.Tensor, regions: int, selector: str = "auto",
                  region_size: int | None = None) -> SparseResult:
    """sub124 logits computing the high-resolution path in `regions` regions per image (see module doc).

    selector: "gate" (the network's trained gate), "entropy" (sub24's entropy), or "auto" (the gate
    when the network has one). region_size: for "entropy" on a network without a gate.
    """
    trunk = run_trunk(model, image, selector, region_size)
    k = max(0, min(int(regions), trunk.grid.count))
    picked = trunk.scores.flatten(1).topk(k, dim=1).indices  # (N, k), winner-take-all
    fine = region_fine_logits(model, image, trunk, picked) if k else None
    return compose(trunk, picked, fine)


def run_trunk(model, image: torch.Tensor, selector: str = "auto", region_size: int | None = None) -> Trunk:
    from icnet_ros.model.icnet import upsample

    selector = resolve_selector(model, selector)
    size = model.config.gate_region_size if selector == "gate" else (region_size or model.config.gate_region_size)
    if not size:
        raise ValueError("this network has no gate: give region_size for the entropy selector (e.g. 256)")
    sizes = model._checked_sizes(image)
    height, width = image.shape[-2:]
    check_sparse_input(height, width)
    grid = RegionGrid(int(height), int(width), check_region_size(size))
    f_sub2, f_sub4 = model.low_and_medium_features(image, sizes)
    f_24, _ = model.cff_24(f_sub4, f_sub2)
    f_24_up = upsample(f_24, sizes.sub1)
    sub24 = model.cff_124.aux_classifier(f_24_up)
    if selector == "gate":
        scores = model.region_gate(f_24, grid)
        weights = torch.sigmoid(scores)
    else:
        scores = region_entropy(sub24, grid)
        weights = torch.ones_like(scores)
    return Trunk(grid, upsample(sub24, sizes.sub124), scores, weights, f_24_up)


def compose(trunk: Trunk, picked: torch.Tensor, fine: torch.Tensor | None) -> SparseResult:
    """The coarse logits with the picked regions (N, k) replaced by their blend with `fine` (N*k, C, b, b)."""
    grid, batch, k = trunk.grid, picked.shape[0], picked.shape[1]
    images = torch.arange(batch, device=picked.device)[:, None].expand(batch, k)
    chosen = torch.zeros(batch, grid.count, dtype=torch.bool, device=picked.device)
    chosen[images, picked] = True
    chosen = chosen.view(batch, grid.rows, grid.cols)
    if not k:
        return SparseResult(trunk.coarse, chosen, grid)
    block = grid.size // 4
    blocks = _to_blocks(trunk.coarse, grid, block)  # (N, regions, C, block, block)
    selected = blocks[images, picked]
    region_weights = trunk.weights.flatten(1).gather(1, picked)[..., None, None, None].to(selected.dtype)
    blocks[images, picked] = blend(selected, fine.view_as(selected), region_weights)
    return SparseResult(_from_blocks(blocks, grid, block, trunk.coarse.shape[-2:]), chosen, grid)


def resolve_selector(model, selector: str) -> str:
    if model.cff_124.aux_classifier is None:
        raise ValueError("sparse regions need the sub24 head (regions left out take its prediction); this network "
                         "has no auxiliary heads (an imported Caffe evaluation net)")
    has_gate = getattr(model, "region_gate", None) is not None
    if selector == "auto":
        return "gate" if has_gate else "entropy"
    if selector not in SELECTORS:
        raise ValueError(f"region selector must be 'auto' or one of {list(SELECTORS)}, got {selector!r}")
    if selector == "gate" and not has_gate:
        raise ValueError("this network has no gate (train one with gate_region_size); use the 'entropy' selector")
    return selector


def _to_blocks(x: torch.Tensor, grid: RegionGrid, block: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = F.pad(x, (0, grid.cols * block - w, 0, grid.rows * block - h))
    x = x.view(n, c, grid.rows, block, grid.cols, block).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid.count, c, block, block).clone()


def _from_blocks(blocks: torch.Tensor, grid: RegionGrid, block: int, size) -> torch.Tensor:
    n, _, c = blocks.shape[:3]
    x = blocks.view(n, grid.rows, grid.cols, c, block, block).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, grid.rows * block, grid.cols * block)[..., : size[0], : size[1]].contiguous()


def _windows(first: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, int]:
    """Start of a window of `size` (at most `limit`) cells wanting to begin at `first`, kept inside [0, limit)."""
    size = min(size, limit)
    return first.clamp(0, limit - size), size


def _gather(x: torch.Tensor, items: torch.Tensor, row_start: torch.Tensor, col_start: torch.Tensor,
            height: int, width: int) -> torch.Tensor:
    """(K, C, height, width) windows of x[items] starting at (row_start, col_start)."""
    rows = row_start[:, None] + torch.arange(height, device=x.device)
    cols = col_start[:, None] + torch.arange(width, device=x.device)
    windows = x[items[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # K, h, w, C
    return windows.permute(0, 3, 1, 2)


def _conv_bn_valid(module, x: torch.Tensor) -> torch.Tensor:
    """A ConvBN without its zero padding: the caller's window already holds the padding it needs."""
    conv = module.conv
    out = module.bn(F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups))
    return F.relu(out) if module.relu else out


def _corner_aligned_rows(out_rows: torch.Tensor, out_size: int, in_size: int):
    """Source rows (i0, i1) and weight of F.interpolate(bilinear, align_corners=True) for `out_rows`."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = out_rows.clamp(max=out_size - 1).to(torch.float32) * scale
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = torch.where(lower < in_size - 1, lower + 1, lower)
    return lower, upper, source - lower


def _upsample_window(x: torch.Tensor, start_h, start_w, out_h0, out_w0, block: int, in_size, out_size):
    """The (block x block) piece at (out_h0, out_w0) of the corner-aligned upsample of a map of
    in_size to out_size, from x: (K, C, h, w) windows of that map starting at (start_h, start_w)."""
    steps = torch.arange(block, device=x.device)
    rows = _interpolate_axis(x, 2, start_h, *_corner_aligned_rows(out_h0[:, None] + steps, out_size[0], in_size[0]))
    return _interpolate_axis(rows, 3, start_w, *_corner_aligned_rows(out_w0[:, None] + steps, out_size[1],
                                                                     in_size[1]))


def _interpolate_axis(x: torch.Tensor, axis: int, start, lower, upper, weight) -> torch.Tensor:
    """Linear interpolation of windows x along `axis` (2: rows, 3: columns) between the map's
    `lower` and `upper` indices, (K, n) each, of windows starting at `start` (K,)."""
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = lower.shape[1]
    size = list(x.shape)
    size[axis] = lower.shape[1]

    def pick(index):
        return x.gather(axis, (index - start[:, None]).view(shape).expand(size))

    return torch.lerp(pick(lower), pick(upper), weight.view(shape).to(x.dtype))


def region_fine_logits(model, image: torch.Tensor, trunk: Trunk, picked: torch.Tensor) -> torch.Tensor:
    """(N*k, C, block, block) sub124 logits of the picked regions (N, k) (flat indices into the grid),
    computed as one batch of crops."""
    grid, f_24_up = trunk.grid, trunk.f_24_up
    items = torch.arange(picked.shape[0], device=image.device).repeat_interleave(picked.shape[1])
    regions = picked.reshape(-1)
    cells = grid.size // CELL
    grid_h, grid_w = f_24_up.shape[-2:]
    region_row, region_col = regions // grid.cols, regions % grid.cols
    # F_124 is needed one cell around the region (the corner-aligned upsample reads its neighbours)
    fuse_h, fuse_size_h = _windows(region_row * cells - 1, cells + 2, grid_h)
    fuse_w, fuse_size_w = _windows(region_col * cells - 1, cells + 2, grid_w)
    # sub1's stride-2 chain is exact but for its first row and column inside the image: one more
    sub1_h, sub1_size_h = _windows(fuse_h - 1, fuse_size_h + 1, grid_h)
    sub1_w, sub1_size_w = _windows(fuse_w - 1, fuse_size_w + 1, grid_w)
    crops = _gather(image, items, sub1_h * CELL, sub1_w * CELL, sub1_size_h * CELL, sub1_size_w * CELL)
    f_sub1 = model.sub1(crops)
    f_sub1 = _gather(f_sub1, torch.arange(len(items), device=image.device), fuse_h - sub1_h, fuse_w - sub1_w,
                     fuse_size_h, fuse_size_w)
    cff = model.cff_124
    reach = cff.dilated.conv.dilation[0] * (cff.dilated.conv.kernel_size[0] // 2)
    padded = F.pad(f_24_up, (reach, reach, reach, reach))  # the dense convolution's own zero padding
    context = _gather(padded, items, fuse_h, fuse_w, fuse_size_h + 2 * reach, fuse_size_w + 2 * reach)
    f_124 = F.relu(_conv_bn_valid(cff.dilated, context) + cff.lateral(f_sub1))
    block = grid.size // 4
    # The dense network classifies after the upsample; a 1x1 convolution and a bilinear upsample
    # commute (its weights sum to one per pixel), and classifying first interpolates C class maps
    # instead of 128 feature maps, at a quarter of the pixels.
    return _upsample_window(model.classifier(f_124), fuse_h, fuse_w, region_row * block, region_col * block,
                            block, (grid_h, grid_w), (2 * grid_h, 2 * grid_w))
