"""What segment.launch.py starts, decided by icnet_ros.ros.launch_plan (tested without ROS)."""
from __future__ import annotations

import ast
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from icnet_ros import demo
from icnet_ros.config import ConfigError
from icnet_ros.paths import config_dir
from icnet_ros.ros import launch_plan
from icnet_ros.ros.launch_plan import LAUNCH_ARGUMENTS, plan_launch, rviz_config_for
from icnet_ros.ros.node_config import load_node_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def installed(*names):
    """A package_available stand-in: these ROS packages are installed, no others."""
    return lambda name: name in names


def plan(values, available=("ros2bag", "rviz2"), environ=None, **options):
    return plan_launch(values, package_available=installed(*available), environ=environ or {}, **options)


def write_bag_metadata(bag: Path, topics=(("/camera/image_raw", "sensor_msgs/msg/Image"),)) -> Path:
    """A rosbag2 folder's metadata.yaml naming `topics` (name, type): what the launch reads of a bag."""
    bag.mkdir(parents=True, exist_ok=True)
    entries = [{"message_count": 1, "topic_metadata": {"name": name, "type": kind, "serialization_format": "cdr"}}
               for name, kind in topics]
    (bag / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": {
        "topics_with_message_count": entries}}))
    return bag


def test_a_bag_without_image_topic_makes_the_node_listen_to_the_bags_camera(tmp_path):
    """The first real RViz run: bag:= alone left the node and RViz on /image while the bag played
    /camera/image_raw, and every display said No Image."""
    bag = write_bag_metadata(tmp_path / "drive", [("/front/image_raw", "sensor_msgs/msg/Image"),
                                                  ("/front/camera_info", "sensor_msgs/msg/CameraInfo")])
    result = plan({"bag": str(bag)})
    assert result.remappings == [("image", "/front/image_raw")] and result.namespace == "/front"
    assert plan({"bag": str(bag), "image_topic": "/other/image"}).remappings == [("image", "/other/image")]
    two = write_bag_metadata(tmp_path / "two", [("/a/image", "sensor_msgs/msg/Image"),
                                                ("/b/image", "sensor_msgs/msg/Image")])
    with pytest.raises(ConfigError, match=r"2 camera image topics \['/a/image', '/b/image'\].*image_topic:="):
        plan({"bag": str(two)})
    compressed = write_bag_metadata(tmp_path / "jpeg", [("/c/image_raw/compressed",
                                                         "sensor_msgs/msg/CompressedImage")])
    with pytest.raises(ConfigError, match="image_topic:=/c/image_raw input_transport:=compressed"):
        plan({"bag": str(compressed)})
    with pytest.raises(ConfigError, match="no sensor_msgs Image topic"):
        plan({"bag": str(write_bag_metadata(tmp_path / "none", []))})


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(demo, "DRIVE_FRAMES", 2)
    monkeypatch.setattr(demo, "DRIVE_HEIGHT", 64)
    monkeypatch.setattr(demo, "DRIVE_WIDTH", 128)
    return tmp_path


def test_the_launch_arguments_the_package_documents():
    names = {argument.name for argument in LAUNCH_ARGUMENTS}
    assert {"dataset", "compression", "branch", "model", "image_topic", "namespace", "device", "rviz", "bag",
            "demo", "use_sim_time", "dds_config", "autostart"} <= names
    choices = {argument.name: argument.choices for argument in LAUNCH_ARGUMENTS}
    assert choices["compression"] == ("1.0", "0.5", "0.25")
    assert choices["dataset"] == ("cityscapes", "camvid", "cocostuff")


def test_no_arguments_leave_every_node_parameter_to_the_parameter_file():
    result = plan({})
    assert result.params_file == config_dir() / "segment.yaml"
    assert result.node_parameters == {"autostart": False}  # launch drives configure and activate
    assert result.namespace == "" and result.remappings == []
    assert result.bag_command == [] and result.rviz_config is None and result.use_sim_time is False
    assert result.autostart is True


