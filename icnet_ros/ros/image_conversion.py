"""sensor_msgs/Image and sensor_msgs/CompressedImage <-> numpy, without ROS.

One module serves rclpy messages and messages read by `rosbags` alike, through duck typing on the
fields height, width, encoding, is_bigendian, step and data. rclpy hands `data` over as
array.array('B'), rosbags as a uint8 numpy array, hand-built messages as bytes; all three expose the
buffer protocol, so np.frombuffer views the pixels without copying. The header is never read here:
it passes through untouched so outputs keep the input's stamp and frame id.

Every malformed message raises ImageConversionError (a ValueError), whose text says what was wrong
and what would be right, in the manner of cv_bridge's CvBridgeError.
"""
from __future__ import annotations

import dataclasses
import re
from array import array as ByteArray
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np


class ImageConversionError(ValueError):
    """A sensor_msgs/Image, CompressedImage or numpy array that cannot be converted."""


@dataclass(frozen=True)
class EncodingInfo:
    """Memory layout of one sensor_msgs/Image encoding and how OpenCV turns it into RGB."""

    channels: int
    dtype: np.dtype
    cv2_to_rgb: int | None  # cv2.cvtColor code; None when the pixels are RGB already

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.dtype.itemsize

    @property
    def raw_shape_suffix(self) -> tuple[int, ...]:
        """Trailing axes of image_to_numpy's result: () for one channel, (C,) otherwise."""
        return () if self.channels == 1 else (self.channels,)


_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)

