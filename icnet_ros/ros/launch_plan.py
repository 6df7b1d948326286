"""What `ros2 launch icnet_ros segment.launch.py` starts, decided without ROS (and so tested here).

launch/segment.launch.py declares LAUNCH_ARGUMENTS, hands the values to plan_launch() and turns
the LaunchPlan into launch actions; every decision and every check lives here, and all of them run
before any process starts, so a launch that cannot complete starts nothing.

- Arguments that mirror node parameters are empty unless the user gives them, and only what the
  user gives overrides the parameter file (config/segment.yaml or params_file:=).
- image_topic:=/cam/image_raw puts the node in the camera's namespace (/cam) and remaps its
  `image` there, so outputs land beside the camera (/cam/segmentation/...), as before.
- RViz is optional: rviz:=auto (the default) opens it for demo:=true where it is installed and
  runs headless elsewhere; rviz:=true without RViz is an error before anything starts.
- dds_config:=large_images adds the package's DDS settings for multi-megabyte images.
- A bag played by the launch (bag:= or demo:=true) sets the time: it is played with --clock and
  the node and RViz follow it (use_sim_time true), unless use_sim_time:=false is given or the
  parameter file sets use_sim_time. Stamps recorded days ago then read as fresh, so latency is
  measured and /diagnostics sees no clock mismatch.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from icnet_ros.config import ConfigError
from icnet_ros.model.registry import DEMO
from icnet_ros.paths import config_dir
from icnet_ros.ros.node_config import DATASETS, KEEP_RATES, NodeConfig, load_node_config, read_ros_parameters
from icnet_ros.ros.topics import output_topics

RVIZ_TEMPLATE = "segment.rviz"
TEMPLATE_CAMERA_TOPIC = "/camera/image_raw"  # the topics config/segment.rviz is written for
TEMPLATE_OUTPUT_NAMESPACE = "/camera"
BAG_CLOCK_HZ = 40
DEFAULT_IMAGE_NAME = "image"  # the node's own (relative) camera topic, which image_topic:= remaps
DDS_CONFIGS = {"large_images": ("cyclonedds_large_images.xml", "fastdds_large_images.xml")}
LARGE_IMAGE_SOCKET_BUFFER = 16 * 1024 * 1024  # what the large_images configurations ask the kernel for
RMEM_MAX = Path("/proc/sys/net/core/rmem_max")


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str
    choices: tuple[str, ...] | None = None
    parameter: str | None = None  # the node parameter it overrides, when given


FROM_FILE = "Empty: the parameter file's value."
LAUNCH_ARGUMENTS = (
    LaunchArgument("dataset", "", f"Class map the model predicts. {FROM_FILE}", DATASETS, "dataset"),
    LaunchArgument("compression", "", "Kernel keeping rate of the model (1.0 = uncompressed); selects the "
                   f"checkpoint icnet_<dataset>_keep<rate>.safetensors in model_dir. {FROM_FILE}",
                   tuple(f"{rate:g}" if rate != 1.0 else "1.0" for rate in KEEP_RATES), "keep_rate"),
    LaunchArgument("branch", "", f"Cascade output: sub124 (accurate) .. sub4 (fast). {FROM_FILE}",
                   ("sub124", "sub24", "sub4"), "branch"),
    LaunchArgument("model", "", "Checkpoint file or bundled model name (cityscapes, camvid, camvid_sparse, demo); empty selects "
                   "one by dataset and compression (at 0.25 the bundled real-street models; demo:=true: the "
                   "synthetic demo weights, which know its drive).", None, "model"),
    LaunchArgument("model_dir", "", f"Folder of icnet_<dataset>_keep<rate>.safetensors checkpoints. {FROM_FILE}",
                   None, "model_dir"),
    LaunchArgument("image_topic", "", "Camera image topic, e.g. /camera/image_raw: the node runs in its namespace "
                   "with `image` remapped to it, so outputs go to <its namespace>/segmentation/. Empty: the "
                   "parameter file's image_topics, in the node's namespace."),
    LaunchArgument("namespace", "", "Node namespace (default: the image_topic's namespace, else the root)."),
    LaunchArgument("input_transport", "", f"raw (sensor_msgs/Image) or compressed (<image>/compressed). {FROM_FILE}",
                   ("raw", "compressed"), "input_transport"),
    LaunchArgument("device", "", f"auto, cpu, cuda or cuda:N. {FROM_FILE}", None, "device"),
    LaunchArgument("precision", "", f"auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16. {FROM_FILE}",
                   ("auto", "fp32", "fp16", "bf16"), "precision"),
    LaunchArgument("params_file", "", "Node parameter file (default: the package's config/segment.yaml); only the "
                   "launch arguments given override it."),
    LaunchArgument("rviz", "auto", "RViz with the package's view of the camera, overlay and colors: true, false, "
                   "or auto (for demo:=true where RViz is installed).", ("auto", "true", "false")),
    LaunchArgument("bag", "", "A rosbag2 to play in a loop into the node (ros2 bag play --loop); without "
                   "image_topic the node listens to the bag's one camera image topic."),
    LaunchArgument("demo", "false", "Play the embedded synthetic drive as a bag in a loop (built on first use, "
                   "about 10 s), with RViz where it is installed.", ("true", "false")),
    LaunchArgument("use_sim_time", "", "Follow /clock (true/false); a bag is played with --clock when true. "
                   "Empty: the parameter file's value, else true while the launch plays a bag (bag:=, "
                   "demo:=true), so latency is measured against the recording's time.", ("true", "false"),
                   "use_sim_time"),
    LaunchArgument("dds_config", "", "large_images: the package's DDS settings for multi-megabyte images (Cyclone "
                   "DDS and Fast DDS; see README). Empty: the environment's.", tuple(DDS_CONFIGS)),
    LaunchArgument("autostart", "true", "Bring the lifecycle node to active (configure, then activate); false "
                   "leaves it unconfigured for a lifecycle manager.", ("true", "false")),
)
ARGUMENTS = {argument.name: argument for argument in LAUNCH_ARGUMENTS}


@dataclass
class LaunchPlan:
    params_file: Path
    node_parameters: dict[str, Any]  # only what the user gave, plus autostart false: launch drives the lifecycle
    namespace: str
    remappings: list[tuple[str, str]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)  # for the node and the bag player
    autostart: bool = True
    use_sim_time: bool = False  # the launch argument, else the parameter file's value, else whether a bag plays
    rviz_config: Path | None = None
    bag_command: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said by the launch file before it starts anything


def parse_bool(name: str, text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise ConfigError(f"launch argument {name}:={text!r} must be true or false")


def ros_package_available(name: str) -> bool:
    """True when the ROS package `name` is installed in the sourced workspaces (ament index)."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    except ImportError:
        return False
    try:
        get_package_prefix(name)
    except PackageNotFoundError:
        return False
    return True


