"""Spatial sparsity (model/sparsity.py): fast inference is the classic one where computed, the
labels always cover the frame, and the sparsity term is the paper's formula."""
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import trained_bn_model
from test_training import train_command, write_tiny_cityscapes

from icnet_ros.evaluation.sparsity_table import conv_gmacs
from icnet_ros.inference.engine import SegmentationEngine
from icnet_ros.model.checkpoint import load_model, read_checkpoint, save_model
from icnet_ros.model.icnet import ICNet, ModelConfig
from icnet_ros.model.sparsity import (
    RegionGrid,
    compose,
    region_fine_logits,
    run_trunk,
    sparse_logits,
    sparsity_loss,
)
from icnet_ros.paths import asset_path


@functools.cache  # built once per test run; tests only read it
def gated_model(region_size=64, spread=3.0) -> ICNet:
    """A gated network with trained-looking BN statistics and region weights spread over (0, 1)."""
    torch.manual_seed(0)  # the same network whichever test builds it first
    source = trained_bn_model()
    model = ICNet(ModelConfig(**{**source.config.__dict__, "gate_region_size": region_size}))
    model.load_state_dict(source.state_dict(), strict=False)
    with torch.no_grad():
        model.region_gate.score.weight.normal_(0, spread / 100)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Sizes with whole and partial regions, one region only, and more rows than columns.
SIZES = [(128, 256), (200, 136), (64, 64), (96, 200)]


@pytest.mark.parametrize("height,width", SIZES)
def test_every_region_computed_fast_equals_classic_gated_inference(height, width):
    model = gated_model()
    image = torch.randn(2, 3, height, width)
    with torch.no_grad():
        classic = model.branch_logits(image, "sub124")
        fast = sparse_logits(model, image, regions=10_000)
        weights = torch.sigmoid(run_trunk(model, image).scores)
    assert 0.02 < float(weights.min()) and float(weights.max()) < 0.98, "the blend must be exercised"
    assert fast.chosen.all()
    assert relative_error(fast.logits, classic) < 1e-5


@pytest.mark.parametrize("height,width", SIZES)
def test_every_region_computed_by_entropy_equals_the_released_network(height, width):
    model = trained_bn_model()  # no gate: computed regions take sub124 alone
    image = torch.randn(1, 3, height, width)
    with torch.no_grad():
        dense = model.branch_logits(image, "sub124")
        fast = sparse_logits(model, image, regions=10_000, selector="entropy", region_size=64)
    assert relative_error(fast.logits, dense) < 1e-5


def test_a_computed_region_does_not_depend_on_which_others_are_computed():
    model = gated_model()
    image = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        every = sparse_logits(model, image, 10_000)
        two = sparse_logits(model, image, 2)
        none = sparse_logits(model, image, 0)
    block = 64 // 4
    for row in range(two.grid.rows):
        for col in range(two.grid.cols):
            piece = (slice(None), slice(None), slice(row * block, (row + 1) * block),
                     slice(col * block, (col + 1) * block))
            expected = every.logits if two.chosen[0, row, col] else none.logits
            assert relative_error(two.logits[piece], expected[piece]) < 1e-5
    assert int(two.chosen.sum()) == 2 and not none.chosen.any()


def test_regions_are_picked_by_score_winner_take_all():
    model = gated_model()
    image = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        trunk = run_trunk(model, image)
        result = sparse_logits(model, image, 3)
    for scores, chosen in zip(trunk.scores, result.chosen):
        assert set(scores.flatten().topk(3).indices.tolist()) == set(chosen.flatten().nonzero()[:, 0].tolist())


def test_composing_any_k_from_all_regions_equals_running_that_k():
    model = gated_model()
    image = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        trunk = run_trunk(model, image)
        order = trunk.scores.flatten(1).argsort(dim=1, descending=True)
        fine = region_fine_logits(model, image, trunk, order)
        for k in (1, 3, 8):
            assert relative_error(compose(trunk, order[:, :k], fine[:k]).logits,
                                  sparse_logits(model, image, k).logits) < 1e-6


