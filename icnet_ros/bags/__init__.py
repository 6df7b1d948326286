"""rosbag2 tools built on the `rosbags` library (no ROS installation needed): bag I/O and icnet-make-bag."""
from icnet_ros.bags.io import (
    BagError,
    BagWriter,
    camera_info_message,
    iter_image_messages,
    list_image_topics,
    list_topics,
)

__all__ = [
    "BagError",
    "BagWriter",
    "camera_info_message",
    "iter_image_messages",
    "list_image_topics",
    "list_topics",
]
