"""Checking camera frames before they reach the engine, with errors that say what would be right."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from icnet_ros.model.icnet import MIN_INPUT_SIZE

CHANNEL_ORDERS = ("rgb", "bgr")


class FrameError(ValueError):
    """A frame (or batch of frames) the engine cannot segment: wrong type, dtype, shape or size."""


def check_channel_order(channel_order: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise FrameError(f"channel_order must be one of {list(CHANNEL_ORDERS)}, got {channel_order!r}")
    return channel_order


def check_frame(frame: Any, name: str = "frame") -> np.ndarray:
    """`frame` as an HxWx3 uint8 array, or FrameError naming what is wrong with it."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"{name} is a {type(frame).__name__}; expected a numpy uint8 array of shape HxWx3")
    if frame.size == 0:
        raise FrameError(f"{name} is empty (shape {frame.shape}); expected an HxWx3 image")
    if frame.dtype != np.uint8:
        raise FrameError(
            f"{name} has dtype {frame.dtype}; expected uint8 pixels 0..255 (8-bit images; scale and "
            "convert other types, e.g. (image >> 8).astype(np.uint8) for 16-bit)"
        )
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] != 3):
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        raise FrameError(
            f"{name} has {channels} channel(s) (shape {frame.shape}); expected 3 color channels, HxWx3 "
            "(convert gray or BGRA with cv2.cvtColor first)"
        )
    if frame.ndim != 3:
        raise FrameError(f"{name} has shape {frame.shape}; expected an HxWx3 image")
    height, width = frame.shape[:2]
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise FrameError(
            f"{name} is {height}x{width} (height x width), too small: ICNet needs at least "
            f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
        )
    return frame


def as_batch(frames: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, bool]:
    """(N x H x W x 3 C-contiguous uint8 array, True if a single HxWx3 frame was given).

    Accepts one HxWx3 frame, an NxHxWx3 array, or a list/tuple of HxWx3 frames of one size (one per
    camera). Raises FrameError for anything else.
    """
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        if frames.shape[0] == 0:
            raise FrameError("the batch holds no frames (shape starts with 0); pass at least one frame")
        check_frame(frames[0], "frame 0 of the batch")
        return _writable(np.ascontiguousarray(frames)), False
    if isinstance(frames, np.ndarray):
        return _writable(np.ascontiguousarray(check_frame(frames)))[None], True
    if not isinstance(frames, (list, tuple)):
        raise FrameError(
            f"frames must be an HxWx3 uint8 array, an NxHxWx3 array or a list of HxWx3 arrays; "
            f"got {type(frames).__name__}"
        )
    if not frames:
        raise FrameError("the batch is an empty list; pass at least one frame")
    checked = [check_frame(frame, f"frame {index} of the batch") for index, frame in enumerate(frames)]
    sizes = [frame.shape[:2] for frame in checked]
    if len(set(sizes)) > 1:
        listing = ", ".join(f"frame {i}: {h}x{w}" for i, (h, w) in enumerate(sizes))
        raise FrameError(
            f"frames in one batch must share one size (height x width), got {listing}; resize them or "
            "segment them in separate calls"
        )
    return np.stack(checked), False


def _writable(batch: np.ndarray) -> np.ndarray:
    """A writable array: torch.from_numpy warns on read-only ones (views of ROS message buffers)."""
    return batch if batch.flags.writeable else batch.copy()
