"""The segmentation node's configuration: one typed dataclass that the ROS parameters mirror one to one.

config/segment.yaml holds every field under `/**: ros__parameters:` (the file `ros2 run` and launch
load); the node declares one ROS parameter per field, with the field's description, allowed values
and range, from parameter_specs(). Nothing here imports ROS, so the same validation runs in tests
and in the node, and its errors list the values that would be accepted.

Fields marked dynamic may change while the node runs (branch, overlay alpha, published outputs, their
JPEG quality and size, and the diagnostic thresholds); the others need a restart because they choose
the model, the device or the subscriptions.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from icnet_ros.config import ConfigError, config_from_dict, config_to_dict, read_yaml_mapping
from icnet_ros.model.preprocess import parse_input_size
from icnet_ros.paths import config_dir

NODE_NAME = "icnet_segmentation"
KEEP_RATES = (1.0, 0.5, 0.25)
DATASETS = ("cityscapes", "camvid", "cocostuff")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
OUTPUT_FLAGS = ("publish_labels", "publish_color", "publish_overlay")
# image_transport's default is 95; at 80 a 1024x2048 overlay encodes in 4 ms to 166 kB, not 7 ms
# to 384 kB (README: cheaper visual outputs)
JPEG_QUALITY = 80
MIN_VISUAL_SCALE = 0.05  # a 2048-pixel-wide camera still gives 102 pixels: smaller shows nothing


def _field(default: Any, description: str, *, dynamic: bool = False, choices: tuple | None = None,
           value_range: tuple[float, float] | None = None) -> Any:
    metadata = {"description": description, "dynamic": dynamic, "choices": choices, "range": value_range}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NodeConfig:
    # --- model -------------------------------------------------------------------------------------
    model: str = _field("", "Checkpoint file (.safetensors), or a bundled model's name (cityscapes, camvid, "
                        "camvid_sparse, demo). Empty: <model_dir>/icnet_<dataset>_keep<keep_rate>.safetensors, or at keep rate "
                        "0.25 the bundled real-street model of the dataset (cityscapes: 19 classes, camvid: 11).")
    model_dir: str = _field("", "Folder of checkpoints named icnet_<dataset>_keep<keep_rate>.safetensors, "
                            "searched when model is empty.")
    dataset: Literal["cityscapes", "camvid", "cocostuff"] = _field(
        "cityscapes", "Dataset whose class map (names, colors, ids) the model predicts.", choices=DATASETS)
    keep_rate: float = _field(0.25, "Compression level: the fraction of convolution kernels kept by pruning "
                              "(1.0 = the full network). Selects the checkpoint.", choices=KEEP_RATES)
    branch: Literal["sub124", "sub24", "sub4"] = _field(
        "sub124", "Cascade output to use: sub124 (most accurate), sub24, sub4 (fastest).", dynamic=True,
        choices=("sub124", "sub24", "sub4"))
    device: str = _field("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _field(
        "auto", "Forward-pass precision; auto is fp16 on CUDA and fp32 on CPU.",
        choices=("auto", "fp32", "fp16", "bf16"))
    high_res_regions: int = _field(
        0, "Spatial sparsity: 0 runs the network densely; k > 0 runs sub124's high-resolution path only in the k "
        "regions per frame where it helps most (a gated checkpoint's gate, else sub24's entropy), so the time per "
        "frame is fixed. It runs the network at the nearest multiple of 8 each way; torch backend.", dynamic=True,
        value_range=(0, 4096))
    cpu_threads: int = _field(0, "PyTorch CPU threads; 0 keeps PyTorch's default.", value_range=(0, 256))
    backend: Literal["auto", "torch", "tensorrt"] = _field(
        "auto", "Inference backend: torch (PyTorch, CUDA graphs), tensorrt (pip install icnet-ros[tensorrt]; "
        "the engine is built once per GPU and shape and cached on disk), auto (tensorrt where installed "
        "on CUDA, else torch).", choices=("auto", "torch", "tensorrt"))
    input_size: str = _field("checkpoint", "Size frames are resized to before the network (labels come back "
                             "at the frame's size): 'checkpoint' (the size the model was trained at), 'frame' "
                             "(each frame's own size) or 'HxW' (0 for one side keeps the aspect ratio).")
    warmup_height: int = _field(0, "Camera frame height to prepare at configure (kernel tuning, CUDA graphs), "
                                "so the first frame is as fast as the rest; 0: prepare on the first frame.",
                                value_range=(0, 16384))
    warmup_width: int = _field(0, "Camera frame width to prepare at configure; 0: prepare on the first frame.",
                               value_range=(0, 16384))
    autostart: bool = _field(True, "Configure and activate at start (a plain node). false: stay unconfigured "
                             "until a lifecycle manager (or the launch file) says configure and activate.")
    # --- input -------------------------------------------------------------------------------------
    image_topics: list[str] = _field(["image"], "Camera image topics. Relative names resolve in the node's "
                                     "namespace and follow remapping (-r image:=/camera/image_raw). Frames of "
                                     "one size from several cameras go through one batched engine call.")
    input_transport: Literal["raw", "compressed"] = _field(
        "raw", "raw: sensor_msgs/Image on each topic; compressed: sensor_msgs/CompressedImage on "
        "<topic>/compressed.", choices=("raw", "compressed"))
    input_qos_reliability: Literal["best_effort", "reliable"] = _field(
        "best_effort", "Input QoS reliability (sensor-data QoS is best_effort; a reliable subscriber does "
        "not match a best_effort camera).", choices=("best_effort", "reliable"))
    input_qos_depth: int = _field(1, "Input QoS history depth; only the newest frame is segmented.",
                                  value_range=(1, 100))
    # --- outputs -----------------------------------------------------------------------------------
    publish_labels: bool = _field(True, "Publish segmentation/labels (mono8 class ids; mono16 beyond 255).",
                                  dynamic=True)
    publish_color: bool = _field(True, "Publish segmentation/color (rgb8, the class map's colors) and "
                                 "color/compressed.", dynamic=True)
    publish_overlay: bool = _field(True, "Publish segmentation/overlay (colors blended over the camera "
                                   "image, in the input's encoding) and overlay/compressed.", dynamic=True)
    publish_regions: bool = _field(True, "Publish segmentation/regions (mono8, 255 where the high-resolution path "
                                   "ran) while high_res_regions > 0; for RViz.", dynamic=True)
    overlay_alpha: float = _field(0.5, "Opacity of the colors in the overlay: 0 = camera image only, "
                                  "1 = colors only.", dynamic=True, value_range=(0.0, 1.0))
    jpeg_quality: int = _field(JPEG_QUALITY, "JPEG quality of segmentation/color/compressed and "
                               "overlay/compressed (sensor_msgs/CompressedImage, named and formatted as "
                               "image_transport's compressed plugin does, so RViz and image_view show them). "
                               "Encoded only while someone subscribes to them.", dynamic=True, value_range=(1, 100))
    visual_scale: float = _field(1.0, "Size of color, overlay and their compressed forms relative to the camera "
                                 "frame (1 = full size; 0.5 = a quarter of the pixels to publish and encode). "
                                 "labels always stay full size. camera_info is relayed unchanged: it describes "
                                 "the full-size frame, so whoever projects through it onto a scaled output "
                                 "multiplies fx, fy, cx and cy by visual_scale.", dynamic=True,
                                 value_range=(MIN_VISUAL_SCALE, 1.0))
    output_qos_reliability: Literal["best_effort", "reliable"] = _field(
        "reliable", "Output QoS reliability (reliable outputs reach reliable and best_effort subscribers).",
        choices=("best_effort", "reliable"))
    output_qos_depth: int = _field(5, "Output QoS history depth.", value_range=(1, 100))
    # --- diagnostics -------------------------------------------------------------------------------
    expected_rate_hz: float = _field(0.0, "Segmented frames per second per camera below which diagnostics "
                                     "WARN (with rate_tolerance); 0 disables the rate check.", dynamic=True,
                                     value_range=(0.0, 1000.0))
    rate_tolerance: float = _field(0.2, "Fraction below expected_rate_hz still reported OK.", dynamic=True,
                                   value_range=(0.0, 1.0))
    max_latency_ms: float = _field(0.0, "Latency from the input stamp to publish above which diagnostics "
                                   "WARN; 0 disables the check.", dynamic=True, value_range=(0.0, 60000.0))
    stall_timeout_s: float = _field(2.0, "Seconds without an input frame after which a camera is reported "
                                    "as stalled (ERROR).", dynamic=True, value_range=(0.1, 3600.0))
    clock_mismatch_s: float = _field(10.0, "An input stamp further than this from the node's clock is no "
                                     "latency but another clock (a recording replayed without use_sim_time): "
                                     "diagnostics say so and latency_ms is NaN.", dynamic=True,
                                     value_range=(0.001, 1e9))
    diagnostics_window_s: float = _field(5.0, "Seconds of history behind the reported rate and latency.",
                                         dynamic=True, value_range=(0.5, 600.0))
    log_throttle_s: float = _field(5.0, "Minimum seconds between repeated warnings of one kind (malformed "
                                   "frames, engine failures).", dynamic=True, value_range=(0.0, 3600.0))

    def __post_init__(self) -> None:
        for spec in parameter_specs():
            value = getattr(self, spec.name)
            if spec.choices is not None and value not in spec.choices:
                raise ConfigError(f"parameter {spec.name}: {value!r} is not one of the allowed values "
                                  f"{list(spec.choices)}")
            if spec.value_range is not None and not spec.value_range[0] <= value <= spec.value_range[1]:
                low, high = spec.value_range
                raise ConfigError(f"parameter {spec.name}: {value!r} is outside the allowed range [{low}, {high}]")
        if not DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"parameter device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        try:
            parse_input_size(self.input_size, None)
        except ValueError as error:
            raise ConfigError(f"parameter input_size: {error}") from None
        if bool(self.warmup_height) != bool(self.warmup_width):
            raise ConfigError(f"parameters warmup_height and warmup_width: give both or neither (got "
                              f"{self.warmup_height}x{self.warmup_width})")
        if not any(getattr(self, name) for name in OUTPUT_FLAGS):
            raise ConfigError(f"at least one of {', '.join(OUTPUT_FLAGS)} must be true: the node has nothing "
                              "to publish otherwise")
        from icnet_ros.ros.topics import TopicError, check_input_topics

        try:
            check_input_topics(self.image_topics)
        except TopicError as error:
            raise ConfigError(f"parameter image_topics: {error}") from None


@dataclass(frozen=True)
class ParameterSpec:
    """What the node needs to declare one ROS parameter."""

    name: str
    default: Any
    kind: str  # "string", "double", "integer", "bool", "string_array"
    description: str
    dynamic: bool
    choices: tuple | None
    value_range: tuple[float, float] | None

    @property
    def constraints(self) -> str:
        """Human-readable allowed values, for ParameterDescriptor.additional_constraints."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.name == "device":
            return "auto, cpu, cuda or cuda:N"
        if self.value_range is not None:
            return f"from {self.value_range[0]} to {self.value_range[1]}"
        return ""


