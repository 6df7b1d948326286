"""sensor_msgs/Image <-> numpy: round trips, RGB conversion, zero copy and malformed messages."""
from __future__ import annotations

import subprocess
import sys
import types
from array import array

import cv2
import numpy as np
import pytest

from icnet_ros.ros.image_conversion import (
    ENCODINGS,
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_to_rgb,
    humble_typestore,
    image_to_jpeg,
    image_to_numpy,
    image_to_rgb,
    make_header,
    numpy_to_image,
    rgb_to_compressed,
)

HEIGHT, WIDTH = 6, 10


class FakeRclpyImage:
    """Mimics rclpy's generated sensor_msgs.msg.Image: slots, a default header and a strict data setter."""

    __slots__ = ("_data", "encoding", "header", "height", "is_bigendian", "step", "width")

    def __init__(self):
        self.header = types.SimpleNamespace(frame_id="", stamp=types.SimpleNamespace(sec=0, nanosec=0))
        self.height = self.width = self.is_bigendian = self.step = 0
        self.encoding = ""
        self._data = array("B")

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        # rclpy's setter takes array.array('B') as is; a numpy array fails its Sequence assertion.
        assert isinstance(value, array) and value.typecode == "B", "rclpy wants array.array('B')"
        self._data = value


def sample(encoding: str, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    info = ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    high = np.iinfo(info.dtype).max + 1
    return rng.integers(0, high, (height, width, *info.raw_shape_suffix), dtype=info.dtype)


def duck_message(array_: np.ndarray, encoding: str, *, step: int | None = None, bigendian: bool = False,
                 data_kind: str = "bytes") -> types.SimpleNamespace:
    """A message built by hand, without this module, the way another producer would build one."""
    info = ENCODINGS[encoding]
    row_bytes = array_.shape[1] * info.bytes_per_pixel
    step = step or row_bytes
    rows = np.zeros((array_.shape[0], step), np.uint8)
    stored = array_.astype(info.dtype.newbyteorder(">" if bigendian else "<"))
    rows[:, :row_bytes] = stored.reshape(array_.shape[0], -1).view(np.uint8)
    raw = rows.tobytes()
    data = {"bytes": raw, "array": array("B", raw), "list": list(raw)}[data_kind]
    return types.SimpleNamespace(header=make_header("cam", 5), height=array_.shape[0], width=array_.shape[1],
                                 encoding=encoding, is_bigendian=int(bigendian), step=step, data=data)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
@pytest.mark.parametrize("padding", [0, 3, 16])
@pytest.mark.parametrize("message_type", [None, FakeRclpyImage, types.SimpleNamespace])
def test_round_trip_every_encoding(encoding, padding, message_type):
    pixels = sample(encoding)
    step = WIDTH * ENCODINGS[encoding].bytes_per_pixel + padding
    msg = numpy_to_image(pixels, encoding, message_type=message_type, step=step)
    assert (msg.height, msg.width, msg.step, msg.encoding) == (HEIGHT, WIDTH, step, encoding)
    assert len(msg.data) == step * HEIGHT
    back = image_to_numpy(msg)
    assert back.dtype == pixels.dtype and back.shape == pixels.shape
    np.testing.assert_array_equal(back, pixels)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_mono16_big_endian_round_trip(padding):
    pixels = sample("mono16", seed=3)
    msg = numpy_to_image(pixels, "mono16", step=WIDTH * 2 + padding, bigendian=True)
    assert msg.is_bigendian == 1
    first = bytes(msg.data[:2])
    assert first == int(pixels[0, 0]).to_bytes(2, "big")
    out = image_to_numpy(msg)
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("data_kind", ["bytes", "array", "list"])
def test_hand_built_duck_typed_messages(bigendian, data_kind):
    pixels = sample("mono16", seed=4)
    msg = duck_message(pixels, "mono16", step=WIDTH * 2 + 6, bigendian=bigendian, data_kind=data_kind)
    np.testing.assert_array_equal(image_to_numpy(msg), pixels)


def test_rosbags_message_survives_cdr_round_trip():
    store = humble_typestore()
    pixels = sample("bgr8", seed=5)
    header = make_header("camera", 1_234_567_890_123)
    msg = numpy_to_image(pixels, "bgr8", header, step=WIDTH * 3 + 2)
    decoded = store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
    assert decoded.header == header
    np.testing.assert_array_equal(image_to_numpy(decoded), pixels)


def test_header_passes_through_untouched():
    header = make_header("left_camera", 42)
    assert numpy_to_image(sample("rgb8"), "rgb8", header).header is header
    rclpy_like = numpy_to_image(sample("rgb8"), "rgb8", header, message_type=FakeRclpyImage)
    assert rclpy_like.header is header
    assert isinstance(rclpy_like.data, array) and rclpy_like.data.typecode == "B"


def test_single_channel_accepts_trailing_axis():
    pixels = sample("mono8")
    np.testing.assert_array_equal(image_to_numpy(numpy_to_image(pixels[..., None], "mono8")), pixels)


def test_non_contiguous_input_array_is_copied_into_the_message():
    pixels = sample("rgb8", height=HEIGHT, width=2 * WIDTH)[:, ::2]
    np.testing.assert_array_equal(image_to_numpy(numpy_to_image(pixels, "rgb8")), pixels)


# --------------------------------------------------------------------------------------------------
# Zero copy
# --------------------------------------------------------------------------------------------------


def test_unpadded_rgb8_is_a_view_of_the_message_buffer():
    msg = numpy_to_image(sample("rgb8"), "rgb8")
    raw = image_to_numpy(msg)
    assert np.shares_memory(raw, msg.data)
    assert np.shares_memory(image_to_rgb(msg), msg.data)


def test_padded_and_rclpy_buffers_are_viewed_not_copied():
    padded = numpy_to_image(sample("rgb8"), "rgb8", step=WIDTH * 3 + 7)
    assert np.shares_memory(image_to_numpy(padded), padded.data)
    rclpy_like = numpy_to_image(sample("rgb8"), "rgb8", message_type=FakeRclpyImage)
    assert np.shares_memory(image_to_numpy(rclpy_like), np.frombuffer(rclpy_like.data, np.uint8))


# --------------------------------------------------------------------------------------------------
# RGB for the network
# --------------------------------------------------------------------------------------------------


def test_bgr8_known_pixels_become_rgb():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[0, 0] = (255, 0, 0)  # blue
    bgr[0, 1] = (0, 0, 255)  # red
    bgr[1, 0] = (0, 255, 0)  # green
    rgb = image_to_rgb(numpy_to_image(bgr, "bgr8", step=8))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3) and rgb.flags.c_contiguous
    assert tuple(rgb[0, 0]) == (0, 0, 255)
    assert tuple(rgb[0, 1]) == (255, 0, 0)
    assert tuple(rgb[1, 0]) == (0, 255, 0)


