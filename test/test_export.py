"""icnet-export: model summary JSON and ONNX export checked against PyTorch with onnxruntime."""
import json

import pytest

from conftest import trained_bn_model
from icnet_ros.model.checkpoint import save_model
from icnet_ros.model.export import check_onnx, export_onnx, main

# torch.onnx's exporter trips over its own deprecation (torch 2.13); colcon test runs pytest with -We,
# which would turn it into an export failure.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def test_summary_prints_one_json_object(capsys):
    assert main(["--summary", "--keep-rate", "0.5", "--num-classes", "19",
                 "--height", "1024", "--width", "2048"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_inference"] == 6_699_987
    assert set(summary["macs"]) == {"sub4", "sub24", "sub124"}
    assert abs(summary["gmacs"]["sub124"] - 29.03) < 0.05


def test_bad_keep_rate_is_a_clear_cli_error(capsys):
    assert main(["--summary", "--keep-rate", "0.3"]) == 1
    assert "keep_rate 0.3" in capsys.readouterr().err


def test_onnx_export_with_dynamic_size_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = trained_bn_model(keep_rate=0.25, num_classes=5)
    path = export_onnx(model, tmp_path / "m.onnx", "sub124", 96, 128, dynamic=True)
    # A second, odd size proves the height and width really are dynamic.
    for record in check_onnx(model, path, "sub124", [(96, 128), (75, 161)]):
        assert record["max_abs_diff"] < 1e-3 * max(1.0, record["max_abs_logit"])
        assert record["label_agreement"] > 0.999


def test_export_cli_from_checkpoint(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    checkpoint = save_model(tmp_path / "m.safetensors", trained_bn_model(keep_rate=0.25, num_classes=5))
    assert main([str(checkpoint), "--branch", "sub4", "--static", "--labels",
                 "--height", "64", "--width", "96"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.sub4.onnx").is_file()
    record = json.loads(out.strip().splitlines()[-1].split(": ", 1)[1])
    assert record["label_agreement"] > 0.999
