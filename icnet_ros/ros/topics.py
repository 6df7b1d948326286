"""Topic names of the segmentation outputs, shared by the node and the offline tool (no ROS imports).

Outputs live beside the camera they describe, so several cameras never collide and a recording of
the outputs lines up with the input:

    image             ->  segmentation/{labels,color,overlay,camera_info,timing,label_info}
                          segmentation/{color,overlay}/compressed  (JPEG, as image_transport names them)
    front/image_raw   ->  front/segmentation/...
    /cam/image_raw    ->  /cam/segmentation/...

The node's names are relative (`image` by default), so they resolve in the node's namespace and
follow remapping like any ROS node's (`__ns:=/robot1`, `-r image:=/camera/image_raw`); the
camera's CameraInfo is read from `camera_info` beside the image topic, as image_transport does.
"""
from __future__ import annotations

import posixpath

COMPRESSED_SUFFIX = "/compressed"
VISUAL_OUTPUTS = ("color", "overlay")  # images for people: also published compressed, and at visual_scale
OUTPUT_NAMES = ("labels", "color", "color" + COMPRESSED_SUFFIX, "overlay", "overlay" + COMPRESSED_SUFFIX,
                "regions", "camera_info", "timing", "label_info")
TRANSPORTS = ("raw", "compressed")


class TopicError(ValueError):
    """Input topics that cannot be used together (empty, repeated, or whose outputs would collide)."""


def base_topic(topic: str) -> str:
    """The camera's image topic without an image_transport suffix (/cam/image_raw/compressed -> /cam/image_raw)."""
    topic = topic.rstrip("/") or topic
    return topic.removesuffix(COMPRESSED_SUFFIX)


def output_namespace(input_topic: str | None) -> str:
    """`<camera namespace>/segmentation` for `<camera namespace>/<image topic>`."""
    topic = base_topic(input_topic or "")
    namespace = posixpath.dirname(topic)
    if not namespace:  # a relative topic name without a namespace, e.g. "image"
        return "segmentation"
    return posixpath.join(namespace, "segmentation")


def output_topics(input_topic: str | None) -> dict[str, str]:
    """{output name: topic} for one camera (see the module docstring)."""
    namespace = output_namespace(input_topic)
    return {name: posixpath.join(namespace, name) for name in OUTPUT_NAMES}


def compressed_output(output: str) -> str:
    """The name of an output's CompressedImage form: color -> color/compressed (image_transport's topic)."""
    return output + COMPRESSED_SUFFIX


def camera_info_topic(input_topic: str) -> str:
    """The CameraInfo topic beside an image topic (image_transport's convention)."""
    namespace = posixpath.dirname(base_topic(input_topic))
    return posixpath.join(namespace, "camera_info") if namespace else "camera_info"


def subscription_topic(input_topic: str, transport: str) -> str:
    """The topic to subscribe to: the image topic itself, or its `/compressed` image_transport topic."""
    if transport not in TRANSPORTS:
        raise TopicError(f"input transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    base = base_topic(input_topic)
    return base + COMPRESSED_SUFFIX if transport == "compressed" else base


def check_input_topics(topics: list[str]) -> list[str]:
    """The topics, after checking that each camera gets outputs of its own."""
    if not topics:
        raise TopicError("image_topics is empty; give at least one camera image topic, e.g. ['image'] "
                         "(remapped with -r image:=/camera/image_raw) or ['front/image_raw', 'rear/image_raw']")
    blank = [t for t in topics if not str(t).strip()]
    if blank:
        raise TopicError(f"image_topics holds an empty topic name: {topics}")
    seen: dict[str, str] = {}
    for topic in topics:
        namespace = output_namespace(topic)
        if namespace in seen:
            raise TopicError(
                f"image topics {seen[namespace]!r} and {topic!r} would both publish under {namespace!r}; "
                "each camera needs its own namespace (e.g. /front/image_raw and /rear/image_raw)"
            )
        seen[namespace] = topic
    return list(topics)