@pytest.mark.parametrize("encoding", ["rgb8", "rgba8", "bgr8", "bgra8"])
def test_colour_encodings_give_the_same_rgb(encoding):
    rgb = sample("rgb8", seed=7)
    order = [2, 1, 0] if encoding.startswith("bgr") else [0, 1, 2]
    pixels = rgb[..., order]
    if encoding.endswith("a8"):
        pixels = np.concatenate([pixels, np.full((HEIGHT, WIDTH, 1), 77, np.uint8)], axis=2)
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(pixels, encoding, step=WIDTH * 4 + 4)), rgb)


def test_mono_encodings_replicate_grey():
    grey16 = sample("mono16", seed=8)
    rgb16 = image_to_rgb(numpy_to_image(grey16, "mono16", bigendian=True))
    np.testing.assert_array_equal(rgb16, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    grey8 = sample("mono8", seed=9)
    np.testing.assert_array_equal(image_to_rgb(numpy_to_image(grey8, "mono8")), np.dstack([grey8] * 3))


# Where the red sites of each ROS Bayer pattern sit in the 2x2 block (row, column).
BAYER_RED_POSITION = {"bayer_rggb8": (0, 0), "bayer_bggr8": (1, 1), "bayer_gbrg8": (1, 0),
                      "bayer_grbg8": (0, 1)}


@pytest.mark.parametrize("encoding", sorted(BAYER_RED_POSITION))
def test_bayer_pattern_names_follow_ros(encoding):
    """A mosaic whose only lit sites are the pattern's red ones must demosaic to pure red."""
    mosaic = np.zeros((8, 8), np.uint8)
    row, col = BAYER_RED_POSITION[encoding]
    mosaic[row::2, col::2] = 200
    centre = image_to_rgb(numpy_to_image(mosaic, encoding, step=11))[3:5, 3:5]
    assert (centre[..., 0] == 200).all() and (centre[..., 1:] == 0).all()


@pytest.mark.parametrize("encoding", sorted(BAYER_RED_POSITION) + ["yuv422", "yuv422_yuy2"])
def test_bayer_and_yuv_match_opencv(encoding):
    raw = sample(encoding, seed=11)
    expected = cv2.cvtColor(raw, ENCODINGS[encoding].cv2_to_rgb)
    got = image_to_rgb(duck_message(raw, encoding, step=raw.shape[1] * raw[0, 0].size + 5))
    np.testing.assert_array_equal(got, expected)


def test_yuv422_is_uyvy():
    """ROS yuv422 byte order is U Y V Y: neutral chroma (128) with luma 200 is light grey."""
    uyvy = np.array([[[128, 200], [128, 200]]], np.uint8)  # U0 Y0 | V0 Y1
    rgb = image_to_rgb(numpy_to_image(np.repeat(uyvy, 2, axis=0), "yuv422"))
    assert np.abs(rgb.astype(int) - 200).max() <= 40  # studio-range luma scaling, but grey
    assert np.ptp(rgb[0, 0].astype(int)) <= 2


# --------------------------------------------------------------------------------------------------
# CompressedImage
# --------------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact():
    rgb = sample("rgb8", seed=12)
    msg = rgb_to_compressed(rgb, "png", make_header("cam", 9))
    assert msg.format == "rgb8; png compressed bgr8"
    np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)


