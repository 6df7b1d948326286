"""icnet-benchmark with tiny sizes and 1-2 iterations: records, options, inputs; only relations between
timings (a stage within its call, speedups from latencies) are asserted, never their values."""
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


def test_tiny_run_writes_a_record_per_configuration_and_backend(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--branches", "sub4", "sub124", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["branch"], r["backend"]) for r in records] == [("sub4", "naive"), ("sub4", "torch"),
                                                              ("sub124", "naive"), ("sub124", "torch")]
    for record in records:
        assert set(REQUIRED_KEYS) <= set(record)
        assert {f"{stage}_p{q}_ms" for stage in STAGES for q in (50, 95)} <= set(record)
        assert (record["device"], record["keep_rate"], record["height"], record["width"]) == ("cpu", 0.25, 64, 96)
        assert record["batch"] == 1 and record["precision"] == "fp32" and record["outputs"] == "labels"
        assert math.isfinite(record["speedup"]) and record["speedup"] > 0
        assert record["peak_mem_mb"] > 0 and record["iterations"] == 2
        assert math.isfinite(record["throughput_fps"]) and record["throughput_fps"] > 0
        assert record["latency_fps"] == pytest.approx(1e3 / record["latency_p50_ms"])
        assert record["forward_p50_ms"] <= record["latency_p50_ms"]  # a stage of the call, not more than it
    naive, engine = records[2], records[3]
    assert naive["speedup"] == 1.0
    assert engine["speedup"] == pytest.approx(naive["latency_p50_ms"] / engine["latency_p50_ms"])
    captured = capsys.readouterr()
    assert "random weights" in captured.out and "| device | keep | branch |" in captured.out
    assert captured.out.count("| cpu | 0.25 |") == 4
    assert "tensorrt runs on CUDA only" in captured.err  # the third backend is skipped with a note


def test_batches_and_output_sets_are_swept(tmp_path):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--branches", "sub24", "--batch", "1", "2", "--output-sets", "labels", "all",
                 "--backends", "torch", "--iterations", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["batch"], r["outputs"]) for r in records] == [
        (1, "labels"), (1, "labels+color+overlay"), (2, "labels"), (2, "labels+color+overlay")]
    assert {r["backend"] for r in records} == {"torch"} and all(r["speedup"] is None for r in records)


def test_output_sets_are_parsed_in_canonical_order():
    assert benchmark.parse_output_set("all") == ("labels", "color", "overlay")
    assert benchmark.parse_output_set("overlay+labels") == ("labels", "overlay")
    with pytest.raises(Exception, match="output set"):
        benchmark.parse_output_set("labels+depth")
    assert parse_args(["--outputs", "labels", "overlay"]).output_sets == [("labels", "overlay")]  # one set
    assert parse_args([]).output_sets == [("labels",)]


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
                 "--checkpoint", str(checkpoint), "--backends", "torch", "--json", str(out)]) == 0
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


def sweep_size(args) -> int:
    return len(args.resolutions) * len(args.keep_rates) * len(args.branches) * len(args.batch)


def test_quick_is_a_smaller_sweep_and_every_explicit_option_wins():
    full, quick = parse_args([]), parse_args(["--quick"])
    assert sweep_size(quick) < sweep_size(full) and quick.iterations < full.iterations
    assert quick.warmup <= full.warmup
    changed = [key for key in benchmark.QUICK if getattr(quick, key) != getattr(full, key)]
    assert changed  # --quick changes something, or it would not be quicker
    given = {"iterations": (["--iterations", "1"], 1), "warmup": (["--warmup=0"], 0),
             "keep_rates": (["--keep-rates", "0.25"], [0.25]), "branches": (["--branches", "sub24"], ["sub24"]),
             "resolutions": (["--resolutions=64x96"], [(64, 96)])}
    assert set(given) == set(benchmark.QUICK)  # each quick setting is tried below
    for key, (argv, value) in given.items():
        mine = parse_args(["--quick", *argv])
        assert getattr(mine, key) == value, key  # the user's value wins, in either spelling
        for other in set(given) - {key}:
            assert getattr(mine, other) == getattr(quick, other), (key, other)  # the rest stay quick


def test_bad_resolution_is_rejected():
    assert parse_resolution("720x960") == (720, 960)
    with pytest.raises(Exception, match="HEIGHTxWIDTH"):
        parse_resolution("720")


def test_cuda_is_skipped_with_a_note_when_absent(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert benchmark.devices(["cuda"]) == []
    assert "no GPU figures" in capsys.readouterr().err


def test_tensorrt_is_skipped_with_a_note_where_it_cannot_run(capsys, monkeypatch):
    from icnet_ros.inference import tensorrt

    assert benchmark.backends_for(torch.device("cpu"), ["naive", "torch", "tensorrt"]) == ["naive", "torch"]
    monkeypatch.setattr(tensorrt, "available", lambda: False)
    assert benchmark.backends_for(torch.device("cuda", 0), ["tensorrt", "torch"]) == ["torch"]
    assert "not installed" in capsys.readouterr().err


def test_calibrated_random_weights_give_moderate_logits():
    frames = benchmark.synthetic_frames(2, 64, 96)
    model = benchmark.build_model(0.25, None, frames)
    x = image_to_input(frames[0], model.config)
    with torch.no_grad():
        logits = model.branch_logits(x, "sub124")
    assert torch.isfinite(logits).all() and logits.abs().max() < 1e4  # fits fp16 (max 65504)
