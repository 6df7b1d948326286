"""ICNet (Zhao et al., ECCV 2018) as in the authors' released network, with the width as a parameter.

Shapes are for an input of H x W; the layer table follows the paper, its supplementary
material and the authors' released prototxt (hszhao/ICNet, evaluation/prototxt).

    image ───────────────► sub1: 3 convs s2 ──────────────────────────► F_sub1 (H/8)
      │ half                                                               │
    image/2 ─► stem ─► stage2 ─► stage3_1 ─► F_sub2 (H/16)                 │
                                    │ half                                 │
                                    ▼                                      │
                       stage3_2..4 ─► stage4 (dil 2) ─► stage5 (dil 4)     │
                       ─► pyramid pooling (sum) ─► conv5_4 ─► F_sub4 (H/32)│
    cff_24(F_sub4, F_sub2) ─► F_24 (H/16)      aux head: "sub4" logits at H/16
    cff_124(F_24, F_sub1)  ─► F_124 (H/8)      aux head: "sub24" logits at H/8
    classifier(up2(F_124)) ─► "sub124" logits at H/4 ─► (inference) bilinear to H x W

The model returns logits only; the cascade label guidance loss lives in loss.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from icnet_ros.model.sparsity import RegionGate, RegionGrid, blend, check_region_size, spread

Branch = Literal["sub4", "sub24", "sub124"]
BRANCHES: tuple[Branch, ...] = ("sub4", "sub24", "sub124")

# Output widths of the released network (keep rate 0.5). Every width scales by keep_rate / 0.5.
RELEASED_KEEP_RATE = 0.5
RELEASED_WIDTHS = {
    "sub1": (32, 32, 64),
    "stem": (32, 32, 64),
    "stage2": (32, 128),  # (reduce, out)
    "stage3": (64, 256),
    "stage4": (128, 512),
    "stage5": (256, 1024),
    "conv5_4": 256,
    "cff": 128,
}
STAGE_DEPTHS = {"stage2": 3, "stage3": 4, "stage4": 6, "stage5": 3}
STAGE_DILATIONS = {"stage2": 1, "stage3": 1, "stage4": 2, "stage5": 4}
PYRAMID_BINS = (1, 2, 3, 6)
# Every branch ends at least one pixel wide at H/32; smaller inputs have no pyramid to pool.
MIN_INPUT_SIZE = 32
ALIGN_CORNERS = True  # Caffe's Interp layer, which the released network uses, aligns corners.


class InputError(ValueError):
    """An input tensor the network cannot segment (wrong shape, too small, not finite)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""

    num_classes: int = 19
    keep_rate: float = 0.5
    class_map: str = "cityscapes"
    # Input normalization, applied by whoever feeds the network (icnet_ros.model.preprocess):
    # (pixel - mean) / std on a 0..255 scale, mean and std given per R, G, B channel, and the
    # channels handed to the first convolution in `input_channel_order` (Caffe models take BGR).
    input_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    input_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    input_channel_order: Literal["rgb", "bgr"] = "rgb"
    # The frame size the network was trained at, (height, width); frames are resized to it before
    # the network and labels come back at the frame's own size. 0 in one place keeps the frame's
    # aspect ratio from the other; None runs the network at each frame's own size.
    input_size: Optional[tuple[int, int]] = None
    # The released Caffe evaluation network (icnet-import) differs in three details, recorded here so
    # that an imported checkpoint computes exactly what Caffe computed:
    # - aux_heads False: it has no sub4 / sub24 classifiers, only sub124;
    # - interp "caffe": Caffe's Interp sizes, zoom L -> L + (L-1)(z-1), so the classifier runs at
    #   2*(H/8)-1 rather than 2*(H/8) (identical elsewhere at the released 1025x2049, both corner-aligned);
    # - pyramid_windows: fixed pooling windows per bin (kernel_h, kernel_w, stride_h, stride_w) for a
    #   feature map of pyramid_size, instead of adaptive bins; see pyramid_pool_window for other sizes.
    aux_heads: bool = True
    interp: Literal["pytorch", "caffe"] = "pytorch"
    pyramid_size: Optional[tuple[int, int]] = None
    pyramid_windows: tuple[tuple[int, int, int, int], ...] = ()
    # Spatial sparsity (model/sparsity.py): 0 = the released network; else the side, in network-input
    # pixels, of the square regions a gate on F_24 weighs between sub124 and the upsampled sub24.
    gate_region_size: int = 0

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        channel_widths(self.keep_rate)  # raises for rates that do not give whole channels
        if self.pyramid_windows and (len(self.pyramid_windows) != len(PYRAMID_BINS) or self.pyramid_size is None):
            raise ValueError(f"pyramid_windows needs one (kernel_h, kernel_w, stride_h, stride_w) per bin "
                             f"{PYRAMID_BINS} and the pyramid_size they are for; got {self.pyramid_windows} "
                             f"for {self.pyramid_size}")
        if self.gate_region_size:
            check_region_size(self.gate_region_size)
            if not self.aux_heads:
                raise ValueError("gate_region_size needs the auxiliary heads: regions left out take the sub24 "
                                 "prediction")

    @property
    def branches(self) -> tuple[str, ...]:
        """The branches this network can output."""
        return BRANCHES if self.aux_heads else ("sub124",)