def test_a_users_parameter_file_is_not_overridden_by_launch_defaults(tmp_path):
    """The regression of the first real run: branch: sub4 in params_file gave a node running sub124."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "branch": "sub4", "device": "cpu", "keep_rate": 0.5, "precision": "fp32", "dataset": "camvid",
        "image_topics": ["front/image_raw", "rear/image_raw"]}}}))
    result = plan({"params_file": str(mine)})
    assert result.node_parameters == {"autostart": False}
    effective = load_node_config(mine, result.node_parameters)
    assert (effective.branch, effective.device, effective.keep_rate, effective.precision) == ("sub4", "cpu", 0.5,
                                                                                               "fp32")
    assert effective.image_topics == ["front/image_raw", "rear/image_raw"]
    given = plan({"params_file": str(mine), "branch": "sub24"})
    assert given.node_parameters == {"branch": "sub24", "autostart": False}  # only what the user gave


def test_a_parameter_file_may_set_use_sim_time_and_the_bag_then_plays_the_clock(tmp_path):
    """use_sim_time is rclpy's own parameter, not the node's: a file setting it is valid, and it counts."""
    bag = tmp_path / "drive"
    bag.mkdir()
    write_bag_metadata(bag)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"use_sim_time": True, "device": "cpu"}}}))
    result = plan({"params_file": str(mine), "bag": str(bag)})
    assert result.use_sim_time and result.bag_command[-2:] == ["--clock", "40"]
    assert "use_sim_time" not in result.node_parameters  # the node reads it from the file
    assert not plan({"params_file": str(mine), "bag": str(bag), "use_sim_time": "false"}).use_sim_time
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"use_sim_tme": True}}}))
    with pytest.raises(ConfigError, match="use_sim_tme"):  # a typo is still named
        plan({"params_file": str(mine)})


def test_arguments_the_user_gives_become_node_parameters():
    result = plan({"dataset": "camvid", "compression": "1.0", "branch": "sub4", "device": "cpu",
                   "model": "/models/camvid.safetensors", "input_transport": "compressed", "use_sim_time": "true"})
    assert result.node_parameters == {"dataset": "camvid", "keep_rate": 1.0, "branch": "sub4", "device": "cpu",
                                      "model": "/models/camvid.safetensors", "input_transport": "compressed",
                                      "use_sim_time": True, "autostart": False}


def test_image_topic_puts_the_node_beside_the_camera_with_its_image_remapped():
    result = plan({"image_topic": "/front/image_raw"})
    assert result.namespace == "/front" and result.remappings == [("image", "/front/image_raw")]
    assert "image_topics" not in result.node_parameters  # relative "image", resolved in the namespace
    explicit = plan({"image_topic": "/front/image_raw", "namespace": "/robot1"})
    assert explicit.namespace == "/robot1" and explicit.remappings == [("image", "/front/image_raw")]


def test_image_topic_with_a_multi_camera_parameter_file_is_refused(tmp_path):
    mine = tmp_path / "two.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"image_topics": ["front/image", "rear/image"]}}}))
    with pytest.raises(ConfigError, match="remaps the node's 'image' topic"):
        plan({"params_file": str(mine), "image_topic": "/cam/image_raw"})


@pytest.mark.parametrize("values,expected", [
    ({"compression": "0.3"}, "['1.0', '0.5', '0.25']"),
    ({"dataset": "kitti"}, "not one of"),
    ({"device": "gpu"}, "auto, cpu, cuda, cuda:N"),
    ({"rviz": "yes"}, "not one of ['auto', 'true', 'false']"),
    ({"bag": "/no/such/bag"}, "is not a rosbag2"),
    ({"camera": "x"}, "unknown launch argument"),
    ({"dds_config": "huge"}, "not one of ['large_images']"),
])
def test_bad_arguments_fail_before_anything_starts(values, expected):
    with pytest.raises(ConfigError) as error:
        plan(values)
    assert expected in str(error.value)


def test_a_bag_is_played_in_a_loop_with_the_clock_under_sim_time(tmp_path):
    """A bag the launch plays sets the time by default: the first soak of demo:=true ran the node on
    wall time against a recording's stamps, so latency was NaN and /diagnostics warned of the clocks."""
    write_bag_metadata(tmp_path)
    result = plan({"bag": str(tmp_path)})
    assert result.bag_command == ["ros2", "bag", "play", str(tmp_path), "--loop", "--clock", "40"]
    assert result.use_sim_time and result.node_parameters["use_sim_time"] is True
    wall = plan({"bag": str(tmp_path), "use_sim_time": "false"})  # the user's word wins
    assert wall.bag_command == ["ros2", "bag", "play", str(tmp_path), "--loop"]
    assert not wall.use_sim_time and wall.node_parameters["use_sim_time"] is False
    with pytest.raises(ConfigError, match="ros2bag"):
        plan({"bag": str(tmp_path)}, available=())


