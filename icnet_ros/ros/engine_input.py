"""Camera messages -> engine input: pixels, channel order and the overlay's encoding (no ROS imports)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from icnet_ros.inference.frames import FrameError, check_frame
from icnet_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_numpy,
    image_to_rgb,
)

# Encodings the engine reads in place (no conversion) and the overlay is published in.
DIRECT_ENCODINGS = {"rgb8": "rgb", "bgr8": "bgr", "rgba8": "rgb", "bgra8": "bgr"}


@dataclass
class EngineInput:
    """A frame ready for the engine: HxWx3 uint8 pixels in `channel_order`, and how to publish the overlay."""

    pixels: np.ndarray
    channel_order: str
    overlay_encoding: str
    alpha_plane: np.ndarray | None = None  # rgba8/bgra8 inputs: copied into the overlay's 4th channel


def engine_input(message: Any, compressed: bool) -> EngineInput:
    """Convert one Image or CompressedImage; ImageConversionError names what is wrong with it.

    rgb8/bgr8 (and the colour part of rgba8/bgra8) go to the engine as views of the message buffer,
    in their own channel order, and the overlay comes back in the input's encoding. Every other
    encoding (mono, Bayer, YUV, compressed) is converted to RGB and the overlay is rgb8, because
    colours cannot be shown in those encodings.
    """
    if compressed:
        pixels = EngineInput(compressed_to_rgb(message), "rgb", "rgb8")
    elif getattr(message, "encoding", None) in DIRECT_ENCODINGS:
        raw = image_to_numpy(message)
        alpha = raw[..., 3] if raw.shape[2] == 4 else None
        pixels = EngineInput(raw[..., :3], DIRECT_ENCODINGS[message.encoding], message.encoding, alpha)
    else:
        pixels = EngineInput(image_to_rgb(message), "rgb", "rgb8")
    try:
        check_frame(pixels.pixels, "image")
    except FrameError as error:
        raise ImageConversionError(str(error)) from None
    return pixels
