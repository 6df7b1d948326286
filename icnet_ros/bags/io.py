"""Read and write rosbag2 files (mcap or sqlite3) with the `rosbags` library: no ROS installation needed.

Bags are written as rosbag2 metadata version 8 with ROS 2 Humble message definitions. Version 9
stores the QoS profiles as a YAML list, which Humble's `ros2 bag play` cannot parse; version 8 keeps
the string form that every distribution from Humble on reads. Writes are atomic: the bag is built in
a hidden staging folder beside the destination and renamed into place only once it is complete, so
a failed or interrupted write never leaves a half bag under the final name.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icnet_ros.ros.image_conversion import humble_typestore, make_header

if TYPE_CHECKING:
    from typing_extensions import Self

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
STORAGES = ("mcap", "sqlite3")
BAG_VERSION = 8  # see the module docstring: the newest version Humble's rosbag2 can read


class BagError(ValueError):
    """A bag that cannot be read or written, or a topic that is not in it."""


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class BagWriter:
    """Write messages into a new rosbag2, atomically. Use as a context manager.

        with BagWriter("drive_bag", storage="mcap") as bag:
            bag.write("/camera/image_raw", stamp_ns, image_msg)

    Connections are added on first use of a (topic, message type) pair. Messages are rosbags
    objects of `typestore` (default: the ROS 2 Humble store); register custom types into it first.
    """

    def __init__(self, path: str | os.PathLike, storage: str = "mcap", *, overwrite: bool = False,
                 typestore: Any = None) -> None:
        if storage not in STORAGES:
            raise BagError(f"storage {storage!r} is not supported; use one of {list(STORAGES)}")
        self.path = Path(path)
        self.storage = storage
        self.overwrite = overwrite
        self.typestore = typestore or humble_typestore()
        self.counts: dict[str, int] = {}  # messages written per topic
        self.topics: dict[str, str] = {}  # topic -> message type
        self._connections: dict[tuple[str, str], Any] = {}
        self._staging: Path | None = None
        self._writer: Any = None

    def __enter__(self) -> Self:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if self.path.exists() and not self.overwrite:
            raise BagError(
                f"{self.path} exists already; choose another output path or pass overwrite=True "
                "(icnet-make-bag --overwrite)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Staging in the destination's folder keeps the final rename on one filesystem (atomic), and
        # the inner folder carries the final name because rosbags names the storage file after it.
        self._staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                              dir=self.path.parent))
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self._staging / self.path.name, version=BAG_VERSION, storage_plugin=plugin)
        try:
            self._writer.open()
        except BaseException:
            shutil.rmtree(self._staging, ignore_errors=True)
            raise
        return self

    def write(self, topic: str, timestamp_ns: int, msg: Any, msgtype: str | None = None) -> None:
        """Serialize `msg` (CDR) and record it on `topic` at `timestamp_ns` (nanoseconds since the epoch)."""
        if self._writer is None:
            raise BagError("BagWriter.write called outside its `with` block")
        msgtype = msgtype or getattr(msg, "__msgtype__", None)
        if not msgtype:
            raise BagError(f"cannot tell the message type of {type(msg).__name__}; pass msgtype=")
        if int(timestamp_ns) < 0:
            raise BagError(f"timestamp {timestamp_ns} ns is negative; bag timestamps are ns since the epoch")
        connection = self._connections.get((topic, msgtype))
        if connection is None:
            connection = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
            self._connections[(topic, msgtype)] = connection
            self.topics[topic] = msgtype
        self._writer.write(connection, int(timestamp_ns), self.typestore.serialize_cdr(msg, msgtype))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        writer, self._writer = self._writer, None
        try:
            if exc_type is None:
                try:
                    writer.close()
                except BaseException:
                    with suppress(Exception):
                        writer.abort()
                    raise
                self._publish()
            else:
                with suppress(Exception):
                    writer.abort()
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _publish(self) -> None:
        """Rename the finished bag into place (replacing an old one only when overwrite was asked)."""
        if self.path.exists():  # rename() cannot replace a non-empty folder: move the old bag aside
            os.rename(self.path, self._staging / ".replaced")
        os.rename(self._staging / self.path.name, self.path)


def camera_info_message(width: int, height: int, fx: float, fy: float, cx: float, cy: float,
                        header: Any = None) -> Any:
    """A Humble sensor_msgs/CameraInfo for an undistorted pinhole camera (plumb_bob, zero D).

    K = [fx 0 cx; 0 fy cy; 0 0 1], R = identity and P = [K | 0], as for a monocular camera.
    """
    store = humble_typestore()
    k = np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0], dtype=np.float64)
    p = np.array([fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=np.float64)
    roi = store.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)
    return store.types[CAMERA_INFO_TYPE](
        header=header if header is not None else make_header(), height=int(height), width=int(width),
        distortion_model="plumb_bob", d=np.zeros(5, np.float64), k=k, r=np.eye(3).reshape(-1), p=p,
        binning_x=0, binning_y=0, roi=roi,
    )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@contextmanager
def _open_reader(bag_path: str | os.PathLike) -> Iterator[Any]:
    """An open rosbags Reader; any failure to open or read becomes a BagError naming the path."""
    from rosbags.rosbag2 import Reader, ReaderError

    path = Path(bag_path)
    if not path.exists():
        raise BagError(f"{path} does not exist; expected a rosbag2 folder (metadata.yaml + .mcap or .db3)")
    try:
        with Reader(path) as reader:
            yield reader
    except (ReaderError, OSError, sqlite3.Error, KeyError, TypeError, ValueError, AssertionError) as error:
        if isinstance(error, BagError):
            raise
        raise BagError(
            f"{path} is not a readable rosbag2 ({type(error).__name__}: {error}); expected a folder with "
            "metadata.yaml and a .mcap or .db3 file, as `ros2 bag record` or icnet-make-bag write"
        ) from error


def list_topics(bag_path: str | os.PathLike) -> dict[str, str]:
    """{topic: message type} for every topic in the bag."""
    with _open_reader(bag_path) as reader:
        return {connection.topic: connection.msgtype for connection in reader.connections}


def list_image_topics(bag_path: str | os.PathLike) -> dict[str, str]:
    """{topic: message type} for the bag's sensor_msgs/Image and CompressedImage topics."""
    return {topic: msgtype for topic, msgtype in list_topics(bag_path).items() if msgtype in IMAGE_TYPES}