def test_without_a_bag_the_node_keeps_the_wall_clock():
    assert plan({}).use_sim_time is False and "use_sim_time" not in plan({}).node_parameters
    assert plan({"use_sim_time": "true"}).node_parameters["use_sim_time"] is True  # e.g. a bag played elsewhere


def test_a_parameter_file_that_says_use_sim_time_false_wins_over_the_bag_default(tmp_path):
    bag = tmp_path / "drive"
    bag.mkdir()
    write_bag_metadata(bag)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"use_sim_time": False}}}))
    result = plan({"params_file": str(mine), "bag": str(bag)})
    assert not result.use_sim_time and "--clock" not in result.bag_command
    assert "use_sim_time" not in result.node_parameters  # the node reads it from the file


def test_demo_plays_the_embedded_drive_and_opens_rviz_where_installed(tiny_demo):
    result = plan({"demo": "true"})
    bag = Path(result.bag_command[3])
    assert result.bag_command[:3] == ["ros2", "bag", "play"] and (bag / "metadata.yaml").is_file()
    assert bag.is_relative_to(tiny_demo)
    assert result.bag_command[-2:] == ["--clock", "40"] and result.node_parameters["use_sim_time"] is True
    assert result.use_sim_time  # RViz follows the bag's clock too
    assert result.namespace == "/camera" and result.remappings == [("image", demo.DEMO_TOPIC)]
    assert result.rviz_config == config_dir() / "segment.rviz"


def test_demo_runs_the_demo_weights_unless_another_model_or_class_map_is_asked_for(tiny_demo, tmp_path):
    assert plan({"demo": "true"}).node_parameters["model"] == "demo"  # the weights that know the drive
    assert "model" not in plan({}).node_parameters  # by default the real-street Cityscapes model
    assert "model" not in plan({"demo": "true", "dataset": "camvid"}).node_parameters
    assert plan({"demo": "true", "model": "cityscapes"}).node_parameters["model"] == "cityscapes"
    params = tmp_path / "mine.yaml"
    params.write_text("/**:\n  ros__parameters:\n    model: cityscapes\n")
    assert "model" not in plan({"demo": "true", "params_file": str(params)}).node_parameters


def test_demo_without_rviz_runs_headless_and_says_so(tiny_demo):
    """The first real run: demo:=true without RViz failed after starting the node and the bag player."""
    result = plan({"demo": "true"}, available=("ros2bag",))
    assert result.rviz_config is None and result.bag_command
    assert any("not installed: running headless" in note for note in result.notes)
    assert plan({"demo": "true", "rviz": "false"}, available=("ros2bag",)).notes == []


def test_rviz_asked_for_but_not_installed_is_an_error_before_anything_starts(tiny_demo):
    with pytest.raises(ConfigError, match="rviz2, which is not installed"):
        plan({"demo": "true", "rviz": "true"}, available=("ros2bag",))


