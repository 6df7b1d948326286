"""Turning a trained ICNet into the engine's inference network: fold, swap slow pieces, channels-last.

Every change here keeps the function and only changes float rounding (a few ulps of the logits):

- BatchNorm folded into the convolutions (one op per layer less, paper: "BN is folded").
- The pyramid pooling's matrix-product average pool, written for dynamic-shape ONNX export, turns
  into thousands of small copies on channels-last tensors; F.adaptive_avg_pool2d computes the same
  bin averages natively in that layout.
- channels-last memory: oneDNN's convolutions run on NHWC without reordering every layer.
- On CPU every convolution goes to oneDNN. PyTorch's own heuristic sends small single-image inputs
  (deep layers of small frames, 1x1 kernels on one thread) to its reference kernels, which on
  channels-last tensors are up to 200x slower (10.8 ms instead of 0.05 ms for a 3x3 conv on 2x3).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from icnet_ros.model.fold import fold_batchnorm
from icnet_ros.model.icnet import ALIGN_CORNERS, ICNet, PyramidPoolingSum, fixed_avg_pool, pyramid_pool_window


# Devices whose pooling kernels are slow on channels-last maps: on an H200 (torch 2.11, fp16) adaptive
# average pooling of the keep-0.5 network's 32x64x1024 map took 0.45 ms for each of the bins 2, 3 and 6
# in channels-last (1.3 of the 2.8 ms forward; bin 1 is a plain mean); pooling a contiguous copy (4 MB,
# microseconds to make) avoids it.
POOL_CONTIGUOUS_ON = ("cuda",)


class NativePyramidPoolingSum(nn.Module):
    """PyramidPoolingSum with PyTorch's native pooling: the same windows, without the matrix form.

    Adaptive bins use F.adaptive_avg_pool2d; the released network's fixed windows use F.avg_pool2d
    whenever they tile the map exactly (always, but on maps smaller than the bins).
    """

    def __init__(self, source: PyramidPoolingSum):
        super().__init__()
        self.bins, self.reference_size, self.windows = source.bins, source.reference_size, source.windows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        source = x.contiguous() if channels_last and x.device.type in POOL_CONTIGUOUS_ON else x
        out = x
        for index, bins in enumerate(self.bins):
            pooled = self._pool(source, index, bins)
            if pooled.shape[-2:] == (1, 1):  # a one-pixel map upsamples to itself everywhere: broadcast it
                out = out + pooled
                continue
            if channels_last:  # the tiny pooled map, not the sum, changes layout
                pooled = pooled.contiguous(memory_format=torch.channels_last)
            out = out + F.interpolate(pooled, size, mode="bilinear", align_corners=ALIGN_CORNERS)
        return out

    def _pool(self, x: torch.Tensor, index: int, bins: int) -> torch.Tensor:
        if not self.windows:
            return F.adaptive_avg_pool2d(x, bins)
        kernel_h, kernel_w, stride_h, stride_w = self.windows[index]
        height, width = int(x.shape[-2]), int(x.shape[-1])
        kh, sh = pyramid_pool_window(height, bins, self.reference_size[0], kernel_h, stride_h)
        kw, sw = pyramid_pool_window(width, bins, self.reference_size[1], kernel_w, stride_w)
        if (bins - 1) * sh + kh == height and (bins - 1) * sw + kw == width:
            return F.avg_pool2d(x, (kh, kw), (sh, sw))
        return fixed_avg_pool(x, bins, self.reference_size, self.windows[index])


class OneDnnConv2d(nn.Conv2d):
    """A Conv2d that always runs oneDNN on CPU for float32 and bfloat16 (the same kernels PyTorch picks
    for large inputs, so results there are unchanged); anything else takes the usual path."""

    def _conv_forward(self, input, weight, bias):
        if input.device.type == "cpu" and input.dtype in ONEDNN_DTYPES and self.padding_mode == "zeros":
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, list(self.padding), list(self.stride),
                                                     list(self.dilation), self.groups)
        return super()._conv_forward(input, weight, bias)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> OneDnnConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        return new


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _swap_modules(root: nn.Module, cpu: bool) -> None:
    """Replace the pyramid pooling everywhere, and on CPU every Conv2d by OneDnnConv2d."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PyramidPoolingSum):
                setattr(parent, name, NativePyramidPoolingSum(child))
            elif cpu and type(child) is nn.Conv2d and isinstance(child.padding, tuple):
                setattr(parent, name, OneDnnConv2d.replacing(child))


def prepare_for_inference(model: ICNet, device: torch.device | str = "cpu", fold: bool = True) -> ICNet:
    """An inference copy of `model` on `device`: folded (unless fold=False), channels-last, no grads."""
    prepared = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
    cpu = torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
    _swap_modules(prepared, cpu)
    prepared.check_finite = False  # the engine builds inputs from uint8 pixels: always finite
    prepared.requires_grad_(False)
    return prepared.to(device, memory_format=torch.channels_last)
