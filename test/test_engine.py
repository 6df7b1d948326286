"""The segmentation engine on CPU: exact labels, outputs, settings between frames, bad input.

The GPU path (cuda.py) shares forward_logits / the postprocess stages / Plan with what is tested
here, and its graph cache policy is tested on CPU in test_graph_cache.py; its buffers, streams and
graphs need a GPU (test_engine_gpu.py, icnet_ros/inference/gpu_check.py).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import trained_bn_model

from icnet_ros.classmap import ClassMap, load_class_map
from icnet_ros.inference import (
    FrameError,
    Segmentation,
    SegmentationEngine,
    gpu_check,
    label_agreement,
    upsample,
)
from icnet_ros.inference import engine as engine_module
from icnet_ros.model import BRANCHES, ICNet, ModelConfig
from icnet_ros.model.checkpoint import save_model
from icnet_ros.visualization import colorize, colorize_torch, overlay, overlay_torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ODD_SIZES = [(64, 96), (65, 97), (77, 131), (120, 161)]


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A frame with regions and edges (blurred noise), so the labels have boundaries to get right."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 4)


@pytest.fixture(scope="module")
def model() -> ICNet:
    torch.manual_seed(0)
    return trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")


@pytest.fixture(scope="module")
def engine(model) -> SegmentationEngine:
    return SegmentationEngine(model, device="cpu", threads=2)


def eager_labels(model: ICNet, engine: SegmentationEngine, frames, branch: str) -> np.ndarray:
    """The plain model: BN unfolded, NCHW, full-resolution logits, argmax."""
    x = engine.preprocess(frames).contiguous()
    with torch.no_grad():
        return model(x, branch).argmax(1).numpy()


# --- exact labels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_labels_identical_to_argmax_of_upsampled_logits(engine, model, branch, size):
    engine.branch = branch
    frame = scene(*size, seed=size[0])
    labels = engine.segment(frame).labels
    x = engine.preprocess(frame)
    with torch.no_grad():
        own = engine.weights("fp32")(x, branch).argmax(1)[0].numpy()  # same weights, dense upsample
    assert labels.shape == size and labels.dtype == np.uint8
    assert np.array_equal(labels, own)
    assert np.array_equal(labels, eager_labels(model, engine, frame, branch)[0])


def smooth_logits(generator, batch, channels, height, width):
    coarse = torch.randn(batch, channels, max(height // 4, 1), max(width // 4, 1), generator=generator) * 3
    fine = F.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)
    return fine + 0.05 * torch.randn(batch, channels, height, width, generator=generator)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [1, 2, 5, 19, 21])
def test_sparse_upsample_equals_dense_on_many_random_logits(channels, channels_last):
    generator = torch.Generator().manual_seed(channels)
    for trial in range(8):
        h, w = (int(v) for v in torch.randint(2, 30, (2,), generator=generator))
        out = (max(1, 4 * h + trial % 5 - 2), max(1, 4 * w - trial % 3))
        logits = smooth_logits(generator, 1 + trial % 2, channels, h, w)
        if channels_last:
            logits = logits.contiguous(memory_format=torch.channels_last)
        dense = F.interpolate(logits, out, mode="bilinear", align_corners=True).argmax(1)
        # dense_fraction=1 keeps the sparse path even where it would hand over to the dense one
        assert torch.equal(upsample.sparse_upsample_argmax(logits, out, dense_fraction=1.0), dense)


def test_sparse_upsample_breaks_exact_ties_like_torch():
    generator = torch.Generator().manual_seed(7)
    for trial in range(12):
        logits = torch.randint(0, 3, (1, 5 + trial % 3 * 7, 9, 13), generator=generator).float() * 0.5
        if trial % 2:
            logits = logits.contiguous(memory_format=torch.channels_last)
        out = (33 + trial, 50 + 2 * trial)
        dense = F.interpolate(logits, out, mode="bilinear", align_corners=True).argmax(1)
        assert torch.equal(upsample.sparse_upsample_argmax(logits, out, dense_fraction=1.0), dense)


def test_sparse_upsample_hands_noise_to_the_dense_path(monkeypatch):
    calls = []
    monkeypatch.setattr(upsample, "dense_upsample_argmax", lambda *a: calls.append(a) or torch.zeros(1))
    upsample.sparse_upsample_argmax(torch.randn(1, 19, 20, 30), (80, 120))
    assert calls  # pure noise: nearly every cell unsettled


def test_calibrated_formulas_reproduce_interpolate_bit_for_bit():
    for layout in (torch.contiguous_format, torch.channels_last):
        logits = torch.randn(1, 19, 11, 17).contiguous(memory_format=layout)
        formulas = upsample.kernel_formulas(logits, (41, 66))
        assert upsample.FALLBACK_FORMULA not in formulas


def test_batch_of_cameras_matches_single_frames_and_eager(engine, model):
    engine.branch = "sub124"
    frames = [scene(70, 101, seed=s) for s in range(3)]
    batch = engine.segment(frames)
    assert isinstance(batch, list) and len(batch) == 3
    singles = [engine.segment(frame).labels for frame in frames]
    reference = eager_labels(model, engine, frames, "sub124")
    for index, seg in enumerate(batch):
        assert seg.batch_size == 3
        assert np.array_equal(seg.labels, singles[index])
        assert np.array_equal(seg.labels, reference[index])
    stacked = engine.segment(np.stack(frames))
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(stacked, batch))


def test_bgr_input_gives_the_same_labels_and_a_bgr_overlay(engine):
    rgb = scene(64, 96, seed=3)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    from_rgb = engine.segment(rgb, color=True, overlay=True)
    from_bgr = engine.segment(bgr, channel_order="bgr", color=True, overlay=True)
    assert np.array_equal(from_rgb.labels, from_bgr.labels)
    assert np.array_equal(from_rgb.color, from_bgr.color)  # colors are always RGB
    assert np.array_equal(from_bgr.overlay, from_rgb.overlay[..., ::-1])


# --- visualization ------------------------------------------------------------------------------------
def test_colorize_maps_ids_to_palette_and_unknown_ids_to_black():
    palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    labels = np.array([[0, 1], [255, 1]], np.uint8)
    color = colorize(labels, palette)
    assert color.shape == (2, 2, 3) and color.dtype == np.uint8
    assert color[0, 0].tolist() == [10, 20, 30] and color[0, 1].tolist() == [40, 50, 60]
    assert color[1, 0].tolist() == [0, 0, 0]
    torch_color = colorize_torch(torch.from_numpy(labels), torch.from_numpy(palette))
    assert np.array_equal(torch_color.numpy(), color)


def test_overlay_is_a_rounded_blend_and_numpy_equals_torch():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    color = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(overlay(image, color, 0.0), image)
    assert np.array_equal(overlay(image, color, 1.0), color)
    half = overlay(image, color, 0.5)
    assert np.abs(half.astype(int) - (image.astype(int) + color.astype(int)) / 2).max() <= 0.5
    for alpha in (0.0, 0.3, 0.5, 0.77, 1.0):
        blended = overlay_torch(torch.from_numpy(image), torch.from_numpy(color), alpha).numpy()
        assert np.array_equal(blended, overlay(image, color, alpha))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, color, 1.5)


def test_engine_color_and_overlay_use_the_palette_and_alpha(engine):
    frame = scene(64, 96, seed=5)
    seg = engine.segment(frame, color=True, overlay=True, alpha=0.3)
    palette = engine.class_map.palette()
    assert np.array_equal(seg.color, colorize(seg.labels, palette))
    assert np.array_equal(seg.overlay, overlay(frame, seg.color, 0.3))


def test_outputs_not_asked_for_are_not_computed(engine, monkeypatch):
    calls = {"colorize": 0, "overlay": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(engine_module, "colorize_torch", counting("colorize", colorize_torch))
    monkeypatch.setattr(engine_module, "overlay_torch", counting("overlay", overlay_torch))
    frame = scene(64, 96)
    seg = engine.segment(frame)
    assert (seg.color, seg.overlay) == (None, None) and calls == {"colorize": 0, "overlay": 0}
    seg = engine.segment(frame, labels=False, color=True)
    assert seg.labels is None and seg.overlay is None and seg.color is not None
    assert calls == {"colorize": 1, "overlay": 0}
    seg = engine.segment(frame, labels=False, overlay=True)
    assert seg.labels is None and seg.color is None and calls == {"colorize": 2, "overlay": 1}
    with pytest.raises(ValueError, match="nothing to compute"):
        engine.segment(frame, labels=False)


def test_timings_attribute_time_to_the_stage_that_spent_it(model, monkeypatch):
    """Slow the forward by 60 ms and the labels stage by 30 ms: each must show up in its own stage."""
    import time as time_module

    original_forward, original_labels = SegmentationEngine.forward_logits, SegmentationEngine._labels

    def slow_forward(self, frames, plan):
        time_module.sleep(0.06)
        return original_forward(self, frames, plan)

    def slow_labels(self, logits, plan):
        time_module.sleep(0.03)
        return original_labels(self, logits, plan)

    monkeypatch.setattr(SegmentationEngine, "forward_logits", slow_forward)
    monkeypatch.setattr(SegmentationEngine, "_labels", slow_labels)
    slow = SegmentationEngine(model, device="cpu")
    timings = slow.segment(scene(64, 96)).timings
    assert set(timings.as_dict()) == {"upload_ms", "forward_ms", "postprocess_ms", "download_ms", "total_ms"}
    assert timings.forward_ms >= 60 and timings.postprocess_ms >= 30
    assert timings.upload_ms < 30 and timings.download_ms < 30  # a 64x96 frame: the sleeps are elsewhere
    assert timings.total_ms == pytest.approx(timings.upload_ms + timings.forward_ms + timings.postprocess_ms
                                             + timings.download_ms)


# --- settings between frames --------------------------------------------------------------------------
def test_branch_and_precision_change_between_frames_without_reloading(model):
    engine = SegmentationEngine(model, device="cpu")
    fp32 = engine.weights("fp32")
    frame = scene(64, 96, seed=9)
    before = engine.segment(frame).labels
    engine.branch, engine.precision = "sub4", "bf16"
    low = engine.segment(frame)
    assert low.labels.shape == (64, 96)
    bf16 = engine.weights("bf16")
    assert engine.weights("bf16") is bf16 and next(bf16.parameters()).dtype == torch.bfloat16
    engine.branch, engine.precision = "sub124", "fp32"
    assert engine.weights("fp32") is fp32 and next(fp32.parameters()).dtype == torch.float32
    assert np.array_equal(engine.segment(frame).labels, before)
    with pytest.raises(ValueError, match="branch"):
        engine.branch = "sub8"
    with pytest.raises(ValueError, match="precision"):
        engine.precision = "int8"


def test_engine_from_checkpoint_takes_everything_from_the_file(tmp_path):
    model = ICNet(ModelConfig(num_classes=11, keep_rate=0.25, class_map="camvid")).eval()
    path = save_model(tmp_path / "camvid.safetensors", model)
    engine = SegmentationEngine.from_checkpoint(path, device="cpu", branch="sub24", threads=1)
    assert engine.device.type == "cpu" and engine.precision == "fp32" and engine.branch == "sub24"
    assert engine.class_map.name == "camvid" and engine.num_classes == 11
    seg = engine.segment(scene(48, 64), color=True)
    assert seg.labels.max() < 11 and seg.color.shape == (48, 64, 3)


def test_large_class_maps_give_uint16_labels(model):
    big = ClassMap("big", 300, tuple(f"c{i}" for i in range(19)), tuple((i, i, i) for i in range(19)),
                   tuple((i,) for i in range(19)))
    engine = SegmentationEngine(model, class_map=big, device="cpu")
    labels = engine.segment(scene(48, 64)).labels
    assert labels.dtype == np.uint16 and labels.max() < 19


def test_segment_stream_returns_results_in_order(engine):
    frames = [scene(48, 64, seed=s) for s in range(4)]
    streamed = list(engine.segment_stream(iter(frames), color=True))
    assert all(isinstance(seg, Segmentation) for seg in streamed)
    for frame, seg in zip(frames, streamed):
        assert np.array_equal(seg.labels, engine.segment(frame).labels)


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, message", [
    (np.zeros((64, 96, 3), np.float32), "dtype float32"),
    (np.zeros((64, 96, 4), np.uint8), "4 channel"),
    (np.zeros((64, 96), np.uint8), "1 channel"),
    (np.zeros((0, 96, 3), np.uint8), "empty"),
    (np.zeros((20, 96, 3), np.uint8), "at least 32x32"),
    ([np.zeros((64, 96, 3), np.uint8), np.zeros((64, 80, 3), np.uint8)], "share one size"),
    ([], "empty list"),
    ("frame.png", "str"),
])
def test_bad_frames_raise_frame_error(engine, frames, message):
    with pytest.raises(FrameError, match=message):
        engine.segment(frames)


def test_bad_channel_order_is_rejected(engine):
    with pytest.raises(FrameError, match="channel_order"):
        engine.segment(scene(64, 96), channel_order="rgba")


def test_cuda_without_a_gpu_is_a_clear_error(model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is a valid device here")
    with pytest.raises(ValueError, match="CUDA"):
        SegmentationEngine(model, device="cuda")


# --- agreement and the GPU check ----------------------------------------------------------------------
def test_label_agreement_counts_equal_pixels():
    a = np.array([[0, 1], [2, 3]])
    assert label_agreement(a, a) == 1.0
    assert label_agreement(a, np.array([[0, 1], [2, 0]])) == 0.75
    assert label_agreement(a, np.array([[0, 1], [255, 0]]), ignore_index=255) == 2 / 3
    assert label_agreement([a, a], [a, np.zeros_like(a)]) == 5 / 8
    with pytest.raises(ValueError, match="shape"):
        label_agreement(a, a[:1])


def write_frames(folder: Path, count: int, size=(64, 96)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        cv2.imwrite(str(folder / f"city_{index:02d}_leftImg8bit_src.png"), scene(*size, seed=index))


def test_gpu_check_runs_on_cpu_comparing_fp32_engine_with_eager(tmp_path, capsys):
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    checkpoint = save_model(tmp_path / "m.safetensors", model)
    write_frames(tmp_path / "frames", 2)
    report = tmp_path / "report.json"
    code = gpu_check.main([str(tmp_path / "frames"), "--checkpoint", str(checkpoint), "--device", "cpu",
                           "--json", str(report)])
    assert code == 0
    assert "PASS" in capsys.readouterr().out
    assert '"overall": 1.0' in report.read_text()


def test_gpu_check_fails_a_batch_size_whose_frames_get_each_others_labels(tmp_path, monkeypatch, capsys):
    """What a misaligned or mixed-up batch looks like: every frame labelled as another one."""
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    checkpoint = save_model(tmp_path / "m.safetensors", model)
    write_frames(tmp_path / "frames", 3)
    batched = gpu_check.batched_labels
    monkeypatch.setattr(gpu_check, "batched_labels",
                        lambda engine, frames, size: batched(engine, frames[1:] + frames[:1], size))
    code = gpu_check.main([str(tmp_path / "frames"), "--checkpoint", str(checkpoint), "--device", "cpu",
                           "--batches", "2"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "target 99.50 %: PASS" in printed  # batch 1 itself is right
    assert "batch 2: " in printed and "FAIL" in printed.split("batch 2: ")[1]


def test_gpu_check_compares_at_the_frame_size_for_a_checkpoint_with_an_input_size(tmp_path, capsys):
    """The bundled models (and imported weights) store an input size: the network runs smaller than
    the frame and the engine's labels come back at the frame's size; the reference must too."""
    from dataclasses import replace

    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    model.config = replace(model.config, input_size=(48, 0))  # 64x96 frames -> a 48x72 network
    checkpoint = save_model(tmp_path / "sized.safetensors", model)
    write_frames(tmp_path / "frames", 3)
    report = tmp_path / "report.json"
    code = gpu_check.main([str(tmp_path / "frames"), "--checkpoint", str(checkpoint), "--device", "cpu",
                           "--batches", "2", "3", "--json", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(report.read_text())
    assert result["frame_size"] == [64, 96] and result["network_size"] == [48, 72]
    assert result["overall"] == 1.0 and len(result["frames"]) == 3
    assert [(row["batch"], row["agreement"], row["agreement_with_batch_1"], row["passed"])
            for row in result["batches"]] == [(2, 1.0, 1.0, True), (3, 1.0, 1.0, True)]
    assert "network 48x72" in printed and "batch 3: 100.0000 % of pixels agree with eager fp32" in printed
    # the reference really is the eager model at the network size, upsampled to the frame
    frame = cv2.cvtColor(cv2.imread(str(min((tmp_path / "frames").iterdir()))), cv2.COLOR_BGR2RGB)
    engine = SegmentationEngine.from_checkpoint(checkpoint, device="cpu")
    reference = gpu_check.reference_labels(model.eval(), engine, frame, "sub124")
    assert reference.shape == (64, 96) and np.array_equal(reference, engine.segment(frame).labels)


@pytest.mark.slow
def test_gpu_check_on_the_real_cityscapes_frames(tmp_path):
    folder = SHARED_DATA / "cityscapes_val9"
    if not folder.is_dir():
        pytest.skip(f"real data not present at {folder} (see shared/data/README.md)")
    model = trained_bn_model(keep_rate=0.25, num_classes=19, class_map="cityscapes")
    checkpoint = save_model(tmp_path / "m.safetensors", model)
    args = gpu_check.build_parser().parse_args([str(folder), "--checkpoint", str(checkpoint), "--device", "cpu"])
    report = gpu_check.check(args)
    assert len(report["frames"]) == 9 and report["overall"] >= 0.999


def test_class_map_palette_is_padded_for_extra_classes():
    camvid = load_class_map("camvid")
    engine = SegmentationEngine(ICNet(ModelConfig(num_classes=13, keep_rate=0.25, class_map="camvid")).eval(),
                                device="cpu")
    assert engine._palette.shape == (13, 3) and camvid.num_classes < 13


def test_plan_keys_the_forward_by_shape_not_by_outputs(engine):
    frame = scene(64, 96)
    _, _, plan = engine._plan(frame, "rgb", True, False, False)
    assert plan == engine._plan(scene(64, 96, seed=1), "rgb", True, False, False)[2]  # content is no key
    same_forward = [engine._plan(frame, "rgb", *outputs)[2] for outputs in
                    [(True, True, False), (False, False, True), (True, True, True)]]
    assert {p.forward_key for p in same_forward} == {plan.forward_key}
    assert [p.stages for p in same_forward] == [("labels", "color"), ("labels", "color", "overlay"),
                                                ("labels", "color", "overlay")]
    variants = {plan.forward_key, engine._plan([frame, frame], "rgb", True, False, False)[2].forward_key,
                engine._plan(frame, "bgr", True, False, False)[2].forward_key,
                engine._plan(scene(64, 128), "rgb", True, False, False)[2].forward_key}
    try:
        engine.branch = "sub4"
        variants.add(engine._plan(frame, "rgb", True, False, False)[2].forward_key)
        engine.branch, engine.precision = "sub124", "bf16"
        variants.add(engine._plan(frame, "rgb", True, False, False)[2].forward_key)
        engine.precision, engine.input_size = "fp32", (48, 64)
        resized = engine._plan(frame, "rgb", True, False, False)[2]
        variants.add(resized.forward_key)
    finally:
        engine.branch, engine.precision, engine.input_size = "sub124", "fp32", None
    assert resized.network_size == (48, 64) and (resized.height, resized.width) == (64, 96)
    assert len(variants) == 7


# --- submit / collect and prepare --------------------------------------------------------------------
@pytest.mark.parametrize("runner", ["cpu", "cuda"])
def test_submitted_calls_can_be_collected_in_any_order(engine, runner, monkeypatch):
    """On the CPU submit does the work, so any order is easy; "cuda" runs the CUDA runner on an
    asynchronous stand-in of torch.cuda (fake_cuda.py: uploads and computes run as early as they may,
    downloads only when collected), where three calls in flight share two lanes of buffers: a frame
    whose compute overwrote an earlier call's outputs before they were downloaded would show here."""
    frames = [scene(48, 64, seed=s) for s in range(3)]
    expected = [engine.segment(frame, color=True).labels for frame in frames]
    expected_bgr = [engine.segment(frame, channel_order="bgr", labels=False, overlay=True).overlay
                    for frame in frames[:2]]
    with contextlib.ExitStack() as stack:
        if runner == "cuda":
            from fake_cuda import LateWork, install

            from icnet_ros.inference.cuda import CudaRunner

            fake = install(monkeypatch, CudaRunner)
            monkeypatch.setattr(engine, "_runner", CudaRunner(torch.device("cpu"), engine.stages))
            fake.eager = {engine._runner.upload_stream, engine._runner.compute_stream}
            stack.enter_context(LateWork(fake))
        handles = [engine.submit(frame, color=True) for frame in frames]
        results = [engine.collect(handle) for handle in reversed(handles)][::-1]
        for seg, labels in zip(results, expected):
            assert isinstance(seg, Segmentation) and np.array_equal(seg.labels, labels)
            assert np.array_equal(seg.color, colorize(labels, engine.class_map.palette()))
        with pytest.raises(ValueError, match="already collected"):
            engine.collect(handles[0])
        batch = engine.collect(engine.submit([frames[0], frames[1]], channel_order="bgr", labels=False,
                                             overlay=True))
    assert [seg.labels for seg in batch] == [None, None] and batch[1].overlay.shape == (48, 64, 3)
    assert all(np.array_equal(seg.overlay, reference) for seg, reference in zip(batch, expected_bgr))


def test_prepare_hands_the_runner_the_plan_of_the_outputs_named(engine, monkeypatch):
    prepared = []
    monkeypatch.setattr(engine._runner, "prepare", prepared.append)
    engine.prepare(48, 64, batch=2, channel_order="bgr", outputs=("labels", "overlay"))
    (plan,) = prepared
    assert (plan.batch, plan.height, plan.width, plan.channel_order) == (2, 48, 64, "bgr")
    assert plan.outputs == ("labels", "overlay") and plan.stages == ("labels", "color", "overlay")
    for bad in ((), ("labels", "depth")):
        with pytest.raises(ValueError, match="outputs must name"):
            engine.prepare(48, 64, outputs=bad)


def test_the_runners_do_not_import_the_engine():
    """cuda.py, graphs.py, plan.py and tensorrt.py get callables and Plans: no import cycle with engine.py."""
    import ast

    folder = Path(engine_module.__file__).parent
    for name in ("cuda.py", "graphs.py", "plan.py", "tensorrt.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "icnet_ros.inference.engine" not in imported, name
