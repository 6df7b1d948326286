"""Checkpoints: one safetensors file rebuilds the model; bad files get clear errors; writes are atomic."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import trained_bn_model
from safetensors.torch import save_file

from icnet_ros.model.checkpoint import CheckpointError, load_model, read_checkpoint, save_model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = trained_bn_model(keep_rate=0.25, num_classes=5, class_map="camvid")
    path = save_model(tmp_path / "m.safetensors", model, {"iteration": 7, "dataset": "synthetic"})
    loaded = load_model(path)
    config, _, provenance = read_checkpoint(path)
    assert config == model.config and provenance == {"iteration": 7, "dataset": "synthetic"}
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(image), loaded(image))


def test_wrong_class_count_is_named(tmp_path):
    path = save_model(tmp_path / "m.safetensors", trained_bn_model(num_classes=5))
    with pytest.raises(CheckpointError, match="predicts 5 classes .* 19 are expected"):
        load_model(path, expected_num_classes=19)
    with pytest.raises(CheckpointError, match="class map 'camvid', not 'cityscapes'"):
        load_model(path, expected_class_map="cityscapes")


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = save_model(tmp_path / "m.safetensors", trained_bn_model())
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_pickle_files_are_rejected_without_being_executed(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_foreign_safetensors_and_missing_files(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an icnet_ros checkpoint"):
        load_model(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_config(tmp_path):
    model = trained_bn_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "classifier.bias"}
    meta = {"format": "icnet_ros.checkpoint/1", "provenance": "{}",
            "model_config": json.dumps({"num_classes": 5, "keep_rate": 0.25, "class_map": "camvid"})}
    save_file(state, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "m.safetensors")


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_model(tmp_path / "m.safetensors", trained_bn_model())
    before = path.read_bytes()

    def crash(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("icnet_ros.model.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_model(path, trained_bn_model(num_classes=3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_a_checkpoint_stored_in_fp16_loads_into_the_float32_model(tmp_path):
    from icnet_ros.model.checkpoint import main

    model = trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid")
    source = save_model(tmp_path / "fp32.safetensors", model, {"iteration": 3})
    assert main([str(source), str(tmp_path / "fp16.safetensors"), "--fp16"]) == 0
    _config, state, provenance = read_checkpoint(tmp_path / "fp16.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert provenance["iteration"] == 3 and provenance["stored_as"] == "float16"
    half = load_model(tmp_path / "fp16.safetensors")
    assert next(half.parameters()).dtype == torch.float32
    assert (tmp_path / "fp16.safetensors").stat().st_size < 0.6 * source.stat().st_size
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(half(x), model(x), atol=5e-2)


def test_a_written_checkpoint_is_readable_by_other_users_as_umask_allows(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "model.safetensors"
    save_model(path, trained_bn_model(keep_rate=0.25))
    # a node running under another account must be able to read what the trainer wrote
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_two_fine_tunes_average_weight_by_weight_with_both_provenances(tmp_path):
    from icnet_ros.model.checkpoint import main

    first = trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid")
    second = trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid")
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(torch.randn_like(parameter))
    save_model(tmp_path / "a.safetensors", first, {"iteration": 1500})
    save_model(tmp_path / "b.safetensors", second, {"iteration": 2000})
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "soup.safetensors"), "--fp16",
                 "--average-with", str(tmp_path / "b.safetensors"), "--other-weight", "0.25"]) == 0
    _config, state, provenance = read_checkpoint(tmp_path / "soup.safetensors")
    a, b = first.state_dict(), second.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.float(), 0.75 * a[key] + 0.25 * b[key], atol=2e-3, rtol=1e-3)
        else:
            assert torch.equal(value, a[key])
    assert [(s["file"], s["weight"], s["provenance"]["iteration"]) for s in provenance["averaged_from"]] == [
        (str(tmp_path / "a.safetensors"), 0.75, 1500), (str(tmp_path / "b.safetensors"), 0.25, 2000)]
    assert provenance["stored_as"] == "float16"


def test_only_fine_tunes_of_one_network_average(tmp_path, capsys):
    from icnet_ros.model.checkpoint import main

    save_model(tmp_path / "a.safetensors", trained_bn_model(keep_rate=0.25, num_classes=11, class_map="camvid"))
    save_model(tmp_path / "b.safetensors", trained_bn_model(keep_rate=0.25, num_classes=19))
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"),
                 "--average-with", str(tmp_path / "b.safetensors")]) == 1
    assert "hold different networks" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"),
                 "--average-with", str(tmp_path / "a.safetensors"), "--other-weight", "1.5"]) == 1
    assert "must be in [0, 1]" in capsys.readouterr().err