def test_every_k_gives_the_full_label_image_from_the_engine():
    model = gated_model()
    engine = SegmentationEngine(model, device="cpu", input_size=None, high_res_regions=1)
    frame = np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    total = RegionGrid(128, 256, 64).count
    dense_engine = SegmentationEngine(model, device="cpu", input_size=None)
    dense = dense_engine.segment(frame).labels
    for k in range(total + 1):
        engine.high_res_regions = k
        result = engine.segment(frame, color=True, overlay=True)
        assert result.labels.shape == (128, 256) and result.color.shape == (128, 256, 3)
        assert result.labels.max() < model.config.num_classes
        assert (result.regions_computed, result.regions_total) == ((k, total) if k else (0, 0))
    assert np.mean(result.labels == dense) > 0.999  # k = N: the classic inference


def test_engine_runs_sparse_at_a_multiple_of_8_and_refuses_what_it_cannot_run():
    engine = SegmentationEngine(gated_model(), device="cpu", input_size=None, high_res_regions=2)
    result = engine.segment(np.zeros((100, 130, 3), np.uint8))
    assert result.labels.shape == (100, 130) and result.network_size == (104, 128)
    assert result.regions.shape == (2, 2) and result.region_size == 64
    with pytest.raises(ValueError, match="sub24 head"):
        sparse_logits(ICNet(ModelConfig(num_classes=3, aux_heads=False)).eval(), torch.zeros(1, 3, 64, 64), 1)
    with pytest.raises(ValueError, match="high_res_regions must be 0"):
        engine.high_res_regions = -1
    with pytest.raises(ValueError, match="no gate"):
        SegmentationEngine(trained_bn_model(), device="cpu", high_res_regions=2, region_selector="gate")


def test_regions_set_at_runtime_carry_the_gates_region_size_and_a_failed_call_leaks_none():
    engine = SegmentationEngine(gated_model(region_size=32), device="cpu", input_size=None)  # dense at first
    frame = np.random.default_rng(1).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    engine.high_res_regions = 2
    result = engine.segment(frame)
    assert result.region_size == 32 and result.regions.shape == (4, 8) and result.regions_computed == 2
    real_labels = engine.stages.labels

    def failing_labels(*args):  # a failure after the sparse forward (say, out of memory in postprocess)
        raise RuntimeError("out of memory")

    object.__setattr__(engine.stages, "labels", failing_labels)
    with pytest.raises(RuntimeError):
        engine.segment(frame)
    object.__setattr__(engine.stages, "labels", real_labels)
    engine.high_res_regions = 0
    assert engine.segment(frame).regions is None  # the failed call's regions went nowhere


def test_a_gated_model_is_not_pruned_silently():
    from icnet_ros.model.prune import prune_model

    with pytest.raises(ValueError, match="spatial-sparsity gate"):
        prune_model(ICNet(ModelConfig(keep_rate=0.5, gate_region_size=64)), 0.25)


def test_sparse_costs_fewer_multiply_adds_the_fewer_regions_it_computes():
    model = ICNet(ModelConfig(num_classes=11, keep_rate=0.5, gate_region_size=256))
    dense = conv_gmacs(model, 1024, 2048, None)
    sparse = [conv_gmacs(model, 1024, 2048, k) for k in (32, 16, 8, 4, 0)]
    assert sparse == sorted(sparse, reverse=True)
    assert dense / sparse[2] > 1.2  # N/4 regions, as the released network is wired
    assert sparse[0] < 1.1 * dense  # every region: the margins of context cost under 10 %


def test_sparsity_loss_is_the_papers_formula_on_hand_computed_cases():
    # Two images of two regions; sigmoid(0) = 0.5, sigmoid(log 3) = 0.75, sigmoid(-log 3) = 0.25.
    scores = torch.tensor([[[0.0, math.log(3)]], [[-math.log(3), -math.log(3)]]])
    q_old = torch.tensor(0.4)
    loss, q_next = sparsity_loss(scores, q_old, target=0.25, weight=2.0, momentum=0.9)
    r = [0.625, 0.25]  # Eq. 4: each image's mean activation
    q = [0.9 * 0.4 + 0.1 * ri for ri in r]  # Eq. 2
    expected = 2.0 * sum(-0.25 * math.log(qi) - 0.75 * math.log(1 - qi) for qi in q) / 2  # Eq. 1
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert q_next.item() == pytest.approx(0.9 * 0.4 + 0.1 * (0.625 + 0.25) / 2, rel=1e-6)
    at_target, _ = sparsity_loss(torch.zeros(1, 1, 1), torch.tensor(0.5), target=0.5, weight=1.0)
    assert at_target.item() == pytest.approx(math.log(2), rel=1e-6)  # minimum: the entropy of p


