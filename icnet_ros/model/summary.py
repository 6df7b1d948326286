"""Parameter and multiply-accumulate counts of ICNet, per branch, without running real arithmetic.

MACs are counted from the convolutions actually executed for a branch, on PyTorch's "meta" device
(shapes only), so a 1024x2048 count at keep 1.0 costs milliseconds.
"""
from __future__ import annotations

import torch
from torch import nn

from icnet_ros.model.icnet import BRANCHES, ICNet, ModelConfig


def parameter_counts(model: ICNet) -> dict[str, int]:
    """Total, inference-only (without the two auxiliary training heads) and BN scale/shift counts."""
    total = sum(p.numel() for p in model.parameters())
    aux = sum(p.numel() for name, p in model.named_parameters() if "aux_classifier" in name)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    return {"total": total, "inference": total - aux, "batchnorm": bn}


def conv_macs(model: nn.Module, run) -> int:
    """Multiply-accumulates of every Conv2d executed by `run()`."""
    total = 0

    def count(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return total


def branch_macs(config: ModelConfig, height: int, width: int, batch: int = 1) -> dict[str, int]:
    """Conv MACs of each inference branch at one input size."""
    with torch.device("meta"):
        model = ICNet(config).eval()
        image = torch.empty(batch, 3, height, width)
    model.check_finite = False  # meta tensors hold no values
    with torch.no_grad():
        return {b: conv_macs(model, lambda b=b: model.branch_logits(image, b)) for b in BRANCHES}


def model_summary(config: ModelConfig, height: int, width: int) -> dict:
    with torch.device("meta"):
        params = parameter_counts(ICNet(config))
    macs = branch_macs(config, height, width)
    return {
        "keep_rate": config.keep_rate,
        "num_classes": config.num_classes,
        "height": height,
        "width": width,
        "params": params["total"],
        "params_inference": params["inference"],
        "params_batchnorm": params["batchnorm"],
        "macs": macs,
        "gmacs": {b: round(m / 1e9, 3) for b, m in macs.items()},
    }
