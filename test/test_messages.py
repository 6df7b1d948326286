"""The package's message definitions (msg/*.msg) parse, register and CDR round-trip with rosbags."""
from __future__ import annotations

from pathlib import Path

import pytest
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

REPO_ROOT = Path(__file__).resolve().parents[1]
MSG_FILES = sorted((REPO_ROOT / "msg").glob("*.msg"))

TIMING_FIELDS = {
    "header": "std_msgs/msg/Header",
    **{name: "float32" for name in ("convert_ms", "upload_ms", "forward_ms", "postprocess_ms", "download_ms",
                                    "publish_ms", "total_ms", "latency_ms")},
    **{name: "uint64" for name in ("frames_processed", "frames_dropped", "frames_malformed", "frames_missing")},
    **{name: "string" for name in ("model", "class_map", "branch", "device", "precision")},
    "keep_rate": "float32",
    "outputs": "string[]",
    "regions_computed": "uint32",
    "regions_total": "uint32",
}


def msgtype(path: Path) -> str:
    return f"icnet_ros/msg/{path.stem}"


def package_typestore():
    """The Humble type store plus every message of this package."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = {}
    for path in MSG_FILES:
        types.update(get_types_from_msg(path.read_text(), msgtype(path)))
    store.register(types)
    return store


def test_there_are_message_definitions():
    assert "SegmentationTiming.msg" in [p.name for p in MSG_FILES]


@pytest.mark.parametrize("path", MSG_FILES, ids=lambda p: p.name)
def test_message_parses_and_every_field_is_commented(path):
    parsed = get_types_from_msg(path.read_text(), msgtype(path))
    assert msgtype(path) in parsed
    lines = [line.strip() for line in path.read_text().splitlines()]
    for index, line in enumerate(lines):
        if line and not line.startswith("#") and "=" not in line:  # a field (constants are NAME=value)
            comment_before = index > 0 and lines[index - 1].startswith("#")
            assert comment_before or "#" in line, f"{path.name}: field {line!r} has no comment"


def test_segmentation_timing_fields_and_types():
    parsed = get_types_from_msg((REPO_ROOT / "msg" / "SegmentationTiming.msg").read_text(),
                                "icnet_ros/msg/SegmentationTiming")
    _constants, fields = parsed["icnet_ros/msg/SegmentationTiming"]
    described = {}
    for name, (kind, spec) in fields:
        if kind.name == "SEQUENCE":  # string[]: (element type, bound)
            described[name] = f"{spec[0][1][0]}[]"
        else:
            described[name] = spec if isinstance(spec, str) else spec[0]
    assert described == TIMING_FIELDS
    assert fields[0][0] == "header"


def test_segmentation_timing_cdr_round_trip():
    store = package_typestore()
    timing_class = store.types["icnet_ros/msg/SegmentationTiming"]
    header = store.types["std_msgs/msg/Header"](
        stamp=store.types["builtin_interfaces/msg/Time"](sec=1_700_000_000, nanosec=123_456_789),
        frame_id="camera")
    values = {
        "convert_ms": 0.5, "upload_ms": 0.25, "forward_ms": 7.75, "postprocess_ms": 1.5,
        "download_ms": 0.125, "publish_ms": 0.375, "total_ms": 10.5, "latency_ms": 33.25,
        "frames_processed": 2**40 + 1, "frames_dropped": 17, "frames_malformed": 2, "frames_missing": 3,
        "outputs": ["labels", "camera_info"],
        "model": "icnet_cityscapes.safetensors", "class_map": "cityscapes", "branch": "sub124",
        "keep_rate": 0.5, "device": "cuda:0", "precision": "fp16", "regions_computed": 8, "regions_total": 32,
    }
    message = timing_class(header=header, **values)
    raw = store.serialize_cdr(message, "icnet_ros/msg/SegmentationTiming")
    decoded = store.deserialize_cdr(raw, "icnet_ros/msg/SegmentationTiming")
    assert decoded.header == header
    for name, value in values.items():
        expected = pytest.approx(value) if isinstance(value, float) else value  # float32 keeps these exact
        assert getattr(decoded, name) == expected, name
    # The message definition rosbags generates is what a bag of timings would carry.
    definition, _ = store.generate_msgdef("icnet_ros/msg/SegmentationTiming", ros_version=2)
    assert "float32 forward_ms" in definition and "std_msgs/Header header" in definition
