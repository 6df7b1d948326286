"""The package's message definitions (msg/*.msg) for the `rosbags` library: no ROS installation needed.

The colcon build generates the rclpy classes of these messages (icnet_ros.msg); tools and tests
that run without ROS use the rosbags classes registered here instead, which serialize to the same
CDR bytes.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from icnet_ros.paths import share_dir

PACKAGE = "icnet_ros"


def message_definitions() -> dict[str, str]:
    """{"icnet_ros/msg/<Name>": definition text} for every file in msg/."""
    folder = share_dir() / "msg"
    return {f"{PACKAGE}/msg/{path.stem}": path.read_text() for path in sorted(folder.glob("*.msg"))}


@lru_cache(maxsize=1)
def package_typestore() -> Any:
    """The rosbags ROS 2 Humble type store with this package's messages registered."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    types: dict[str, Any] = {}
    for msgtype, text in message_definitions().items():
        types.update(get_types_from_msg(text, msgtype))
    store.register(types)
    return store


def rosbags_message_types():
    """publisher.MessageTypes made of rosbags classes (for tools and tests without rclpy)."""
    from icnet_ros.ros.publisher import MessageTypes

    store = package_typestore()
    return MessageTypes(image=store.types["sensor_msgs/msg/Image"],
                        timing=store.types[f"{PACKAGE}/msg/SegmentationTiming"],
                        compressed=store.types["sensor_msgs/msg/CompressedImage"])