def plan_launch(values: dict[str, str], rviz_dir: Path | None = None,
                package_available: Callable[[str], bool] = ros_package_available,
                environ: dict[str, str] | None = None) -> LaunchPlan:
    """Everything the launch starts, from the launch arguments' strings; ConfigError before anything starts."""
    values = _checked_values(values)
    environ = dict(os.environ if environ is None else environ)
    params_file = Path(values["params_file"]) if values["params_file"] else config_dir() / "segment.yaml"
    demo = parse_bool("demo", values["demo"])
    image_topic = values["image_topic"] or (_demo_topic() if demo else "")
    if not image_topic and values["bag"] and _subscribes_to_default(params_file):
        image_topic = bag_image_topic(values["bag"])  # the node listens where the bag plays
    parameters = _given_parameters(values)
    if demo and _demo_weights_fit(parameters, params_file):
        parameters["model"] = DEMO.name  # the synthetic drive is what the demo weights know
    parameters["autostart"] = False  # the launch file drives configure and activate (or a lifecycle manager)
    _check_image_topic(params_file, image_topic)
    load_node_config(params_file, parameters)  # fails here, naming the bad value, before anything starts
    namespace = values["namespace"] or (posixpath.dirname(image_topic) if image_topic.startswith("/") else "")
    use_sim_time = _chosen_use_sim_time(parameters, params_file)
    if use_sim_time is None:  # nobody said: a bag the launch plays sets the time, else the wall clock does
        use_sim_time = bool(values["bag"]) or demo
        if use_sim_time:
            parameters["use_sim_time"] = True  # the file does not set it, so the node is told here
    plan = LaunchPlan(params_file, parameters, namespace, autostart=parse_bool("autostart", values["autostart"]),
                      use_sim_time=use_sim_time)
    if image_topic:
        plan.remappings.append((DEFAULT_IMAGE_NAME, image_topic))
    _plan_dds(plan, values["dds_config"], environ)
    bag = values["bag"] or (str(_demo_bag()) if demo else "")
    if bag:
        _require_package("ros2bag", "bag:= / demo:=true (ros2 bag play)", package_available)
        plan.bag_command = bag_play_command(bag, plan.use_sim_time)
    _plan_rviz(plan, values["rviz"], demo, image_topic, rviz_dir, package_available)
    return plan


