"""The network's input: uint8 frames -> normalized, resized tensors. The one place this is written.

The engine, evaluation, training, the benchmark's naive model and the ONNX exporter all call these
functions, so a checkpoint's normalization (mean, std, channel order) and its input size mean the
same thing everywhere. Everything is read from the checkpoint's ModelConfig:

- input_mean / input_std: per R, G, B channel on the 0..255 scale (std 1 for Caffe's mean-only);
- input_channel_order: the order the first convolution expects ("bgr" for the released Caffe nets);
- input_size: the frame size the network was trained at (0 = keep the frame's aspect ratio).
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from icnet_ros.model.icnet import MIN_INPUT_SIZE, ModelConfig

# How a user names the network input size: the checkpoint's default, each frame's own size, or HxW.
INPUT_SIZE_HELP = "'checkpoint' (the size stored in the model), 'frame' (each frame's own size) or " \
                  "'HxW' such as '720x960' (0 for one side keeps the frame's aspect ratio, e.g. '720x0')"


def normalization_constants(config: ModelConfig, device: torch.device | str = "cpu"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1) float32 tensors in the network's channel order."""
    mean, std = tuple(config.input_mean), tuple(config.input_std)
    if config.input_channel_order == "bgr":
        mean, std = mean[::-1], std[::-1]
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))


def normalize(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, frame_order: str = "rgb",
              network_order: str = "rgb", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames in `frame_order` -> (N, 3, H, W) network input in channels-last memory.

    (pixel - mean) / std in float32, then a cast to `dtype`; mean and std come from
    normalization_constants. Permuting NHWC to NCHW is a free view that is already channels-last.
    """
    if frame_order != network_order:
        frames = frames.flip(-1)
    pixels = frames.permute(0, 3, 1, 2).to(torch.float32)
    return ((pixels - mean) / std).to(dtype)


def resize_input(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """The normalized input resized to the network size (bilinear, pixel centres aligned, as OpenCV)."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def prepare_input(frames: torch.Tensor, config: ModelConfig, frame_order: str = "rgb",
                  size: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> the network input at `size`, for code off the hot path.

    The engine keeps the constants on its device and calls normalize / resize_input itself.
    """
    mean, std = normalization_constants(config, frames.device)
    x = normalize(frames, mean, std, frame_order, config.input_channel_order, torch.float32)
    return resize_input(x, size).to(dtype)


def image_to_input(image: np.ndarray, config: ModelConfig, device="cpu", frame_order: str = "rgb",
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """One HxWx3 uint8 image (numpy) -> the (1, 3, h, w) float32 network input on `device`."""
    frames = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return prepare_input(frames, config, frame_order, size)


# --- the network input size ------------------------------------------------------------------------
def network_size(frame_size: tuple[int, int], input_size: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) the network runs at for a frame of `frame_size`.

    input_size None or (0, 0): the frame's own size. A 0 on one side keeps the frame's aspect ratio.
    """
    height, width = int(frame_size[0]), int(frame_size[1])
    if input_size is None or tuple(input_size) == (0, 0):
        return height, width
    want_h, want_w = int(input_size[0]), int(input_size[1])
    if want_h < 0 or want_w < 0:
        raise ValueError(f"network input size {input_size} has a negative side; use 0 to keep the aspect ratio")
    if want_h == 0:
        want_h = round(height * want_w / width)
    elif want_w == 0:
        want_w = round(width * want_h / height)
    if min(want_h, want_w) < MIN_INPUT_SIZE:
        raise ValueError(f"network input size {want_h}x{want_w} (from {input_size} for a {height}x{width} "
                         f"frame) is too small: ICNet needs at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
    return want_h, want_w


def parse_input_size(text: str, checkpoint_default: tuple[int, int] | None) -> tuple[int, int] | None:
    """A user's input-size setting -> input_size for network_size(); see INPUT_SIZE_HELP."""
    value = str(text).strip().lower()
    if value == "checkpoint":
        return None if checkpoint_default is None else tuple(checkpoint_default)
    if value == "frame":
        return 0, 0  # network_size's "the frame's own size", distinct from None ("no setting")
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", value)
    if match is None or match.groups() == ("0", "0"):
        raise ValueError(f"input size {text!r} is not understood; use {INPUT_SIZE_HELP}")
    return int(match.group(1)), int(match.group(2))
