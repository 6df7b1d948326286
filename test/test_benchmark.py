"""icnet-benchmark with tiny sizes and 1-2 iterations: records, options, inputs. Timings are never asserted."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from icnet_ros.inference import benchmark
from icnet_ros.inference.benchmark import REQUIRED_KEYS, main, parse_args, parse_resolution
from icnet_ros.inference.timing import STAGES
from icnet_ros.model import ICNet, ModelConfig
from icnet_ros.model.checkpoint import save_model
from icnet_ros.model.preprocess import image_to_input

TINY = ["--device", "cpu", "--keep-rates", "0.25", "--resolutions", "64x96", "--iterations", "2", "--warmup", "1"]


def test_tiny_run_writes_a_record_per_configuration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--branches", "sub4", "sub124", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["branch"] for r in records] == ["sub4", "sub124"]
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record)
        assert {f"{stage}_p{q}_ms" for stage in STAGES for q in (50, 95)} <= set(record)
        assert (record["device"], record["keep_rate"], record["height"], record["width"]) == ("cpu", 0.25, 64, 96)
        assert record["batch"] == 1 and record["precision"] == "fp32"
        assert math.isfinite(record["speedup"]) and record["speedup"] > 0
        assert record["peak_mem_mb"] > 0 and record["iterations"] == 2
    printed = capsys.readouterr().out
    assert "random weights" in printed and "| device | keep | branch |" in printed
    assert printed.count("| cpu | 0.25 |") == 2


def test_batches_and_outputs_are_swept(tmp_path):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--branches", "sub24", "--batch", "1", "2", "--outputs", "labels", "overlay",
                 "--iterations", "1", "--json", str(out)]) == 0
    assert [r["batch"] for r in json.loads(out.read_text())] == [1, 2]


def test_real_frames_and_a_checkpoint_can_be_given(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        cv2.imwrite(str(folder / f"f{index}_src.png"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    checkpoint = save_model(tmp_path / "m.safetensors",
                            ICNet(ModelConfig(keep_rate=0.25, num_classes=11, class_map="camvid")).eval())
    out = tmp_path / "bench.json"
    assert main([*TINY, "--branches", "sub4", "--images", str(folder), "--images-glob", "*_src.png",
                 "--checkpoint", str(checkpoint), "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["keep_rate"] == 0.25 and (record["height"], record["width"]) == (64, 96)


def test_image_frames_are_resized_and_never_blank(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    (frame,) = benchmark.image_frames(folder, "*.png", 4, 64, 96)
    assert frame.shape == (64, 96, 3) and frame.std() > 0
    for synthetic in benchmark.synthetic_frames(2, 64, 96):
        assert synthetic.shape == (64, 96, 3) and synthetic.dtype == np.uint8 and synthetic.std() > 10


def test_quick_defaults_yield_to_explicit_options():
    quick = parse_args(["--quick"])
    assert quick.resolutions == [(1024, 2048), (512, 1024)] and quick.iterations == 5
    assert quick.keep_rates == [0.5, 0.25] and quick.branches == ["sub124", "sub4"]
    mine = parse_args(["--quick", "--iterations", "1", "--resolutions", "64x96"])
    assert mine.resolutions == [(64, 96)] and mine.iterations == 1 and mine.keep_rates == [0.5, 0.25]


def test_bad_resolution_is_rejected():
    assert parse_resolution("720x960") == (720, 960)
    with pytest.raises(Exception, match="HEIGHTxWIDTH"):
        parse_resolution("720")


def test_cuda_is_skipped_with_a_note_when_absent(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert benchmark.devices(["cuda"]) == []
    assert "no GPU figures" in capsys.readouterr().err


def test_calibrated_random_weights_give_moderate_logits():
    frames = benchmark.synthetic_frames(2, 64, 96)
    model = benchmark.build_model(0.25, None, frames)
    x = image_to_input(frames[0], model.config)
    with torch.no_grad():
        logits = model.branch_logits(x, "sub124")
    assert torch.isfinite(logits).all() and logits.abs().max() < 1e4  # fits fp16 (max 65504)