_KINDS = {str: "string", float: "double", int: "integer", bool: "bool"}


def _kind(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return _KINDS[type(get_args(hint)[0])]
    if get_origin(hint) is list:
        return "string_array"
    return _KINDS[hint]


def parameter_specs() -> list[ParameterSpec]:
    """One ParameterSpec per NodeConfig field, in declaration order."""
    hints = get_type_hints(NodeConfig)
    specs = []
    for f in dataclasses.fields(NodeConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        specs.append(ParameterSpec(f.name, default, _kind(hints[f.name]), f.metadata["description"],
                                   f.metadata["dynamic"], f.metadata["choices"], f.metadata["range"]))
    return specs



def dynamic_parameters() -> frozenset[str]:
    return frozenset(spec.name for spec in parameter_specs() if spec.dynamic)


def default_params_file() -> Path:
    return config_dir() / "segment.yaml"


def read_ros_parameters(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The `ros__parameters` mapping a ROS parameter file gives `node_name` (`/**` and the node's own)."""
    data = read_yaml_mapping(path, "`<node name or /**>: ros__parameters: {...}`")
    merged: dict[str, Any] = {}
    for key in ("/**", node_name, f"/{node_name}"):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise ConfigError(f"{path}: section {key!r} must hold a `ros__parameters:` mapping")
        merged.update(section["ros__parameters"])
    if not merged:
        raise ConfigError(f"{path}: no `/**` or `{node_name}` section with ros__parameters")
    return merged


# Parameters every rclpy node has (not ours): a parameter file may set them beside the node's own.
RCLPY_PARAMETERS = ("use_sim_time", "qos_overrides", "start_type_description_service")


def load_node_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """NodeConfig from a ROS parameter file (default config/segment.yaml), then `overrides`.

    rclpy's own parameters (RCLPY_PARAMETERS) are skipped; any other unknown key is an error.
    """
    path = default_params_file() if path is None else Path(path)
    values = read_ros_parameters(path)
    values.update(overrides or {})
    values = {name: value for name, value in values.items() if name not in RCLPY_PARAMETERS}
    return node_config_from_dict(values, str(path))


def node_config_from_dict(values: dict[str, Any], source: str = "parameters") -> NodeConfig:
    """NodeConfig from plain values, with ROS's integer-for-double leniency (keep_rate: 1 -> 1.0)."""
    hints = get_type_hints(NodeConfig)
    fixed = {}
    for name, value in values.items():
        is_double = hints.get(name) is float
        fixed[name] = float(value) if is_double and isinstance(value, int) and not isinstance(value, bool) else value
    return config_from_dict(NodeConfig, fixed, source)


def with_changes(config: NodeConfig, changes: dict[str, Any]) -> NodeConfig:
    """A copy of `config` with `changes` applied and validated; ConfigError names a bad value."""
    merged = config_to_dict(config)
    merged.update(changes)
    return node_config_from_dict(merged, "parameter change")


def parameters_markdown() -> str:
    """The README's parameter table, generated from NodeConfig (test_readme.py keeps them equal)."""
    rows = ["| parameter | type | default | runtime | allowed | what it does |", "|---|---|---|---|---|---|"]
    for spec in parameter_specs():
        default = '`""`' if spec.default == "" else f"`{spec.default}`"
        rows.append(f"| `{spec.name}` | {spec.kind} | {default} | {'yes' if spec.dynamic else 'no'} | "
                    f"{spec.constraints} | {_markdown_text(spec.description)} |")
    return "\n".join(rows)


def _markdown_text(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


if __name__ == "__main__":
    print(parameters_markdown())

