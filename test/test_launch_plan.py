"""What segment.launch.py starts, decided by icnet_ros.ros.launch_plan (tested without ROS)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from icnet_ros import demo
from icnet_ros.config import ConfigError
from icnet_ros.paths import config_dir
from icnet_ros.ros.launch_plan import LAUNCH_ARGUMENTS, plan_launch, rviz_config_for

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_launch_arguments_the_package_documents():
    names = {argument.name for argument in LAUNCH_ARGUMENTS}
    assert {"dataset", "compression", "branch", "model", "image_topic", "device", "rviz", "bag", "demo",
            "use_sim_time"} <= names
    choices = {argument.name: argument.choices for argument in LAUNCH_ARGUMENTS}
    assert choices["compression"] == ("1.0", "0.5", "0.25")
    assert choices["dataset"] == ("cityscapes", "camvid", "cocostuff")


def test_no_arguments_run_the_demo_weights_on_the_camera_topic():
    plan = plan_launch({})
    assert plan.params_file == config_dir() / "segment.yaml"
    assert plan.node_parameters["keep_rate"] == 0.25 and plan.node_parameters["dataset"] == "cityscapes"
    assert "model" not in plan.node_parameters  # empty model: the registry picks the demo weights
    assert plan.node_parameters["image_topics"] == ["/camera/image_raw"]
    assert plan.bag_command == [] and plan.rviz_config is None and plan.use_sim_time is False


def test_arguments_become_node_parameters():
    plan = plan_launch({"dataset": "camvid", "compression": "1.0", "branch": "sub4", "device": "cpu",
                        "model": "/models/camvid.safetensors", "image_topic": "/front/image_raw",
                        "input_transport": "compressed", "use_sim_time": "true"})
    parameters = plan.node_parameters
    assert parameters["dataset"] == "camvid" and parameters["keep_rate"] == 1.0 and parameters["branch"] == "sub4"
    assert parameters["model"] == "/models/camvid.safetensors" and parameters["input_transport"] == "compressed"
    assert parameters["image_topics"] == ["/front/image_raw"] and parameters["use_sim_time"] is True


@pytest.mark.parametrize("values,expected", [
    ({"compression": "0.3"}, "['1.0', '0.5', '0.25']"),
    ({"dataset": "kitti"}, "not one of"),
    ({"device": "gpu"}, "auto, cpu, cuda, cuda:N"),
    ({"rviz": "yes"}, "not one of ['true', 'false']"),
    ({"bag": "/no/such/bag"}, "is not a rosbag2"),
    ({"camera": "x"}, "unknown launch argument"),
])
def test_bad_arguments_fail_before_anything_starts(values, expected):
    with pytest.raises(ConfigError) as error:
        plan_launch(values)
    assert expected in str(error.value)


def test_a_bag_is_played_in_a_loop_with_the_clock_under_sim_time(tmp_path):
    (tmp_path / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    assert plan_launch({"bag": str(tmp_path)}).bag_command == ["ros2", "bag", "play", str(tmp_path), "--loop"]
    plan = plan_launch({"bag": str(tmp_path), "use_sim_time": "true"})
    assert plan.bag_command[-2:] == ["--clock", "40"] and plan.node_parameters["use_sim_time"] is True


def test_demo_plays_the_embedded_drive_and_opens_rviz(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(demo, "DRIVE_FRAMES", 2)
    monkeypatch.setattr(demo, "DRIVE_HEIGHT", 64)
    monkeypatch.setattr(demo, "DRIVE_WIDTH", 128)
    plan = plan_launch({"demo": "true"})
    bag = Path(plan.bag_command[3])
    assert plan.bag_command[:3] == ["ros2", "bag", "play"] and (bag / "metadata.yaml").is_file()
    assert bag.is_relative_to(tmp_path)
    assert plan.rviz_config == config_dir() / "segment.rviz"


def _image_topics(rviz_path: Path) -> dict[str, str]:
    view = yaml.safe_load(rviz_path.read_text())
    displays = view["Visualization Manager"]["Displays"]
    return {d["Name"]: d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}


def test_the_rviz_view_shows_camera_overlay_and_colors():
    assert _image_topics(config_dir() / "segment.rviz") == {
        "Camera": "/camera/image_raw", "Segmentation overlay": "/camera/segmentation/overlay",
        "Segmentation colors": "/camera/segmentation/color"}


def test_the_rviz_view_follows_the_image_topic(tmp_path):
    path = rviz_config_for("/front/image_rect", tmp_path)
    assert _image_topics(path) == {
        "Camera": "/front/image_rect", "Segmentation overlay": "/front/segmentation/overlay",
        "Segmentation colors": "/front/segmentation/color"}
    assert plan_launch({"rviz": "true", "image_topic": "/front/image_rect"}).rviz_config.name == "segment.rviz"


def test_the_launch_file_only_translates_the_plan():
    source = (REPO_ROOT / "launch" / "segment.launch.py").read_text()
    tree = ast.parse(source)
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"generate_launch_description", "launch_setup"} <= functions
    assert "plan_launch(" in source and "LAUNCH_ARGUMENTS" in source
    assert "eval(" not in source and "subprocess" not in source