def test_jpeg_round_trip_is_close():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 30, 40)
    rgb[:, 24:] = (20, 180, 90)
    msg = rgb_to_compressed(rgb, "jpeg", message_type=types.SimpleNamespace, quality=95)
    assert isinstance(msg.data, array)
    assert np.abs(compressed_to_rgb(msg).astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_images_become_jpegs_as_image_transport_writes_them(encoding):
    """BGR inside, '<encoding>; jpeg compressed bgr8' outside (alpha dropped): what image_transport's
    compressed subscribers expect, and what compressed_to_rgb reads back."""
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24], rgb[:, 24:] = (200, 30, 40), (20, 180, 90)
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack((rgb, np.full((32, 48), 9, np.uint8))),
              "bgra8": np.dstack((rgb[..., ::-1], np.full((32, 48), 9, np.uint8)))}[encoding]
    msg = image_to_jpeg(np.ascontiguousarray(pixels), encoding, make_header("cam", 9), quality=95)
    assert msg.format == f"{encoding}; jpeg compressed bgr8" and msg.header.frame_id == "cam"
    bgr = cv2.imdecode(np.asarray(msg.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (32, 48, 3) and np.abs(bgr[..., ::-1].astype(int) - rgb).mean() < 4
    assert np.abs(compressed_to_rgb(msg).astype(int) - rgb).mean() < 4


def test_compressed_rgb_channel_order_and_grey():
    rgb = sample("rgb8", seed=13)
    _ok, encoded = cv2.imencode(".png", rgb)  # stored as if it were BGR, as the format then says
    msg = types.SimpleNamespace(format="rgb8; png compressed rgb8", data=encoded.tobytes())
    np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)
    grey16 = sample("mono16", seed=14)
    _ok, encoded = cv2.imencode(".png", grey16)
    grey_msg = types.SimpleNamespace(format="mono16; png compressed mono16", data=encoded.tobytes())
    np.testing.assert_array_equal(compressed_to_rgb(grey_msg)[..., 1], (grey16 >> 8).astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Malformed input: ImageConversionError and nothing else
# --------------------------------------------------------------------------------------------------


def _good(**changes):
    msg = duck_message(sample("rgb8"), "rgb8")
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def _without(name):
    msg = _good()
    delattr(msg, name)
    return msg


MALFORMED_IMAGES = {
    "short data": (lambda: _good(data=bytes(HEIGHT * WIDTH * 3 - 1)), ["needs step*height = 180", "179"]),
    "step below width": (lambda: _good(step=WIDTH * 3 - 1), ["step 29", "at least 30"]),
    "unknown encoding": (lambda: _good(encoding="rgb16"), ["'rgb16'", "bgr8", "yuv422"]),
    "zero by zero": (lambda: _good(height=0, width=0, step=0, data=b""), ["0x0", "at least 1"]),
    "zero width": (lambda: _good(width=0), ["0x6"]),
    "negative height": (lambda: _good(height=-1), ["height", "-1"]),
    "float width": (lambda: _good(width=10.0), ["width", "integer"]),
    "non-contiguous data": (lambda: _good(data=np.zeros(2 * HEIGHT * WIDTH * 3, np.uint8)[::2]),
                            ["non-contiguous", "ascontiguousarray"]),
    "uint16 data array": (lambda: _good(data=np.zeros(HEIGHT * WIDTH * 3, np.uint16)), ["uint8", "uint16"]),
    "data not a buffer": (lambda: _good(data="pixels"), ["str", "byte buffer"]),
    "data None": (lambda: _good(data=None), ["NoneType", "byte buffer"]),
    "data out of range": (lambda: _good(data=[300] * (HEIGHT * WIDTH * 3)), ["[0, 255]"]),
    "missing field": (lambda: _without("step"), ["step", "not a sensor_msgs/Image"]),
    "odd yuv width": (lambda: _good(encoding="yuv422", width=9, step=18), ["even", "9"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_IMAGES))
@pytest.mark.parametrize("convert", [image_to_numpy, image_to_rgb])
def test_malformed_images_raise_image_conversion_error(case, convert):
    build, fragments = MALFORMED_IMAGES[case]
    with pytest.raises(ImageConversionError) as caught:
        convert(build())
    assert type(caught.value) is ImageConversionError
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


MALFORMED_COMPRESSED = {
    "garbage bytes": (types.SimpleNamespace(format="jpeg", data=b"\x00not a jpeg at all"), ["cannot decode"]),
    "truncated jpeg": (types.SimpleNamespace(format="jpeg", data=b"\xff\xd8\xff\xe0"), ["cannot decode"]),
    "empty": (types.SimpleNamespace(format="png", data=b""), ["no data"]),
    "compressed depth": (types.SimpleNamespace(format="16UC1; compressedDepth png", data=b"\x00" * 20),
                         ["compressedDepth"]),
    "no data field": (types.SimpleNamespace(format="jpeg"), ["byte buffer"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_COMPRESSED))
def test_malformed_compressed_raise_image_conversion_error(case):
    msg, fragments = MALFORMED_COMPRESSED[case]
    with pytest.raises(ImageConversionError) as caught:
        compressed_to_rgb(msg)
    assert type(caught.value) is ImageConversionError
    for fragment in fragments:
        assert fragment in str(caught.value)


BAD_ARRAYS = {
    "float pixels": (lambda: numpy_to_image(np.zeros((4, 4, 3), np.float32), "rgb8"), ["uint8", "float32"]),
    "uint8 for mono16": (lambda: numpy_to_image(np.zeros((4, 4), np.uint8), "mono16"), ["uint16"]),
    "channels mismatch": (lambda: numpy_to_image(np.zeros((4, 4, 4), np.uint8), "rgb8"),
                          ["HxWx3", "(4, 4, 4)"]),
    "grey given 3 channels": (lambda: numpy_to_image(np.zeros((4, 4, 3), np.uint8), "mono8"), ["HxW"]),
    "empty array": (lambda: numpy_to_image(np.zeros((0, 4, 3), np.uint8), "rgb8"), ["empty"]),
    "step too small": (lambda: numpy_to_image(np.zeros((4, 4, 3), np.uint8), "rgb8", step=11),
                       ["step >= 12"]),
    "odd yuv width": (lambda: numpy_to_image(np.zeros((4, 3, 2), np.uint8), "yuv422"), ["even width"]),
    "unknown encoding": (lambda: numpy_to_image(np.zeros((4, 4), np.uint8), "8UC1"), ["supported encodings"]),
    "not an array": (lambda: numpy_to_image([[1, 2], [3, 4]], "mono8"), ["numpy array", "list"]),
    "bad compression": (lambda: rgb_to_compressed(np.zeros((4, 4, 3), np.uint8), "webp"), ["jpeg", "png"]),
    "jpeg of labels": (lambda: image_to_jpeg(np.zeros((4, 4), np.uint8), "mono8"), ["'mono8'", "'rgb8'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays_raise_image_conversion_error(case):
    build, fragments = BAD_ARRAYS[case]
    with pytest.raises(ImageConversionError) as caught:
        build()
    assert type(caught.value) is ImageConversionError
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_message_layer_imports_no_ros():
    code = ("import sys, icnet_ros.ros, icnet_ros.ros.image_conversion, icnet_ros.bags.make_bag; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'sensor_msgs')]")
    subprocess.run([sys.executable, "-c", code], check=True)