# ROS names a Bayer pattern by its first row; OpenCV names it by the 2x2 block starting at the second
# row and column, so ROS "rggb" is OpenCV "BG" (the mapping cv_bridge uses).
ENCODINGS: dict[str, EncodingInfo] = {
    "rgb8": EncodingInfo(3, _U8, None),
    "bgr8": EncodingInfo(3, _U8, cv2.COLOR_BGR2RGB),
    "rgba8": EncodingInfo(4, _U8, cv2.COLOR_RGBA2RGB),
    "bgra8": EncodingInfo(4, _U8, cv2.COLOR_BGRA2RGB),
    "mono8": EncodingInfo(1, _U8, cv2.COLOR_GRAY2RGB),
    "mono16": EncodingInfo(1, _U16, cv2.COLOR_GRAY2RGB),
    "bayer_rggb8": EncodingInfo(1, _U8, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": EncodingInfo(1, _U8, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": EncodingInfo(1, _U8, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": EncodingInfo(1, _U8, cv2.COLOR_BayerGB2RGB),
    # ROS "yuv422" is UYVY (U0 Y0 V0 Y1); "yuv422_yuy2" is YUYV. Two bytes per pixel, even width.
    "yuv422": EncodingInfo(2, _U8, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": EncodingInfo(2, _U8, cv2.COLOR_YUV2RGB_YUY2),
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(sorted(ENCODINGS))
_YUV_ENCODINGS = frozenset({"yuv422", "yuv422_yuy2"})
IMAGE_FIELDS = ("height", "width", "encoding", "is_bigendian", "step", "data")


def encoding_info(encoding: str) -> EncodingInfo:
    """Layout of `encoding`; raises ImageConversionError listing the supported encodings."""
    try:
        return ENCODINGS[encoding]
    except (KeyError, TypeError):
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported encodings: {', '.join(SUPPORTED_ENCODINGS)}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Image message -> numpy
# --------------------------------------------------------------------------------------------------


def image_to_numpy(msg: Any) -> np.ndarray:
    """The pixels of a sensor_msgs/Image in the message's own layout, as HxW or HxWxC uint8/uint16.

    Row padding (step > width * bytes_per_pixel) is sliced away and 16-bit big-endian data is
    returned in native byte order. The result is a view of the message's buffer whenever no byte
    swap is needed, so it is read-only for messages holding bytes; copy it before writing into it.
    """
    height, width, step, info = _checked_geometry(msg)
    flat = _byte_view(msg.data, "data")
    needed = step * height
    if flat.size < needed:
        raise ImageConversionError(
            f"{msg.encoding} image {width}x{height} with step {step} needs step*height = {needed} bytes "
            f"of data, but data holds {flat.size}"
        )
    rows = flat[:needed].reshape(height, step)[:, : width * info.bytes_per_pixel]
    if info.dtype.itemsize > 1:
        byte_order = ">" if msg.is_bigendian else "<"
        # astype to the native uint16 copies only when the message's byte order differs from ours.
        rows = rows.view(info.dtype.newbyteorder(byte_order)).astype(info.dtype, copy=False)
    return rows.reshape((height, width, *info.raw_shape_suffix))


def image_to_rgb(msg: Any) -> np.ndarray:
    """A C-contiguous HxWx3 uint8 RGB array for the network, from any supported encoding.

    mono16 keeps its high byte (a linear 65535 -> 255 scale). An unpadded rgb8 message is returned
    without a copy (a read-only view when the message holds bytes).
    """
    raw = image_to_numpy(msg)
    info = ENCODINGS[msg.encoding]
    if raw.dtype == np.uint16:
        raw = (raw >> 8).astype(np.uint8)
    if info.cv2_to_rgb is None:
        return np.ascontiguousarray(raw)
    return cv2.cvtColor(raw, info.cv2_to_rgb)


def _checked_geometry(msg: Any) -> tuple[int, int, int, EncodingInfo]:
    """(height, width, step, encoding info) after checking that they describe a non-empty image."""
    missing = [name for name in IMAGE_FIELDS if not hasattr(msg, name)]
    if missing:
        raise ImageConversionError(
            f"{type(msg).__name__} is not a sensor_msgs/Image: it lacks field(s) {missing}; "
            f"an Image has {', '.join(IMAGE_FIELDS)}"
        )
    info = encoding_info(msg.encoding)
    height, width, step = (_non_negative_int(msg, name) for name in ("height", "width", "step"))
    if height == 0 or width == 0:
        raise ImageConversionError(
            f"image is {width}x{height} (width x height); both must be at least 1 pixel"
        )
    row_bytes = width * info.bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{info.bytes_per_pixel} = "
            f"{row_bytes} for {msg.encoding}; step must be at least {row_bytes}"
        )
    if msg.encoding in _YUV_ENCODINGS and width % 2:
        raise ImageConversionError(
            f"{msg.encoding} packs two pixels into four bytes, so width must be even; got {width}"
        )
    return height, width, step, info


def _non_negative_int(msg: Any, name: str) -> int:
    value = getattr(msg, name)
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ImageConversionError(f"field {name} must be a non-negative integer; got {value!r}")
    return int(value)


def _byte_view(data: Any, name: str) -> np.ndarray:
    """A flat uint8 view of a message's byte buffer (array.array, bytes, numpy array); a list is copied."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ImageConversionError(
                f"{name} must be a 1-D uint8 array of bytes; got dtype {data.dtype} with shape {data.shape}"
            )
        if not data.flags.c_contiguous:
            raise ImageConversionError(
                f"{name} is a non-contiguous numpy view; a message needs one contiguous byte buffer "
                "(pass np.ascontiguousarray(data))"
            )
        return data
    if isinstance(data, (list, tuple)):  # a plain sequence of ints has no buffer: copy it once
        try:
            return np.asarray(data, dtype=np.uint8)
        except (OverflowError, ValueError, TypeError) as error:
            raise ImageConversionError(f"{name} must hold integers in [0, 255]: {error}") from None
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageConversionError(
            f"{name} of type {type(data).__name__} is not a byte buffer; expected bytes, array.array('B') "
            "or a uint8 numpy array"
        ) from None
    if not view.contiguous:
        raise ImageConversionError(f"{name} is a non-contiguous buffer; a message needs contiguous bytes")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# numpy -> Image message
# --------------------------------------------------------------------------------------------------


def numpy_to_image(
    array: np.ndarray,
    encoding: str,
    header: Any = None,
    message_type: type | None = None,
    *,
    step: int | None = None,
    bigendian: bool = False,
) -> Any:
    """Build a sensor_msgs/Image holding `array` (HxW or HxWxC, the dtype `encoding` calls for).

    message_type is the class to instantiate: rclpy's sensor_msgs.msg.Image, a rosbags typestore
    class, or any class whose instances accept the Image fields as attributes; the default is the
    rosbags ROS 2 Humble sensor_msgs__msg__Image. `step` pads each row to that many bytes (default:
    no padding); `bigendian` stores 16-bit pixels big-endian. The header is used as given.

    data is a uint8 numpy array for rosbags classes (their CDR serializer requires one; without row
    padding it shares memory with a C-contiguous `array`) and an array.array('B') otherwise (one copy): rclpy's generated setter stores array.array('B') as is, while bytes or
    a list would be checked value by value in Python and a numpy array fails its type assertion.
    """
    info = encoding_info(encoding)
    pixels = _checked_pixels(array, encoding, info)
    height, width = pixels.shape[:2]
    row_bytes = width * info.bytes_per_pixel
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*bytes_per_pixel = {row_bytes}; pass step >= {row_bytes}"
        )
    stored = pixels.astype(info.dtype.newbyteorder(">" if bigendian else "<"), copy=False)
    row_view = np.ascontiguousarray(stored).reshape(height, -1).view(np.uint8)
    if step == row_bytes:  # no padding: the pixels' own bytes are the payload (no copy here)
        payload = row_view.reshape(-1)
    else:
        rows = np.zeros((height, step), np.uint8)
        rows[:, :row_bytes] = row_view
        payload = rows.reshape(-1)
    fields = {"height": height, "width": width, "encoding": encoding, "is_bigendian": int(bigendian),
              "step": step}
    return _build_message(message_type or _humble_class("sensor_msgs/msg/Image"), header, fields, payload)


def _checked_pixels(array_: Any, encoding: str, info: EncodingInfo) -> np.ndarray:
    if not isinstance(array_, np.ndarray):
        raise ImageConversionError(f"expected a numpy array for {encoding}; got {type(array_).__name__}")
    if array_.dtype != info.dtype:
        raise ImageConversionError(
            f"{encoding} needs a {info.dtype} array; got {array_.dtype} "
            f"(convert with .astype(np.{info.dtype}))"
        )
    expected = "HxW" if info.channels == 1 else f"HxWx{info.channels}"
    pixels = array_[..., 0] if info.channels == 1 and array_.ndim == 3 and array_.shape[2] == 1 else array_
    if pixels.ndim != 2 + len(info.raw_shape_suffix) or pixels.shape[2:] != info.raw_shape_suffix:
        raise ImageConversionError(f"{encoding} needs an {expected} array; got shape {array_.shape}")
    if pixels.size == 0:
        raise ImageConversionError(
            f"cannot build a {encoding} image from an empty array of shape {array_.shape}"
        )
    if encoding in _YUV_ENCODINGS and pixels.shape[1] % 2:
        raise ImageConversionError(f"{encoding} needs an even width; got {pixels.shape[1]}")
    return pixels


# --------------------------------------------------------------------------------------------------
# CompressedImage
# --------------------------------------------------------------------------------------------------


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) into an HxWx3 uint8 RGB array.

    `format` follows compressed_image_transport ("jpeg", "png", "rgb8; jpeg compressed bgr8"): the
    part after "compressed" names the channel order inside the file, BGR unless it says rgb.
    """
    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower().replace(" ", ""):
        raise ImageConversionError(
            f"format {fmt!r} is a compressedDepth image (a depth map), not a camera image; "
            "subscribe to the colour image's compressed topic instead"
        )
    buffer = _byte_view(getattr(msg, "data", None), "data")
    if buffer.size == 0:
        raise ImageConversionError(
            f"CompressedImage (format {fmt!r}) holds no data; expected JPEG or PNG bytes"
        )
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(
            f"cannot decode {buffer.size} bytes of CompressedImage data (format {fmt!r}, first bytes "
            f"{buffer[:8].tobytes().hex()}); expected a JPEG or PNG file as compressed_image_transport writes"
        )
    return _decoded_to_rgb(decoded, _stored_as_rgb(fmt))


def rgb_to_compressed(
    rgb: np.ndarray,
    fmt: str = "jpeg",
    header: Any = None,
    message_type: type | None = None,
    *,
    quality: int = 90,
) -> Any:
    """Encode an HxWx3 uint8 RGB array as a sensor_msgs/CompressedImage ("jpeg" or "png").

    The format string is compressed_image_transport's, "rgb8; jpeg compressed bgr8", so image_view
    and rqt decode it. message_type works as in numpy_to_image.
    """
    pixels = _checked_pixels(rgb, "rgb8", ENCODINGS["rgb8"])
    extensions = {"jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]), "png": (".png", [])}
    if fmt not in extensions:
        raise ImageConversionError(
            f"compression format {fmt!r} is not supported; use one of {sorted(extensions)}"
        )
    extension, params = extensions[fmt]
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ImageConversionError(f"OpenCV could not encode a {pixels.shape} image as {fmt}")
    fields = {"format": f"rgb8; {fmt} compressed bgr8"}
    return _build_message(message_type or _humble_class("sensor_msgs/msg/CompressedImage"), header, fields,
                          encoded.reshape(-1))


# compressed_image_transport stores colour images as BGR JPEG whatever their encoding (dropping alpha)
_JPEG_TO_BGR = {"rgb8": cv2.COLOR_RGB2BGR, "bgr8": None, "rgba8": cv2.COLOR_RGBA2BGR, "bgra8": cv2.COLOR_BGRA2BGR}


def image_to_jpeg(
    pixels: np.ndarray,
    encoding: str,
    header: Any = None,
    message_type: type | None = None,
    *,
    quality: int = 95,
) -> Any:
    """A sensor_msgs/CompressedImage of a colour image, as image_transport's compressed plugin writes it.

    The JPEG holds the pixels in BGR (alpha dropped) and `format` says "<encoding>; jpeg compressed
    bgr8", so image_transport subscribers (RViz, image_view, rqt) turn it back into `encoding`.
    message_type works as in numpy_to_image.
    """
    if encoding not in _JPEG_TO_BGR:
        raise ImageConversionError(
            f"a JPEG CompressedImage is made here from {sorted(_JPEG_TO_BGR)} images; got {encoding!r}"
        )
    checked = _checked_pixels(pixels, encoding, ENCODINGS[encoding])
    code = _JPEG_TO_BGR[encoding]
    bgr = checked if code is None else cv2.cvtColor(checked, code)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageConversionError(f"OpenCV could not encode a {checked.shape} {encoding} image as JPEG")
    fields = {"format": f"{encoding}; jpeg compressed bgr8"}
    return _build_message(message_type or _humble_class("sensor_msgs/msg/CompressedImage"), header, fields,
                          encoded.reshape(-1))


def _stored_as_rgb(fmt: str) -> bool:
    match = re.search(r"compressed\s+(\w+)", fmt)
    return bool(match) and match.group(1).lower().startswith("rgb")


def _decoded_to_rgb(decoded: np.ndarray, stored_as_rgb: bool) -> np.ndarray:
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    if decoded.dtype != np.uint8:
        raise ImageConversionError(f"decoded image has dtype {decoded.dtype}; expected 8- or 16-bit pixels")
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    codes = {
        1: cv2.COLOR_GRAY2RGB,
        3: None if stored_as_rgb else cv2.COLOR_BGR2RGB,
        4: cv2.COLOR_RGBA2RGB if stored_as_rgb else cv2.COLOR_BGRA2RGB,
    }
    if channels not in codes:
        raise ImageConversionError(f"decoded image has {channels} channels; expected 1, 3 or 4")
    code = codes[channels]
    return np.ascontiguousarray(decoded) if code is None else cv2.cvtColor(decoded, code)


# --------------------------------------------------------------------------------------------------
# Building messages for rclpy and rosbags alike
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def humble_typestore():
    """The rosbags type store for ROS 2 Humble (imported lazily: reading messages does not need it)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def _humble_class(msgtype: str) -> type:
    return humble_typestore().types[msgtype]


def make_header(frame_id: str = "", stamp_ns: int = 0) -> Any:
    """A rosbags std_msgs/Header with the given frame id and stamp (nanoseconds since the epoch)."""
    time_class = _humble_class("builtin_interfaces/msg/Time")
    stamp = time_class(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return _humble_class("std_msgs/msg/Header")(stamp=stamp, frame_id=frame_id)


def is_rosbags_type(message_type: type) -> bool:
    """True for rosbags message classes: dataclasses that name their ROS type in __msgtype__."""
    msgtype = getattr(message_type, "__msgtype__", None)
    return dataclasses.is_dataclass(message_type) and isinstance(msgtype, str)


def _build_message(message_type: type, header: Any, fields: dict[str, Any], payload: np.ndarray) -> Any:
    if is_rosbags_type(message_type):
        # rosbags dataclasses take every field at construction, and data as a uint8 numpy array.
        return message_type(header=make_header() if header is None else header, data=payload, **fields)
    msg = message_type()
    if header is not None or not hasattr(msg, "header"):
        msg.header = header
    for name, value in fields.items():
        setattr(msg, name, value)
    data = ByteArray("B")
    data.frombytes(payload)  # one copy, into the type rclpy's setter accepts without a per-byte check
    msg.data = data
    return msg