def _chosen_use_sim_time(parameters: dict[str, Any], params_file: Path) -> bool | None:
    """use_sim_time:= if given, else the parameter file's; None when neither says."""
    if "use_sim_time" in parameters:
        return bool(parameters["use_sim_time"])
    from_file = read_ros_parameters(params_file)
    if "use_sim_time" in from_file:
        return parse_bool(f"use_sim_time in {params_file}", from_file["use_sim_time"])
    return None


def _demo_weights_fit(parameters: dict[str, Any], params_file: Path) -> bool:
    """demo:=true runs the demo weights unless a model, or another class map, was asked for."""
    from_file = read_ros_parameters(params_file)
    if parameters.get("model") or from_file.get("model"):
        return False
    dataset = parameters.get("dataset", from_file.get("dataset", NodeConfig().dataset))
    keep_rate = float(parameters.get("keep_rate", from_file.get("keep_rate", NodeConfig().keep_rate)))
    return (dataset, keep_rate) == (DEMO.dataset, DEMO.keep_rate)


def _checked_values(values: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(values) - set(ARGUMENTS))
    if unknown:
        raise ConfigError(f"unknown launch argument(s) {unknown}; arguments: {sorted(ARGUMENTS)}")
    values = {name: str(values.get(name, argument.default)).strip() for name, argument in ARGUMENTS.items()}
    for name, argument in ARGUMENTS.items():
        given = values[name]
        if argument.choices and given != "" and given not in argument.choices:
            raise ConfigError(f"launch argument {name}:={given!r} is not one of {list(argument.choices)}")
    return values


def _given_parameters(values: dict[str, str]) -> dict[str, Any]:
    """Node parameters from the launch arguments the user gave (never from their empty defaults)."""
    parameters: dict[str, Any] = {}
    for name, argument in ARGUMENTS.items():
        if argument.parameter is None or values[name] == "":
            continue
        value: Any = values[name]
        if argument.parameter == "keep_rate":
            value = float(value)
        elif argument.parameter == "use_sim_time":
            value = parse_bool(name, value)
        parameters[argument.parameter] = value
    return parameters


def _check_image_topic(params_file: Path, image_topic: str) -> None:
    """image_topic:= remaps the node's `image`: the parameter file must subscribe to just that."""
    if not image_topic:
        return
    topics = read_ros_parameters(params_file).get("image_topics", [DEFAULT_IMAGE_NAME])
    if list(topics) != [DEFAULT_IMAGE_NAME]:
        raise ConfigError(f"image_topic:={image_topic} remaps the node's {DEFAULT_IMAGE_NAME!r} topic, but "
                          f"{params_file} subscribes to {list(topics)}; remap those in your own launch file, "
                          "or leave image_topic empty")


def _require_package(name: str, needed_for: str, package_available: Callable[[str], bool]) -> None:
    if not package_available(name):
        raise ConfigError(f"{needed_for} needs the ROS package {name}, which is not installed here; install "
                          f"ros-$ROS_DISTRO-{name.replace('_', '-')} or leave that argument out")


def _plan_rviz(plan: LaunchPlan, rviz: str, demo: bool, image_topic: str, rviz_dir: Path | None,
               package_available: Callable[[str], bool]) -> None:
    wanted = rviz == "true" or (rviz == "auto" and demo)
    if not wanted:
        return
    if not package_available("rviz2"):
        if rviz == "true":
            _require_package("rviz2", "rviz:=true", package_available)
        plan.notes.append("RViz (rviz2) is not installed: running headless; the outputs are on "
                          f"{_resolved(plan.namespace, output_topics(DEFAULT_IMAGE_NAME)['overlay'])} and its siblings")
        return
    camera = image_topic or _resolved(plan.namespace, DEFAULT_IMAGE_NAME)
    plan.rviz_config = rviz_config_for(camera, plan.namespace, rviz_dir)


