"""ros_bench dds-loss --dds-config: the node gets the package's settings for the DDS in use, as the
launch gives them (Cyclone: appended to CYCLONEDDS_URI; Fast DDS: FASTRTPS_DEFAULT_PROFILES_FILE).

ros_bench imports rclpy and the generated icnet_ros.msg: these tests skip without a sourced ROS 2
workspace in which icnet_ros was built by colcon.
"""
from __future__ import annotations

import pytest

from icnet_ros.paths import config_dir

# No module-level importorskip: launch_testing's pytest plugin imports test modules itself.
try:
    from icnet_ros.ros.ros_bench import build_parser, dds_config_environment
except ModuleNotFoundError as error:  # a stale build (an ImportError of a name) fails instead
    MISSING = f"needs a sourced ROS 2 workspace with icnet_ros built by colcon: {error}"
else:
    MISSING = ""

pytestmark = [pytest.mark.ros, pytest.mark.skipif(bool(MISSING), reason=MISSING)]
DDS = config_dir() / "dds"


def test_cyclone_gets_the_package_file_after_the_users_own():
    environment, used = dds_config_environment("large_images", "rmw_cyclonedds_cpp",
                                               {"CYCLONEDDS_URI": "file:///etc/loopback.xml"})
    cyclone = DDS / "cyclonedds_large_images.xml"
    assert environment == {"CYCLONEDDS_URI": f"file:///etc/loopback.xml,file://{cyclone}"}
    assert used == {"rmw": "rmw_cyclonedds_cpp", "variable": "CYCLONEDDS_URI", "file": str(cyclone)}


def test_fast_dds_gets_the_profiles_file_unless_one_is_set():
    fastdds = str(DDS / "fastdds_large_images.xml")
    for rmw in ("rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp"):
        environment, used = dds_config_environment("large_images", rmw, {"CYCLONEDDS_URI": "file:///x.xml"})
        assert environment == {"FASTRTPS_DEFAULT_PROFILES_FILE": fastdds}
        assert used == {"rmw": rmw, "variable": "FASTRTPS_DEFAULT_PROFILES_FILE", "file": fastdds}
    environment, used = dds_config_environment("large_images", "rmw_fastrtps_cpp",
                                               {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"})
    assert environment == {} and used["file"] == "/mine.xml"  # Fast DDS reads one file: the user's stays


def test_an_own_file_replaces_the_package_file(tmp_path):
    own = str(tmp_path / "loopback_large_images.xml")
    environment, used = dds_config_environment("large_images", "rmw_fastrtps_cpp",
                                               {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"}, own)
    assert environment == {"FASTRTPS_DEFAULT_PROFILES_FILE": own} and used["file"] == own
    environment, _ = dds_config_environment("large_images", "rmw_cyclonedds_cpp", {}, own)
    assert environment == {"CYCLONEDDS_URI": f"file://{own}"}


def test_a_dds_without_package_settings_is_refused():
    with pytest.raises(SystemExit, match="no large_images settings for rmw_connextdds"):
        dds_config_environment("large_images", "rmw_connextdds", {})


def test_dds_loss_arguments():
    args = build_parser().parse_args(["dds-loss", "--dds-config", "large_images", "--dds-config-file", "/a.xml"])
    assert (args.dds_config, args.dds_config_file) == ("large_images", "/a.xml")
    assert build_parser().parse_args(["dds-loss"]).dds_config_file is None
