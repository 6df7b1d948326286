"""What `ros2 launch icnet_ros segment.launch.py` starts, decided without ROS (and so tested here).

launch/segment.launch.py declares LAUNCH_ARGUMENTS, hands their values to plan_launch() and turns
the LaunchPlan into launch actions; every decision and every check lives here. Invalid values fail
at launch time with the allowed values, before any process starts.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icnet_ros.config import ConfigError
from icnet_ros.paths import config_dir
from icnet_ros.ros.node_config import DATASETS, KEEP_RATES, load_node_config
from icnet_ros.ros.topics import output_topics, subscription_topic

RVIZ_TEMPLATE = "segment.rviz"
TEMPLATE_IMAGE_TOPIC = "/camera/image_raw"  # the topics config/segment.rviz is written for
BAG_CLOCK_HZ = 40


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str
    choices: tuple[str, ...] | None = None


LAUNCH_ARGUMENTS = (
    LaunchArgument("dataset", "cityscapes", "Class map the model predicts.", DATASETS),
    LaunchArgument("compression", "0.25", "Kernel keeping rate of the model (1.0 = uncompressed); selects the "
                   "checkpoint icnet_<dataset>_keep<rate>.safetensors in model_dir.",
                   tuple(f"{rate:g}" if rate != 1.0 else "1.0" for rate in KEEP_RATES)),
    LaunchArgument("branch", "sub124", "Cascade output: sub124 (accurate) .. sub4 (fast).", ("sub124", "sub24", "sub4")),
    LaunchArgument("model", "", "Checkpoint file; empty selects one by dataset and compression (the bundled "
                   "demo weights for cityscapes at 0.25)."),
    LaunchArgument("model_dir", "", "Folder of icnet_<dataset>_keep<rate>.safetensors checkpoints."),
    LaunchArgument("image_topic", "/camera/image_raw", "Camera image topic; outputs go to <its namespace>/segmentation/."),
    LaunchArgument("input_transport", "raw", "raw (sensor_msgs/Image) or compressed (<image_topic>/compressed).",
                   ("raw", "compressed")),
    LaunchArgument("device", "auto", "auto, cpu, cuda or cuda:N."),
    LaunchArgument("precision", "auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.",
                   ("auto", "fp32", "fp16", "bf16")),
    LaunchArgument("params_file", "", "Node parameter file (default: the package's config/segment.yaml); launch "
                   "arguments override it."),
    LaunchArgument("rviz", "false", "Start RViz with the package's view of the camera, overlay and colors.",
                   ("true", "false")),
    LaunchArgument("bag", "", "A rosbag2 to play in a loop into the node (ros2 bag play --loop)."),
    LaunchArgument("demo", "false", "Play the embedded synthetic drive as a bag in a loop and open RViz "
                   "(built on first use, about 10 s).", ("true", "false")),
    LaunchArgument("use_sim_time", "false", "Use /clock; with a bag, the bag is played with --clock.",
                   ("true", "false")),
)


@dataclass
class LaunchPlan:
    params_file: Path
    node_parameters: dict[str, Any]
    image_topic: str
    rviz_config: Path | None = None
    bag_command: list[str] = field(default_factory=list)
    use_sim_time: bool = False


def parse_bool(name: str, text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise ConfigError(f"launch argument {name}:={text!r} must be true or false")


def plan_launch(values: dict[str, str], rviz_dir: Path | None = None) -> LaunchPlan:
    """The node's parameters, the bag to play and the RViz view, from the launch arguments' strings."""
    known = {argument.name for argument in LAUNCH_ARGUMENTS}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown launch argument(s) {unknown}; arguments: {sorted(known)}")
    values = {argument.name: values.get(argument.name, argument.default) for argument in LAUNCH_ARGUMENTS}
    for argument in LAUNCH_ARGUMENTS:
        if argument.choices and values[argument.name] not in argument.choices:
            raise ConfigError(f"launch argument {argument.name}:={values[argument.name]!r} is not one of "
                              f"{list(argument.choices)}")
    demo = parse_bool("demo", values["demo"])
    use_sim_time = parse_bool("use_sim_time", values["use_sim_time"])
    params_file = Path(values["params_file"]) if values["params_file"] else config_dir() / "segment.yaml"
    overrides = _node_overrides(values)
    load_node_config(params_file, overrides)  # fails here, naming the bad value, before anything starts
    plan = LaunchPlan(params_file, {**overrides, "use_sim_time": use_sim_time}, values["image_topic"],
                      use_sim_time=use_sim_time)
    bag = values["bag"]
    if demo and not bag:
        from icnet_ros.demo import ensure_demo_bag

        bag = str(ensure_demo_bag())
    if bag:
        plan.bag_command = bag_play_command(bag, use_sim_time)
    if parse_bool("rviz", values["rviz"]) or demo:
        plan.rviz_config = rviz_config_for(values["image_topic"], rviz_dir)
    return plan


def _node_overrides(values: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "dataset": values["dataset"],
        "keep_rate": float(values["compression"]),
        "branch": values["branch"],
        "device": values["device"],
        "precision": values["precision"],
        "image_topics": [values["image_topic"]],
        "input_transport": values["input_transport"],
    }
    for name in ("model", "model_dir"):
        if values[name]:
            overrides[name] = values[name]
    return overrides


def bag_play_command(bag: str, use_sim_time: bool) -> list[str]:
    """`ros2 bag play` in a loop; with --clock when the nodes follow the bag's time."""
    path = Path(bag).expanduser()
    if not (path / "metadata.yaml").is_file() and not path.is_file():
        raise ConfigError(f"launch argument bag:={bag!r} is not a rosbag2 (a folder holding metadata.yaml)")
    command = ["ros2", "bag", "play", str(path), "--loop"]
    if use_sim_time:
        command += ["--clock", str(BAG_CLOCK_HZ)]
    return command


def rviz_config_for(image_topic: str, out_dir: Path | None = None) -> Path:
    """config/segment.rviz with its topics pointed at `image_topic`'s input and outputs."""
    template = (config_dir() / RVIZ_TEMPLATE).read_text()
    if image_topic == TEMPLATE_IMAGE_TOPIC:
        return config_dir() / RVIZ_TEMPLATE
    mine, theirs = output_topics(image_topic), output_topics(TEMPLATE_IMAGE_TOPIC)
    text = template
    for name in ("overlay", "color", "labels"):
        text = text.replace(theirs[name], mine[name])
    text = text.replace(TEMPLATE_IMAGE_TOPIC, subscription_topic(image_topic, "raw"))
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="icnet_ros_rviz_"))
    path = out_dir / RVIZ_TEMPLATE
    path.write_text(text)
    return path