def _plan_dds(plan: LaunchPlan, dds_config: str, environ: dict[str, str]) -> None:
    """Environment that adds the package's DDS settings to the node's and the bag player's."""
    if not dds_config:
        return
    cyclone, fastdds = (config_dir() / "dds" / name for name in DDS_CONFIGS[dds_config])
    existing = environ.get("CYCLONEDDS_URI", "").strip()
    # Cyclone merges a comma-separated list: the user's settings (e.g. loopback only) stay in force.
    plan.environment["CYCLONEDDS_URI"] = ",".join(filter(None, [existing, f"file://{cyclone}"]))
    if environ.get("FASTRTPS_DEFAULT_PROFILES_FILE"):
        plan.notes.append(f"FASTRTPS_DEFAULT_PROFILES_FILE is set: keeping it (Fast DDS reads one profiles file; "
                          f"merge {fastdds} into it for large images)")
    else:
        plan.environment["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(fastdds)
    limit = kernel_receive_buffer_limit()
    if limit is not None and limit < LARGE_IMAGE_SOCKET_BUFFER:
        plan.notes.append(f"net.core.rmem_max is {limit} bytes, under the {LARGE_IMAGE_SOCKET_BUFFER} the DDS "
                          "settings ask for: large frames will still be lost; raise it with "
                          "`sudo sysctl -w net.core.rmem_max=33554432` (README: large images over DDS)")


def kernel_receive_buffer_limit() -> int | None:
    """net.core.rmem_max, the cap on every socket's receive buffer (None where it cannot be read)."""
    try:
        return int(RMEM_MAX.read_text().strip())
    except (OSError, ValueError):
        return None


def _resolved(namespace: str, name: str) -> str:
    return name if name.startswith("/") else posixpath.join("/" + namespace.strip("/"), name)


def _demo_topic() -> str:
    from icnet_ros.demo import DEMO_TOPIC

    return DEMO_TOPIC


def _demo_bag() -> Path:
    from icnet_ros.demo import ensure_demo_bag

    return ensure_demo_bag()


IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def bag_image_topic(bag: str) -> str:
    """The one camera image topic a bag holds (from its metadata.yaml), for bag:= without image_topic:=."""
    metadata = Path(bag).expanduser() / "metadata.yaml"
    if not metadata.is_file():
        raise ConfigError(f"launch argument bag:={bag!r} is not a rosbag2 (a folder holding metadata.yaml)")
    info = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]
    topics = {entry["topic_metadata"]["name"]: entry["topic_metadata"]["type"]
              for entry in info.get("topics_with_message_count") or []}
    images = sorted(name for name, kind in topics.items() if kind == IMAGE_TYPES[0])
    if len(images) == 1:
        return images[0]
    compressed = sorted(name for name, kind in topics.items() if kind == IMAGE_TYPES[1])
    if not images and len(compressed) == 1:
        raise ConfigError(f"bag:={bag} holds the compressed camera topic {compressed[0]}: add "
                          f"image_topic:={compressed[0].removesuffix('/compressed')} input_transport:=compressed")
    found = images or compressed
    if not found:
        raise ConfigError(f"bag:={bag} holds no sensor_msgs Image topic (topics: {sorted(topics)})")
    raise ConfigError(f"bag:={bag} holds {len(found)} camera image topics {found}: say which one with image_topic:=")


def _subscribes_to_default(params_file: Path) -> bool:
    return read_ros_parameters(params_file).get("image_topics", [DEFAULT_IMAGE_NAME]) == [DEFAULT_IMAGE_NAME]


def bag_play_command(bag: str, use_sim_time: bool) -> list[str]:
    """`ros2 bag play` in a loop; with --clock when the nodes follow the bag's time."""
    path = Path(bag).expanduser()
    if not (path / "metadata.yaml").is_file() and not path.is_file():
        raise ConfigError(f"launch argument bag:={bag!r} is not a rosbag2 (a folder holding metadata.yaml)")
    command = ["ros2", "bag", "play", str(path), "--loop"]
    if use_sim_time:
        command += ["--clock", str(BAG_CLOCK_HZ)]
    return command


def rviz_config_for(camera_topic: str, namespace: str = "", out_dir: Path | None = None) -> Path:
    """config/segment.rviz pointed at `camera_topic` and the node's outputs in `namespace`."""
    template = config_dir() / RVIZ_TEMPLATE
    outputs_ns = _resolved(namespace, "").rstrip("/")
    if camera_topic == TEMPLATE_CAMERA_TOPIC and outputs_ns == TEMPLATE_OUTPUT_NAMESPACE:
        return template
    text = template.read_text()
    for name in ("overlay", "color", "labels"):
        text = text.replace(f"{TEMPLATE_OUTPUT_NAMESPACE}/segmentation/{name}", f"{outputs_ns}/segmentation/{name}")
    text = text.replace(TEMPLATE_CAMERA_TOPIC, camera_topic)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="icnet_ros_rviz_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RVIZ_TEMPLATE
    path.write_text(text)
    return path


def arguments_markdown() -> str:
    """The README's launch-argument table, generated from LAUNCH_ARGUMENTS (test_readme.py keeps them equal)."""
    rows = ["| argument | default | choices | what it does |", "|---|---|---|---|"]
    for argument in LAUNCH_ARGUMENTS:
        default = f"`{argument.default}`" if argument.default else "`\"\"`"
        choices = ", ".join(argument.choices or ())
        description = argument.description.replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{argument.name}` | {default} | {choices} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(arguments_markdown())

