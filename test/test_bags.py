"""rosbag2 writing and reading with rosbags, and icnet-make-bag on tiny generated inputs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from icnet_ros.bags import (
    BagError,
    BagWriter,
    camera_info_message,
    iter_image_messages,
    list_image_topics,
    list_topics,
)
from icnet_ros.bags.make_bag import CITYSCAPES_RATE_HZ, DEFAULT_START_TIME_S, main
from icnet_ros.ros.image_conversion import (
    compressed_to_rgb,
    image_to_numpy,
    image_to_rgb,
    make_header,
    numpy_to_image,
    rgb_to_compressed,
)

STORAGES = ["mcap", "sqlite3"]
STORAGE_SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}


def frames(count: int = 4, height: int = 6, width: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def stamp(index: int) -> int:
    return 1_700_000_000_000_000_000 + index * 50_000_000 + 7  # odd nanoseconds must survive too


def write_sample_bag(path: Path, storage: str, images: list[np.ndarray]) -> None:
    with BagWriter(path, storage) as bag:
        for index, rgb in enumerate(images):
            header = make_header("camera", stamp(index))
            bag.write("/camera/image_raw", stamp(index), numpy_to_image(rgb, "rgb8", header, step=8 * 3 + 4))
            bag.write("/camera/image_raw/compressed", stamp(index), rgb_to_compressed(rgb, "png", header))
            info = camera_info_message(8, 6, 5.0, 5.0, 4.0, 3.0, header)
            bag.write("/camera/camera_info", stamp(index), info)


def no_staging_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------
# BagWriter and the readers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
def test_written_bag_reads_back_identically(tmp_path, storage):
    images = frames()
    bag_path = tmp_path / "drive"
    write_sample_bag(bag_path, storage, images)

    expected_files = ["drive" + STORAGE_SUFFIX[storage], "metadata.yaml"]
    assert sorted(p.name for p in bag_path.iterdir()) == expected_files
    assert no_staging_left(tmp_path)
    metadata = yaml.safe_load((bag_path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert metadata["version"] == 8 and metadata["storage_identifier"] == storage
    assert list_topics(bag_path) == {
        "/camera/image_raw": "sensor_msgs/msg/Image",
        "/camera/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
        "/camera/camera_info": "sensor_msgs/msg/CameraInfo",
    }
    assert set(list_image_topics(bag_path)) == {"/camera/image_raw", "/camera/image_raw/compressed"}

    raw = list(iter_image_messages(bag_path, "/camera/image_raw"))
    assert [t for _, t, _, _ in raw] == [stamp(i) for i in range(len(images))]
    for index, (topic, timestamp, msg, msgtype) in enumerate(raw):
        assert (topic, msgtype) == ("/camera/image_raw", "sensor_msgs/msg/Image")
        assert msg.header.frame_id == "camera"
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == timestamp
        assert msg.step == 8 * 3 + 4
        np.testing.assert_array_equal(image_to_numpy(msg), images[index])

    compressed = list(iter_image_messages(bag_path, "/camera/image_raw/compressed"))
    for index, (_, _, msg, msgtype) in enumerate(compressed):
        assert msgtype == "sensor_msgs/msg/CompressedImage"
        np.testing.assert_array_equal(compressed_to_rgb(msg), images[index])

    both = list(iter_image_messages(bag_path))
    assert len(both) == 2 * len(images)
    assert [t for _, t, _, _ in both] == sorted(t for _, t, _, _ in both)


def test_failed_write_leaves_no_bag(tmp_path):
    bag_path = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="camera unplugged"), BagWriter(bag_path, "mcap") as bag:
        bag.write("/camera/image_raw", stamp(0), numpy_to_image(frames(1)[0], "rgb8"))
        raise RuntimeError("camera unplugged")
    assert not bag_path.exists()
    assert no_staging_left(tmp_path)


def test_existing_bag_is_kept_unless_overwrite(tmp_path):
    bag_path = tmp_path / "drive"
    write_sample_bag(bag_path, "mcap", frames(2))
    with pytest.raises(BagError, match="exists already"):
        write_sample_bag(bag_path, "mcap", frames(1))
    assert len(list(iter_image_messages(bag_path, "/camera/image_raw"))) == 2
    with BagWriter(bag_path, "sqlite3", overwrite=True) as bag:
        bag.write("/other/image", stamp(0), numpy_to_image(frames(1)[0], "rgb8"))
    assert list_topics(bag_path) == {"/other/image": "sensor_msgs/msg/Image"}
    assert no_staging_left(tmp_path)


def test_writer_rejects_unknown_storage(tmp_path):
    with pytest.raises(BagError, match="mcap"):
        BagWriter(tmp_path / "x", "rosbag1")


def test_wrong_topic_lists_the_image_topics(tmp_path):
    bag_path = tmp_path / "drive"
    write_sample_bag(bag_path, "mcap", frames(1))
    with pytest.raises(BagError) as caught:
        list(iter_image_messages(bag_path, "/camera/image_rect"))
    message = str(caught.value)
    assert "/camera/image_rect" in message
    assert "/camera/image_raw (sensor_msgs/msg/Image)" in message
    assert "/camera/image_raw/compressed (sensor_msgs/msg/CompressedImage)" in message
    with pytest.raises(BagError, match="carries sensor_msgs/msg/CameraInfo, not images"):
        list(iter_image_messages(bag_path, "/camera/camera_info"))


def test_bag_without_images_names_its_topics(tmp_path):
    bag_path = tmp_path / "info_only"
    with BagWriter(bag_path, "mcap") as bag:
        bag.write("/camera/camera_info", stamp(0), camera_info_message(8, 6, 5.0, 5.0, 4.0, 3.0))
    with pytest.raises(BagError, match=r"no sensor_msgs/Image.*/camera/camera_info"):
        list(iter_image_messages(bag_path))


def _truncated_storage(tmp_path: Path, storage: str) -> Path:
    bag_path = tmp_path / f"truncated_{storage}"
    write_sample_bag(bag_path, storage, frames(3))
    storage_file = bag_path / (bag_path.name + STORAGE_SUFFIX[storage])
    storage_file.write_bytes(storage_file.read_bytes()[:100])
    return bag_path


def _garbage_metadata(tmp_path: Path) -> Path:
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed")
    return tmp_path / "garbage"


def _plain_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("not a bag")
    return tmp_path / "notes.txt"


def _empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


CORRUPT = {
    "missing path": lambda tmp: tmp / "nowhere",
    "plain file": _plain_file,
    "empty folder": _empty_folder,
    "garbage metadata": _garbage_metadata,
    "truncated mcap": lambda tmp: _truncated_storage(tmp, "mcap"),
    "truncated sqlite3": lambda tmp: _truncated_storage(tmp, "sqlite3"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_or_non_bag_path_gives_a_clear_error(tmp_path, case):
    path = CORRUPT[case](tmp_path)
    with pytest.raises(BagError) as caught:
        list(iter_image_messages(path))
    assert str(path) in str(caught.value)
    assert "rosbag2" in str(caught.value) or "does not exist" in str(caught.value)


# --------------------------------------------------------------------------------------------------
# icnet-make-bag
# --------------------------------------------------------------------------------------------------


def cityscapes_tree(root: Path, frame_numbers=(17, 18, 19), camera_frame: int | None = 19, size=(6, 8)):
    """A tiny leftImg8bit_sequence snippet (city 'testcity', sequence 3) with one calibration file."""
    image_dir = root / "leftImg8bit_sequence" / "val" / "testcity"
    image_dir.mkdir(parents=True)
    written = {}
    for index, number in enumerate(frame_numbers):
        bgr = frames(1, *size, seed=100 + index)[0]
        cv2.imwrite(str(image_dir / f"testcity_000003_{number:06d}_leftImg8bit.png"), bgr)
        written[number] = bgr[..., ::-1]
    if camera_frame is not None:
        camera_dir = root / "camera" / "val" / "testcity"
        camera_dir.mkdir(parents=True)
        calibration = {"intrinsic": {"fx": 2262.52, "fy": 2265.30, "u0": 1096.98, "v0": 513.137},
                       "extrinsic": {"baseline": 0.209, "pitch": 0.038}}
        (camera_dir / f"testcity_000003_{camera_frame:06d}_camera.json").write_text(json.dumps(calibration))
    return written


@pytest.mark.parametrize("storage", STORAGES)
def test_make_bag_from_cityscapes_sequence(tmp_path, storage, capsys):
    written = cityscapes_tree(tmp_path / "cityscapes")
    output = tmp_path / "bag"
    assert main([str(tmp_path / "cityscapes"), "-o", str(output), "--storage", storage, "--quiet"]) == 0

    printed = capsys.readouterr().out
    assert "3 frames" in printed and str(output) in printed and "/camera/camera_info" in printed
    assert list_topics(output) == {"/camera/image_raw": "sensor_msgs/msg/Image",
                                   "/camera/camera_info": "sensor_msgs/msg/CameraInfo"}
    images = list(iter_image_messages(output))
    start = round(DEFAULT_START_TIME_S * 1e9)
    expected_stamps = [start + round(i * 1e9 / CITYSCAPES_RATE_HZ) for i in range(3)]
    assert [t for _, t, _, _ in images] == expected_stamps
    for (_, _, msg, _), number in zip(images, sorted(written)):
        assert msg.encoding == "rgb8" and msg.header.frame_id == "camera"
        np.testing.assert_array_equal(image_to_numpy(msg), written[number])
    periods = np.diff(expected_stamps) / 1e9
    assert np.allclose(1 / periods, 17.0, rtol=1e-6)

    infos = _camera_infos(output)
    assert [t for t, _ in infos] == expected_stamps  # the snippet's one file serves every frame
    msg = infos[0][1]
    assert (msg.width, msg.height, msg.distortion_model) == (8, 6, "plumb_bob")
    np.testing.assert_allclose(msg.k, [2262.52, 0, 1096.98, 0, 2265.30, 513.137, 0, 0, 1])
    np.testing.assert_allclose(msg.p, [2262.52, 0, 1096.98, 0, 0, 2265.30, 513.137, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(msg.d, np.zeros(5))


def _camera_infos(bag_path: Path):
    from rosbags.rosbag2 import Reader

    from icnet_ros.ros.image_conversion import humble_typestore

    with Reader(bag_path) as reader:
        connections = [c for c in reader.connections if c.topic == "/camera/camera_info"]
        return [(t, humble_typestore().deserialize_cdr(raw, c.msgtype))
                for c, t, raw in reader.messages(connections=connections)]


def test_make_bag_options_rate_topic_encoding_and_no_calibration(tmp_path):
    written = cityscapes_tree(tmp_path / "cs", frame_numbers=(0, 2), camera_frame=None)
    output = tmp_path / "bag"
    argv = [str(tmp_path / "cs"), "-o", str(output), "--rate", "4", "--topic", "/front/image",
            "--frame-id", "front", "--encoding", "bgr8", "--start-time", "10", "--city", "testcity",
            "--sequence", "3", "--split", "val", "--quiet"]
    assert main(argv) == 0
    assert list_topics(output) == {"/front/image": "sensor_msgs/msg/Image"}
    images = list(iter_image_messages(output))
    assert [t for _, t, _, _ in images] == [10 * 10**9, 10 * 10**9 + 500_000_000]  # frame numbers 0 and 2
    assert images[0][2].encoding == "bgr8" and images[0][2].header.frame_id == "front"
    np.testing.assert_array_equal(image_to_rgb(images[1][2]), written[2])


def test_make_bag_from_image_folder_compressed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rgbs = [np.zeros((16, 16, 3), np.uint8) for _ in range(3)]
    for index, rgb in enumerate(rgbs):  # flat colour blocks: JPEG keeps them, so channel order shows
        rgb[:, :8] = (200, 40 * index, 30)
        rgb[:, 8:] = (20, 180, 60 * index)
        cv2.imwrite(str(folder / f"frame_{index:03d}.png"), rgb[..., ::-1])
    (folder / "notes.txt").write_text("ignored")
    output = tmp_path / "bag"
    assert main([str(folder), "-o", str(output), "--compressed", "--storage", "sqlite3", "--quiet"]) == 0
    images = list(iter_image_messages(output))
    assert [msgtype for *_, msgtype in images] == ["sensor_msgs/msg/CompressedImage"] * 3
    start = round(DEFAULT_START_TIME_S * 1e9)
    assert [t for _, t, _, _ in images] == [start, start + 100_000_000, start + 200_000_000]  # 10 Hz
    for (_, _, msg, _), rgb in zip(images, rgbs):
        assert msg.format == "rgb8; jpeg compressed bgr8"
        assert np.abs(compressed_to_rgb(msg).astype(int) - rgb).mean() < 6


def _bad_image(folder: Path) -> Path:
    cv2.imwrite(str(folder / "a.png"), np.zeros((6, 8, 3), np.uint8))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder / "b.png"


def _mixed_sizes(folder: Path) -> Path:
    cv2.imwrite(str(folder / "a.png"), np.zeros((6, 8, 3), np.uint8))
    cv2.imwrite(str(folder / "b.png"), np.zeros((8, 8, 3), np.uint8))
    return folder / "b.png"


BAD_INPUTS = {
    "empty folder": (lambda folder: folder, "holds no images"),
    "unreadable image": (_bad_image, "cannot read image"),
    "mixed sizes": (_mixed_sizes, "must have one size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_make_bag_bad_input_names_the_file(tmp_path, case, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    make, fragment = BAD_INPUTS[case]
    culprit = make(folder)
    assert main([str(folder), "-o", str(tmp_path / "bag"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert fragment in error and str(culprit) in error
    assert not (tmp_path / "bag").exists()
    assert no_staging_left(tmp_path)


def test_make_bag_unknown_city_lists_the_available_ones(tmp_path, capsys):
    cityscapes_tree(tmp_path / "cs")
    assert main([str(tmp_path / "cs"), "-o", str(tmp_path / "bag"), "--city", "atlantis", "--quiet"]) == 1
    assert "available: testcity" in capsys.readouterr().err
    assert main([str(tmp_path / "cs"), "-o", str(tmp_path / "bag"), "--sequence", "9", "--quiet"]) == 1
    assert "sequences: [3]" in capsys.readouterr().err


def test_make_bag_rejects_bad_rate(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "-o", str(tmp_path / "bag"), "--rate", "0"])