def iter_image_messages(bag_path: str | os.PathLike, topic: str | None = None
                        ) -> Iterator[tuple[str, int, Any, str]]:
    """Yield (topic, timestamp_ns, message, message type) for image messages, in timestamp order.

    topic=None reads every Image and CompressedImage topic. Messages are rosbags objects, which
    icnet_ros.ros.image_conversion converts like rclpy ones.
    """
    store = humble_typestore()
    with _open_reader(bag_path) as reader:
        images = [c for c in reader.connections if c.msgtype in IMAGE_TYPES]
        selected = [c for c in images if topic is None or c.topic == topic]
        if not selected:
            raise BagError(_missing_topic_message(bag_path, topic, images, reader.connections))
        for connection, timestamp, raw in reader.messages(connections=selected):
            msg = store.deserialize_cdr(raw, connection.msgtype)
            yield connection.topic, timestamp, msg, connection.msgtype


def _missing_topic_message(bag_path, topic, images, connections) -> str:
    present = sorted({f"{c.topic} ({c.msgtype})" for c in images})
    if not present:
        everything = sorted({f"{c.topic} ({c.msgtype})" for c in connections}) or ["none"]
        return (f"{bag_path} holds no sensor_msgs/Image or CompressedImage topic; "
                f"topics: {', '.join(everything)}")
    if topic is not None and any(c.topic == topic for c in connections):
        kind = next(c.msgtype for c in connections if c.topic == topic)
        return f"topic {topic} in {bag_path} carries {kind}, not images; image topics: {', '.join(present)}"
    return f"topic {topic!r} is not in {bag_path}; image topics: {', '.join(present)}"
