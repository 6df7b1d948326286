"""Fold every BatchNorm into the convolution before it, for inference (paper: "BN is folded")."""
from __future__ import annotations

import copy

import torch
from torch import nn

from icnet_ros.model.icnet import ConvBN


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to bn(conv(x)) in eval mode: W' = W * g / s, b' = beta + (b - mean) * g / s."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True).to(conv.weight.device, conv.weight.dtype)
    folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias.copy_(bn.bias + (conv_bias - bn.running_mean) * scale)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each ConvBN's BatchNorm folded into its conv.

    The copy is for inference only: its BN layers are gone, so it cannot be trained further.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, ConvBN) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    return folded