def channel_widths(keep_rate: float) -> dict:
    """The released widths scaled to `keep_rate`; raises ValueError unless every width is whole."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    factor = keep_rate / RELEASED_KEEP_RATE

    def scale(width: int) -> int:
        scaled = width * factor
        if abs(scaled - round(scaled)) > 1e-6 or round(scaled) < 1:
            step = RELEASED_KEEP_RATE / math.gcd(*_all_released_widths())
            raise ValueError(
                f"keep_rate {keep_rate} gives {scaled:g} channels for a layer of {width} channels at keep "
                f"0.5; use a multiple of {step:g} (e.g. 1.0, 0.75, 0.5, 0.25)"
            )
        return int(round(scaled))

    return {name: tuple(scale(w) for w in ws) if isinstance(ws, tuple) else scale(ws)
            for name, ws in RELEASED_WIDTHS.items()}


def _all_released_widths() -> list[int]:
    flat = []
    for widths in RELEASED_WIDTHS.values():
        flat.extend(widths if isinstance(widths, tuple) else (widths,))
    return flat


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU. fold.py replaces bn by a conv bias at inference."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, dilation=1, relu=True):
        super().__init__()
        padding = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class Bottleneck(nn.Module):
    """ResNet bottleneck as in PSPNet50: the stride sits in the 1x1 reduce (and in the projection)."""

    def __init__(self, in_ch, reduce_ch, out_ch, stride=1, dilation=1):
        super().__init__()
        self.reduce = ConvBN(in_ch, reduce_ch, 1, stride)
        self.conv = ConvBN(reduce_ch, reduce_ch, 3, dilation=dilation)
        self.increase = ConvBN(reduce_ch, out_ch, 1, relu=False)
        needs_projection = stride != 1 or in_ch != out_ch
        self.projection = ConvBN(in_ch, out_ch, 1, stride, relu=False) if needs_projection else None

    def forward(self, x):
        shortcut = x if self.projection is None else self.projection(x)
        return F.relu(self.increase(self.conv(self.reduce(x))) + shortcut, inplace=True)


def residual_stage(in_ch, reduce_ch, out_ch, depth, stride=1, dilation=1) -> nn.Sequential:
    blocks = [Bottleneck(in_ch, reduce_ch, out_ch, stride, dilation)]
    blocks += [Bottleneck(out_ch, reduce_ch, out_ch, 1, dilation) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class PyramidPoolingSum(nn.Module):
    """ICNet's pyramid pooling: average-pool to each bin grid, upsample back, SUM with the input.

    Unlike PSPNet there is no conv per bin and no concatenation, so the width stays the same.
    Bins are adaptive (PyTorch's bin edges) unless `windows` gives the released network's fixed
    Caffe pooling windows (see pyramid_pool_window).
    """

    def __init__(self, bins=PYRAMID_BINS, reference_size=None, windows=()):
        super().__init__()
        self.bins = tuple(bins)
        self.reference_size = None if reference_size is None else tuple(reference_size)
        self.windows = tuple(tuple(w) for w in windows)

    def forward(self, x):
        size = x.shape[-2:]
        out = x
        for index, bins in enumerate(self.bins):
            if self.windows:
                pooled = fixed_avg_pool(x, bins, self.reference_size, self.windows[index])
            else:
                pooled = adaptive_avg_pool(x, bins)
            out = out + F.interpolate(pooled, size, mode="bilinear", align_corners=ALIGN_CORNERS)
        return out


def pooling_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) matrix whose row i averages [floor(i*size/bins), ceil((i+1)*size/bins))."""
    index = torch.arange(bins, device=like.device)[:, None]
    start = (index * size) // bins
    end = ((index + 1) * size + bins - 1) // bins
    return _window_matrix(size, start, end, like)


def _window_matrix(size, start: torch.Tensor, end: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(size, device=like.device)
    member = ((positions >= start) & (positions < end)).to(like.dtype)
    return member / member.sum(dim=1, keepdim=True)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Exactly F.adaptive_avg_pool2d(x, bins), written as two matrix products.

    The matrix form keeps the input size symbolic, so ONNX export with dynamic height and width
    stays correct at every size (adaptive_avg_pool2d bakes in the traced size's bin edges).
    """
    rows = pooling_matrix(x.shape[-2], bins, x)
    cols = pooling_matrix(x.shape[-1], bins, x)
    return rows @ x @ cols.transpose(0, 1)


def pyramid_pool_window(size: int, bins: int, reference_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(kernel, stride) of one axis of a fixed pooling window at feature size `size`.

    At the reference size (33x65 for the released 1025x2049 input) this is the released window
    itself. Elsewhere the stride scales with the size and the kernel makes the last of the `bins`
    windows end at the edge, as every released window does (kernel = size - (bins-1)*stride).
    """
    if size == reference_size:
        return kernel, stride
    stride = max(1, round(stride * size / reference_size))
    return max(1, size - (bins - 1) * stride), stride


def fixed_window_matrix(size: int, bins: int, kernel: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) averaging matrix of Caffe AVE pooling without padding: window i starts at
    i*stride (kept inside the map) and is clipped at the edge, averaging what it covers."""
    index = torch.arange(bins, device=like.device)[:, None]
    start = (index * stride).clamp(max=size - 1)
    return _window_matrix(size, start, (start + kernel).clamp(max=size), like)


def fixed_avg_pool(x: torch.Tensor, bins: int, reference_size, window) -> torch.Tensor:
    """Average pooling over the released network's fixed windows (two matrix products)."""
    kernel_h, kernel_w, stride_h, stride_w = window
    height, width = int(x.shape[-2]), int(x.shape[-1])
    rows = fixed_window_matrix(height, bins, *pyramid_pool_window(height, bins, reference_size[0], kernel_h,
                                                                   stride_h), x)
    cols = fixed_window_matrix(width, bins, *pyramid_pool_window(width, bins, reference_size[1], kernel_w,
                                                                  stride_w), x)
    return rows @ x @ cols.transpose(0, 1)


class CascadeFeatureFusion(nn.Module):
    """CFF: up2(F_small) -> 3x3 dilated conv -> BN, plus F_large -> 1x1 conv -> BN; sum; ReLU.

    The auxiliary classifier on up2(F_small) gives the cascade label guidance logits.
    """

    def __init__(self, small_ch, large_ch, out_ch, num_classes, aux_head: bool = True):
        super().__init__()
        self.dilated = ConvBN(small_ch, out_ch, 3, dilation=2, relu=False)
        self.lateral = ConvBN(large_ch, out_ch, 1, relu=False)
        self.aux_classifier = nn.Conv2d(small_ch, num_classes, 1, bias=True) if aux_head else None

    def forward(self, small, large):
        small_up = upsample(small, large.shape[-2:])
        return F.relu(self.dilated(small_up) + self.lateral(large), inplace=True), small_up


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=ALIGN_CORNERS)


def halved(size: int) -> int:
    """Size after a stride-2 3x3 conv with padding 1, a 3x3/2 max pool, or a 'half' resize."""
    return (size + 1) // 2


@dataclass(frozen=True)
class BranchSizes:
    """Spatial sizes (height, width) of the feature maps for one input size."""

    sub1: tuple[int, int]  # F_sub1, ~H/8
    sub2: tuple[int, int]  # F_sub2, ~H/16
    sub4: tuple[int, int]  # F_sub4, ~H/32
    sub124: tuple[int, int]  # sub124 logits, ~H/4

    @classmethod
    def for_input(cls, height: int, width: int, interp: str = "pytorch") -> "BranchSizes":
        """interp "caffe": the classifier's input is Caffe's zoom-2 Interp of F_sub1, 2L-1 (not 2L)."""
        def down(size, times):
            for _ in range(times):
                size = halved(size)
            return size

        sub1 = (down(height, 3), down(width, 3))
        sub2 = (down(height, 4), down(width, 4))
        zoom = 1 if interp == "caffe" else 0
        return cls(sub1=sub1, sub2=sub2, sub4=(halved(sub2[0]), halved(sub2[1])),
                   sub124=(2 * sub1[0] - zoom, 2 * sub1[1] - zoom))


class ICNet(nn.Module):
    """ICNet at any kernel keeping rate.

    - training mode: `model(x)` returns {"sub4", "sub24", "sub124"} logits at H/16, H/8 and H/4.
    - eval mode: `model(x, branch)` returns full-resolution logits of the chosen branch
      (`branch_logits` gives them before the final upsample). `sub4` never runs the sub1 or
      sub2 fusion, `sub24` never runs the full-resolution sub1 branch.
    Input: (N, 3, H, W) float, normalized with config.input_mean / input_std, H and W >= 32.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        w = channel_widths(config.keep_rate)
        self.check_finite = True  # the engine turns this off: it builds its inputs from uint8 pixels
        self.sub1 = nn.Sequential(
            ConvBN(3, w["sub1"][0], 3, 2), ConvBN(w["sub1"][0], w["sub1"][1], 3, 2),
            ConvBN(w["sub1"][1], w["sub1"][2], 3, 2),
        )
        self.stem = nn.Sequential(
            ConvBN(3, w["stem"][0], 3, 2), ConvBN(w["stem"][0], w["stem"][1], 3),
            ConvBN(w["stem"][1], w["stem"][2], 3), nn.MaxPool2d(3, 2, 1),
        )
        self.stage2 = residual_stage(w["stem"][2], *w["stage2"], STAGE_DEPTHS["stage2"])
        self.stage3_1 = Bottleneck(w["stage2"][1], *w["stage3"], stride=2)
        self.stage3_rest = nn.Sequential(
            *[Bottleneck(w["stage3"][1], *w["stage3"]) for _ in range(STAGE_DEPTHS["stage3"] - 1)]
        )
        self.stage4 = residual_stage(w["stage3"][1], *w["stage4"], STAGE_DEPTHS["stage4"],
                                     dilation=STAGE_DILATIONS["stage4"])
        self.stage5 = residual_stage(w["stage4"][1], *w["stage5"], STAGE_DEPTHS["stage5"],
                                     dilation=STAGE_DILATIONS["stage5"])
        self.pyramid = PyramidPoolingSum(PYRAMID_BINS, config.pyramid_size, config.pyramid_windows)
        self.conv5_4 = ConvBN(w["stage5"][1], w["conv5_4"], 1)
        self.cff_24 = CascadeFeatureFusion(w["conv5_4"], w["stage3"][1], w["cff"], config.num_classes,
                                           config.aux_heads)
        self.cff_124 = CascadeFeatureFusion(w["cff"], w["sub1"][2], w["cff"], config.num_classes, config.aux_heads)
        self.classifier = nn.Conv2d(w["cff"], config.num_classes, 1, bias=True)
        self._init_weights()
        self.region_gate = RegionGate(w["cff"], config.gate_region_size) if config.gate_region_size else None

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- the three resolutions -------------------------------------------------------------
    def low_and_medium_features(self, image: torch.Tensor, sizes: BranchSizes):
        """F_sub2 (shared stage-3 output, H/16) and F_sub4 (H/32) from the half-resolution image."""
        half = upsample(image, (halved(image.shape[-2]), halved(image.shape[-1])))
        f_sub2 = self.stage3_1(self.stage2(self.stem(half)))
        x = self.stage3_rest(upsample(f_sub2, sizes.sub4))  # the 1/4-resolution branch reuses stage 3
        x = self.pyramid(self.stage5(self.stage4(x)))
        return f_sub2, self.conv5_4(x)

    def branch_logits(self, image: torch.Tensor, branch: Branch = "sub124") -> torch.Tensor:
        """Logits of one branch at its own resolution, computing only what that branch needs."""
        check_branch(branch, self.config)
        sizes = self._checked_sizes(image)
        f_sub2, f_sub4 = self.low_and_medium_features(image, sizes)
        if branch == "sub4":
            return self.cff_24.aux_classifier(upsample(f_sub4, sizes.sub2))
        f_24, _ = self.cff_24(f_sub4, f_sub2)
        if branch == "sub24":
            return self.cff_124.aux_classifier(upsample(f_24, sizes.sub1))
        f_124, f_24_up = self.cff_124(f_24, self.sub1(image))
        sub124 = self.classifier(upsample(f_124, sizes.sub124))
        if self.region_gate is None:
            return sub124
        return self._gated(sub124, self.cff_124.aux_classifier(f_24_up), f_24, image, sizes)[0]

    def _gated(self, sub124, sub24, f_24, image, sizes: BranchSizes):
        """(classic gated sub124 logits, region scores): each region's sigmoid weighs sub124 against
        the upsampled sub24 (sparsity.py)."""
        grid = RegionGrid(image.shape[-2], image.shape[-1], self.config.gate_region_size)
        scores = self.region_gate(f_24, grid)
        weight = spread(torch.sigmoid(scores), grid, grid.size // 4, sizes.sub124).to(sub124.dtype)
        return blend(upsample(sub24, sizes.sub124), sub124, weight), scores

    def all_branch_logits(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every branch's logits in one pass (training: the cascade label guidance needs each).

        A network without auxiliary heads (an imported evaluation net) returns sub124 only.
        """
        sizes = self._checked_sizes(image)
        f_sub2, f_sub4 = self.low_and_medium_features(image, sizes)
        f_24, f_sub4_up = self.cff_24(f_sub4, f_sub2)
        f_124, f_24_up = self.cff_124(f_24, self.sub1(image))
        logits = {"sub124": self.classifier(upsample(f_124, sizes.sub124))}
        if self.config.aux_heads:
            logits = {"sub4": self.cff_24.aux_classifier(f_sub4_up),
                      "sub24": self.cff_124.aux_classifier(f_24_up), **logits}
        if self.region_gate is not None:  # the cascade loss sees the gated output, the sparsity loss the scores
            logits["sub124"], logits["gate"] = self._gated(logits["sub124"], logits["sub24"], f_24, image, sizes)
        return logits

    def forward(self, image: torch.Tensor, branch: Branch = "sub124"):
        if self.training:
            return self.all_branch_logits(image)
        return upsample(self.branch_logits(image, branch), image.shape[-2:])

    # --- input checks ----------------------------------------------------------------------
    def _checked_sizes(self, image: torch.Tensor) -> BranchSizes:
        check_input(image, check_finite=self.check_finite)
        return BranchSizes.for_input(image.shape[-2], image.shape[-1], self.config.interp)


def check_branch(branch: str, config: ModelConfig) -> str:
    """`branch` if this network has it, else ValueError naming the ones it has."""
    if branch not in config.branches:
        extra = "" if branch not in BRANCHES else " (this network has no auxiliary heads, e.g. an imported " \
                                                  "Caffe evaluation net)"
        raise ValueError(f"branch must be one of {list(config.branches)}, got {branch!r}{extra}")
    return branch


def check_input(image: torch.Tensor, check_finite: bool = True) -> None:
    """Raise InputError naming what is wrong with `image` and what would be accepted."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"expected a torch.Tensor of shape (N, 3, H, W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise InputError(
            f"expected an image batch of shape (N, 3, H, W) (3 color channels), got shape {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise InputError(f"expected a floating-point normalized image, got dtype {image.dtype}")
    height, width = image.shape[-2:]
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise InputError(
            f"input of {height}x{width} is too small: ICNet needs at least "
            f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (height x width) so that its 1/32 branch keeps a pixel"
        )
    if check_finite and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(image).all()):
            raise InputError("input contains NaN or infinite values; check the image normalization")