def test_sparsity_loss_pulls_the_activation_towards_the_target():
    scores = torch.zeros(1, 2, 2, requires_grad=True)  # activation 0.5
    loss, _ = sparsity_loss(scores, torch.tensor(0.5), target=0.25, weight=1.0)
    loss.backward()
    assert (scores.grad > 0).all()  # descending lowers the scores, hence the activation
    with pytest.raises(ValueError, match="gate_target_active"):
        sparsity_loss(scores, torch.tensor(0.5), target=1.0, weight=1.0)


def test_checkpoints_record_the_gate_and_old_checkpoints_load_without_one(tmp_path):
    gated = gated_model(region_size=128)
    save_model(tmp_path / "gated.safetensors", gated)
    config, state, _ = read_checkpoint(tmp_path / "gated.safetensors")
    assert config.gate_region_size == 128 and "region_gate.score.weight" in state
    loaded = load_model(tmp_path / "gated.safetensors")
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded.branch_logits(image), gated.branch_logits(image))
    plain = load_model(asset_path("camvid_keep0.25.safetensors"))  # not cwd-relative: ctest runs in the build dir
    assert plain.config.gate_region_size == 0 and plain.region_gate is None
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig(gate_region_size=100)


def test_training_adds_a_gate_to_an_ungated_model_and_moves_its_moving_average(tmp_path):
    data = write_tiny_cityscapes(tmp_path / "data")
    subprocess.run(train_command(data, tmp_path / "plain", iterations=2), check=True, capture_output=True)
    gate = [f"init_from={tmp_path / 'plain' / 'model.safetensors'}", "gate_region_size=32",
            "gate_target_active=0.25", "gate_sparsity_weight=1.0"]
    subprocess.run(train_command(data, tmp_path / "gated", iterations=4, extra=gate), check=True, capture_output=True)
    plain, gated = (read_checkpoint(tmp_path / name / "model.safetensors") for name in ("plain", "gated"))
    assert plain[0].gate_region_size == 0 and gated[0].gate_region_size == 32
    # the moving average q is model state: a resumed run (which restores the model's state) continues it
    assert gated[1]["region_gate.active_mean"].item() != 0.25


