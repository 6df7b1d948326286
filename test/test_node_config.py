"""The node's parameters: config/segment.yaml mirrors NodeConfig one to one, validation names the
allowed values, and dataset + keep rate select a checkpoint that fits them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import trained_bn_model

from icnet_ros.config import ConfigError
from icnet_ros.model.checkpoint import CheckpointError, save_model
from icnet_ros.model.registry import (
    DEMO_KEEP_RATE,
    ResolvedCheckpoint,
    checkpoint_name,
    demo_weights,
    resolve_checkpoint,
)
from icnet_ros.ros.node_config import (
    NodeConfig,
    default_params_file,
    dynamic_parameters,
    load_node_config,
    node_config_from_dict,
    parameter_specs,
    read_ros_parameters,
    with_changes,
)


def test_segment_yaml_holds_every_field_with_its_default():
    values = read_ros_parameters(default_params_file())
    names = [f.name for f in dataclasses.fields(NodeConfig)]
    assert list(values) == names  # same keys, same order
    assert load_node_config() == NodeConfig()


def test_every_parameter_is_described_and_typed():
    kinds = {spec.name: spec.kind for spec in parameter_specs()}
    assert kinds["keep_rate"] == "double" and kinds["image_topics"] == "string_array"
    assert kinds["publish_overlay"] == "bool" and kinds["input_qos_depth"] == "integer"
    for spec in parameter_specs():
        assert len(spec.description) > 20, spec.name
    choices = {spec.name: spec.constraints for spec in parameter_specs()}
    assert choices["keep_rate"] == "one of 1.0, 0.5, 0.25"
    assert choices["overlay_alpha"] == "from 0.0 to 1.0"


def test_branch_alpha_and_outputs_are_the_runtime_parameters():
    dynamic = dynamic_parameters()
    assert {"branch", "overlay_alpha", "publish_labels", "publish_color", "publish_overlay", "jpeg_quality",
            "visual_scale"} <= dynamic
    assert not {"model", "dataset", "keep_rate", "device", "precision", "image_topics", "input_transport"} & dynamic


@pytest.mark.parametrize("changes,expected", [
    ({"keep_rate": 0.3}, "[1.0, 0.5, 0.25]"),
    ({"dataset": "kitti"}, "['cityscapes', 'camvid', 'cocostuff']"),
    ({"branch": "sub8"}, "['sub124', 'sub24', 'sub4']"),
    ({"precision": "int8"}, "['auto', 'fp32', 'fp16', 'bf16']"),
    ({"input_transport": "theora"}, "['raw', 'compressed']"),
    ({"device": "gpu"}, "auto, cpu, cuda, cuda:N"),
    ({"overlay_alpha": 1.5}, "[0.0, 1.0]"),
    ({"visual_scale": 0.0}, "visual_scale: 0.0 is outside the allowed range [0.05, 1.0]"),
    ({"visual_scale": 2.0}, "[0.05, 1.0]"),
    ({"jpeg_quality": 0}, "jpeg_quality: 0 is outside the allowed range [1, 100]"),
    ({"input_qos_depth": 0}, "[1, 100]"),
    ({"publish_labels": False, "publish_color": False, "publish_overlay": False}, "at least one of"),
    ({"image_topics": []}, "at least one camera"),
    ({"image_topics": ["/cam/left", "/cam/right"]}, "its own namespace"),
    ({"overlay_alpha": "half"}, "expected a number"),
    ({"colour": True}, "unknown key"),
])
def test_bad_values_name_what_would_be_accepted(changes, expected):
    with pytest.raises(ConfigError, match=None) as error:
        with_changes(NodeConfig(), changes)
    assert expected in str(error.value)


def test_integers_are_accepted_for_double_parameters_as_ros_yaml_writes_them():
    assert node_config_from_dict({"keep_rate": 1}).keep_rate == 1.0
    assert node_config_from_dict({"expected_rate_hz": 17}).expected_rate_hz == 17.0


def test_node_section_overrides_the_wildcard_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {"branch": "sub4", "overlay_alpha": 0.3}},
        "icnet_segmentation": {"ros__parameters": {"branch": "sub24"}},
    }))
    config = load_node_config(path)
    assert (config.branch, config.overlay_alpha) == ("sub24", 0.3)
    with pytest.raises(ConfigError, match="ros__parameters"):
        path.write_text("icnet_segmentation: {branch: sub4}\n")
        load_node_config(path)


# --- selecting the checkpoint ------------------------------------------------------------------------
def test_default_settings_select_the_bundled_real_street_cityscapes_model():
    from icnet_ros.model.registry import cityscapes_weights

    defaults = NodeConfig()
    resolved = resolve_checkpoint(defaults.model, defaults.model_dir, defaults.dataset, defaults.keep_rate)
    assert not resolved.is_demo and resolved.path == cityscapes_weights()
    assert cityscapes_weights().stat().st_size < 10 * 2**20


def test_bundled_models_are_selected_by_name():
    from icnet_ros.model.registry import camvid_weights

    assert resolve_checkpoint("demo", "", "cityscapes", DEMO_KEEP_RATE) == ResolvedCheckpoint(demo_weights(), True)
    assert resolve_checkpoint("camvid", "", "camvid", 0.25).path == camvid_weights()
    with pytest.raises(CheckpointError, match="predicts the 'cityscapes' class map, not 'camvid'"):
        resolve_checkpoint("demo", "", "camvid", 0.25)


def test_camvid_at_0_25_selects_the_bundled_real_street_model():
    from icnet_ros.model.registry import camvid_weights

    resolved = resolve_checkpoint("", "", "camvid", 0.25)
    assert not resolved.is_demo and resolved.path == camvid_weights()
    assert camvid_weights().stat().st_size < 10 * 2**20


def test_model_dir_is_searched_by_dataset_and_keep_rate(tmp_path):
    path = tmp_path / checkpoint_name("camvid", 0.25)
    save_model(path, trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid"))
    assert checkpoint_name("cityscapes", 1.0) == "icnet_cityscapes_keep1.0.safetensors"
    assert resolve_checkpoint("", str(tmp_path), "camvid", 0.25).path == path
    with pytest.raises(CheckpointError, match="icnet_camvid_keep0.5.safetensors"):
        resolve_checkpoint("", str(tmp_path), "camvid", 0.5)


def test_a_checkpoint_that_does_not_fit_the_settings_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid"))
    with pytest.raises(CheckpointError, match="predicts the 'camvid' class map, not 'cityscapes'") as error:
        resolve_checkpoint(str(path), "", "cityscapes", 0.5)
    assert "keep rate is 0.25, not 0.5" in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing.safetensors"), "", "camvid", 0.25)


def test_params_file_is_found_in_the_share_folder():
    """The source tree's file, or the installed copy of it (colcon test runs against the install)."""
    found = default_params_file()
    assert found.name == "segment.yaml" and found.parent.name == "config"
    assert found.read_bytes() == (Path(__file__).resolve().parents[1] / "config" / "segment.yaml").read_bytes()