def test_large_image_dds_settings_add_to_the_users_own(monkeypatch, tmp_path):
    monkeypatch.setattr(launch_plan, "RMEM_MAX", tmp_path / "rmem_max")
    (tmp_path / "rmem_max").write_text("212992\n")
    loopback = "file:///etc/cyclone_loopback.xml"
    result = plan({"dds_config": "large_images"}, environ={"CYCLONEDDS_URI": loopback})
    cyclone = config_dir() / "dds" / "cyclonedds_large_images.xml"
    assert result.environment["CYCLONEDDS_URI"] == f"{loopback},file://{cyclone}"  # loopback stays in force
    assert result.environment["FASTRTPS_DEFAULT_PROFILES_FILE"] == str(config_dir() / "dds" / "fastdds_large_images.xml")
    assert any("net.core.rmem_max is 212992" in note for note in result.notes)
    theirs = plan({"dds_config": "large_images"}, environ={"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"})
    assert "FASTRTPS_DEFAULT_PROFILES_FILE" not in theirs.environment
    assert plan({}).environment == {}


def test_the_shipped_dds_settings_ask_for_16_mib_socket_buffers():
    cyclone = ElementTree.parse(config_dir() / "dds" / "cyclonedds_large_images.xml").getroot()
    namespace = {"c": "https://cdds.io/config"}
    assert cyclone.find("c:Domain/c:Internal/c:SocketReceiveBufferSize", namespace).get("max") == "16MiB"
    assert not cyclone.findall(".//c:NetworkInterface", namespace)  # never pins an interface
    fastdds = ElementTree.parse(config_dir() / "dds" / "fastdds_large_images.xml").getroot()
    namespace = {"f": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
    sizes = [int(e.text) for e in fastdds.iter() if e.tag.endswith(("sendSocketBufferSize", "listenSocketBufferSize"))]
    assert sizes == [launch_plan.LARGE_IMAGE_SOCKET_BUFFER] * 2
    assert fastdds.find("f:participant", namespace).get("is_default_profile") == "true"
    # a UDP transport of its own would bind every interface even under ROS_LOCALHOST_ONLY=1
    assert [e.text for e in fastdds.iter() if e.tag.endswith("type")] == ["SHM"]


def _image_topics(rviz_path: Path) -> dict[str, str]:
    view = yaml.safe_load(rviz_path.read_text())
    displays = view["Visualization Manager"]["Displays"]
    return {d["Name"]: d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}


def test_the_rviz_view_shows_camera_overlay_and_colors():
    assert _image_topics(config_dir() / "segment.rviz") == {
        "Camera": "/camera/image_raw", "Segmentation overlay": "/camera/segmentation/overlay",
        "Segmentation colors": "/camera/segmentation/color"}


def test_the_rviz_view_follows_the_camera_and_the_namespace(tmp_path):
    path = rviz_config_for("/front/image_rect", "/front", tmp_path)
    assert _image_topics(path) == {
        "Camera": "/front/image_rect", "Segmentation overlay": "/front/segmentation/overlay",
        "Segmentation colors": "/front/segmentation/color"}
    robot = rviz_config_for("/robot1/image", "/robot1", tmp_path / "robot")
    assert _image_topics(robot)["Segmentation overlay"] == "/robot1/segmentation/overlay"
    assert plan({"rviz": "true", "image_topic": "/front/image_rect"}).rviz_config.name == "segment.rviz"


def test_the_launch_file_only_translates_the_plan():
    source = (REPO_ROOT / "launch" / "segment.launch.py").read_text()
    tree = ast.parse(source)
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"generate_launch_description", "launch_setup"} <= functions
    assert "plan_launch(" in source and "LAUNCH_ARGUMENTS" in source and "LifecycleNode(" in source
    assert "eval(" not in source and "subprocess" not in source