def test_the_sparsity_table_runs_on_the_command_line(tmp_path):
    save_model(tmp_path / "gated.safetensors", gated_model(region_size=64))
    result = subprocess.run([sys.executable, "-m", "icnet_ros.evaluation.sparsity_table", "--gated",
                             str(tmp_path / "gated.safetensors"), "--sizes", "128x256", "--keep-rates", "0.25",
                             "--repeats", "1", "--json", str(tmp_path / "table.json")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| 0.25 | 128x256 | 2/8 |" in result.stdout


def test_evaluation_scores_what_fast_inference_computes():
    from icnet_ros.evaluation.evaluate import SparseRegions, predict_branches

    model = gated_model()
    image = np.random.default_rng(3).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    dense = predict_branches(model, image, ["sub124"], "cpu")["sub124"]
    every = predict_branches(model, image, ["sub124"], "cpu", sparse=SparseRegions(10_000))["sub124"]
    none = predict_branches(model, image, ["sub124"], "cpu", sparse=SparseRegions(0))["sub124"]
    assert every.shape == none.shape == (128, 256)
    assert (every == dense).float().mean() > 0.999 and (none != dense).any()


# --- the quarter-size sub4 variant's measurement (evaluation/quarter_variant.py) -------------------
def test_the_quarter_variant_estimate_is_sub124_where_computed_and_sub4_elsewhere():
    from icnet_ros.evaluation.quarter_variant import oracle_ranking, sub4_trunk

    model = trained_bn_model().eval()
    image = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        trunk = sub4_trunk(model, image, 64)
        order = trunk.scores.flatten(1).argsort(dim=1, descending=True)
        fine = region_fine_logits(model, image, trunk, order)
        every = compose(trunk, order, fine).logits
        none = compose(trunk, order[:, :0], None).logits
        dense = model.branch_logits(image, "sub124")
        sub4 = torch.nn.functional.interpolate(model.branch_logits(image, "sub4"), dense.shape[-2:],
                                               mode="bilinear", align_corners=True)
        # the oracle ranks first the region whose sub124 corrects the most labelled pixels of sub4
        target = torch.nn.functional.interpolate(dense, (128, 256), mode="bilinear", align_corners=True).argmax(1)[0]
        target[:, :64] = 255  # the first column of regions is unlabelled: computing them gains nothing
        ranking = oracle_ranking(trunk, fine, order, target, 255)
    assert trunk.grid.count == 8
    assert relative_error(every, dense) < 1e-5
    assert relative_error(none, sub4) < 1e-5
    def right(position):
        logits = compose(trunk, order[:, [position]], fine[[position]]).logits
        labels = torch.nn.functional.interpolate(logits, (128, 256), mode="bilinear", align_corners=True).argmax(1)[0]
        return int(((labels == target) & (target != 255)).sum())

    gains = [right(position) for position in ranking.tolist()]
    assert gains == sorted(gains, reverse=True) and gains[0] > gains[-1]
    assert int(order[0, ranking[0]]) % trunk.grid.cols != 0  # an unlabelled region never leads


def test_the_receptive_field_is_what_one_half_path_cell_depends_on():
    from icnet_ros.evaluation.quarter_variant import receptive_field

    model = trained_bn_model().eval()
    side = receptive_field(model)
    chain = torch.nn.Sequential(model.stem, model.stage2, model.stage3_1)
    image = torch.randn(1, 3, 257, 257)
    with torch.no_grad():
        cell = chain(image)[0, :, 16, 16]  # the centre cell of the 33x33 output
        # its window is centred on input pixel 128 (16 cells of 8 pixels): just outside it, nothing matters
        outside = image.clone()
        outside[..., 128 + side // 2 + 1:, :] = 0
        assert torch.equal(chain(outside)[0, :, 16, 16], cell)
        inside = image.clone()
        inside[..., 128 + side // 2 - 1:, :] = 0
        assert not torch.equal(chain(inside)[0, :, 16, 16], cell)


def test_a_quarter_variant_crop_gives_the_dense_half_path_cells_it_claims():
    """The crop the cost is counted on really computes F_sub2 exactly over the F_24 cells it serves."""
    from icnet_ros.evaluation.quarter_variant import RegionCrops

    model = trained_bn_model().eval()
    crops = RegionCrops.for_model(model, 64)
    chain = torch.nn.Sequential(model.stem, model.stage2, model.stage3_1)
    half = torch.randn(1, 3, 256, 256)
    first = 6  # the region's first F_24 cell: its crop starts half_lead pixels before 8 * first
    start = 8 * first - crops.half_lead
    with torch.no_grad():
        dense = chain(half)[..., first:first + crops.f_24, first:first + crops.f_24]
        crop = half[..., start:start + crops.half_image, start:start + crops.half_image]
        offset = crops.f_sub2_offset
        cells = chain(crop)[..., offset:offset + crops.f_24, offset:offset + crops.f_24]
    torch.testing.assert_close(cells, dense, rtol=1e-5, atol=1e-5)


def test_the_quarter_variant_costs_less_with_fewer_regions_and_runs_on_the_command_line(tmp_path):
    save_model(tmp_path / "m.safetensors", trained_bn_model())
    result = subprocess.run([sys.executable, "-m", "icnet_ros.evaluation.quarter_variant", "--model",
                             str(tmp_path / "m.safetensors"), "--size", "256x512", "--region-size", "128",
                             "--keep-rates", "0.25", "--repeats", "1", "--json", str(tmp_path / "q.json")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads((tmp_path / "q.json").read_text())["cost"]
    assert [row["regions"] for row in rows] == [8, 4, 2, 1, 0]
    gmacs = [row["gmacs"] for row in rows]
    assert gmacs == sorted(gmacs, reverse=True) and rows[-1]["dense_gmacs"] > gmacs[-1]
    assert "| 0.25 | 256x512 | 2/8 |" in result.stdout
