"""Set-valued targets: a coarser data set's labels teach a finer model (partial-label loss), data
sets mixed into every batch, a model re-headed for another class map, and scoring across maps."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.classmap import load_class_map, load_label_map
from icnet_ros.config import load_config
from icnet_ros.evaluation.metrics import ConfusionMatrix
from icnet_ros.model import ICNet, ModelConfig
from icnet_ros.model.checkpoint import read_checkpoint, save_model
from icnet_ros.model.loss import CascadeLoss, set_cross_entropy
from icnet_ros.training.config import TrainConfig
from icnet_ros.training.targets import build_vocabulary
from icnet_ros.training.trainer import IterationBatches, model_with_classes_from

REPO = Path(__file__).resolve().parents[1]
CITYSCAPES, CAMVID = load_class_map("cityscapes"), load_class_map("camvid")


def test_cityscapes_vocabulary_has_camvid_classes_as_sets():
    vocabulary, luts = build_vocabulary(CITYSCAPES, ["cityscapes_to_camvid"])
    assert vocabulary.num_targets == 19 + 11 and vocabulary.has_sets
    def members(target):
        return {CITYSCAPES.names[c] for c in np.flatnonzero(vocabulary.members[target])}

    lut = luts["cityscapes_to_camvid"]
    assert members(lut[CAMVID.index("building")]) == {"building", "wall"}
    assert members(lut[CAMVID.index("sign_symbol")]) == {"traffic_light", "traffic_sign"}
    assert members(lut[CAMVID.index("tree")]) == {"vegetation", "terrain"}
    assert members(lut[CAMVID.index("car")]) == {"car", "truck", "bus", "train"}
    assert members(lut[CAMVID.index("bicyclist")]) == {"rider", "motorcycle", "bicycle"}
    assert members(lut[CAMVID.index("road")]) == {"road"}
    assert lut[CAMVID.ignore_index] == CITYSCAPES.ignore_index
    assert vocabulary.names[lut[CAMVID.index("tree")]] == "camvid:tree"
    assert members(CITYSCAPES.index("wall")) == {"wall"}  # the model's own classes stay exact


def test_a_label_map_from_another_class_map_is_refused():
    with pytest.raises(ValueError, match="source is 'camvid'"):
        build_vocabulary(CAMVID, ["cityscapes_to_camvid"])


def test_set_loss_of_single_classes_is_plain_cross_entropy():
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :2] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    members = torch.eye(5, dtype=torch.bool)
    for w in (None, weight):
        expected = F.cross_entropy(logits, target, weight=w, ignore_index=255)
        assert torch.allclose(set_cross_entropy(logits, target, members, w, 255), expected, atol=1e-6)


def test_set_loss_is_minus_log_of_the_sets_summed_probability():
    # one pixel, three classes with probabilities 0.2, 0.3, 0.5; target 1 is the set {0, 2}
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5])).reshape(1, 3, 1, 1)
    members = torch.tensor([[False, True, False], [True, False, True]])
    loss = set_cross_entropy(logits, torch.tensor([[[1]]]), members)
    assert torch.isclose(loss, -torch.log(torch.tensor(0.7)), atol=1e-6)
    # a weighted mean over two pixels, as cross-entropy's: (2 * -log 0.7 + 1 * -log 0.3) / 3
    logits2 = logits.repeat(1, 1, 1, 2)
    loss = set_cross_entropy(logits2, torch.tensor([[[1, 0]]]), members, torch.tensor([1.0, 2.0]))
    expected = (2 * -np.log(0.7) + 1 * -np.log(0.3)) / 3
    assert abs(loss.item() - expected) < 1e-6


def test_a_set_target_is_satisfied_by_any_of_its_classes():
    members = torch.tensor([[True, False, False], [False, True, True]])
    sure_of_one = torch.tensor([-10.0, 10.0, -10.0]).reshape(1, 3, 1, 1)
    sure_of_other = torch.tensor([-10.0, -10.0, 10.0]).reshape(1, 3, 1, 1)
    target = torch.tensor([[[1]]])
    for logits in (sure_of_one, sure_of_other):
        assert set_cross_entropy(logits, target, members).item() < 1e-6
    loss = CascadeLoss({"sub124": 1.0}, target_sets=members)
    assert loss({"sub124": sure_of_other}, target)[0].item() < 1e-6


def test_mixed_batches_hold_each_source_at_fixed_positions_and_resume_exactly():
    batches = list(IterationBatches([10, 4], [3, 1], 8, seed=0))
    for batch in batches:
        assert [source for source, _, _, _ in batch] == [0, 0, 0, 1]
        assert [position for _, _, _, position in batch] == [0, 1, 2, 3]
    second = [index for batch in batches for source, index, _, _ in batch if source == 1]
    assert sorted(second[:4]) == sorted(second[4:]) == [0, 1, 2, 3]  # every mixed sample once per epoch
    assert list(IterationBatches([10, 4], [3, 1], 8, seed=0, start=5)) == batches[5:]
    ranks = [list(IterationBatches([10, 4], [3, 1], 8, seed=0, rank=r, world=2)) for r in range(2)]
    assert all(ranks[0][i] + ranks[1][i] == batches[i] for i in range(8))
    # the main source's batches are those of a single-source run with its share of the batch
    single = list(IterationBatches(10, 3, 8, seed=0))
    assert [[k[1] for k in b[:3]] for b in batches] == [[k[1] for k in b] for b in single]


def _camvid_model(path: Path) -> ICNet:
    model = ICNet(ModelConfig(num_classes=CAMVID.num_classes, keep_rate=0.25, class_map="camvid"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "classifier" in name:
                parameter.normal_()
    save_model(path, model.eval())
    return model


def test_a_model_re_headed_through_a_label_map_starts_at_the_old_models_answers(tmp_path):
    old = _camvid_model(tmp_path / "camvid.safetensors")
    new = model_with_classes_from(str(tmp_path / "camvid.safetensors"), "cityscapes_to_camvid", CITYSCAPES).eval()
    assert new.config.class_map == "cityscapes" and new.config.num_classes == 19
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        old_probs = {b: v.softmax(1) for b, v in old.all_branch_logits(image).items()}
        new_probs = {b: v.softmax(1) for b, v in new.all_branch_logits(image).items()}
    lut = load_label_map("cityscapes_to_camvid").lut[:19]
    for branch in ("sub4", "sub24", "sub124"):
        summed = torch.zeros_like(old_probs[branch])
        summed.index_add_(1, torch.from_numpy(lut), new_probs[branch])
        assert torch.allclose(summed, old_probs[branch], atol=1e-5), branch


def test_training_data_mixes_camvid_sets_with_exact_labels_and_records_its_provenance(tmp_path):
    camvid = tmp_path / "camvid"
    for split in ("train", "test"):
        (camvid / split).mkdir(parents=True)
        (camvid / f"{split}annot").mkdir()
        lines = []
        for i in range(3):
            label = np.full((48, 64), CAMVID.index("building"), np.uint8)
            label[24:] = CAMVID.index("road")
            cv2.imwrite(str(camvid / split / f"f{i}.png"), np.stack([label * 20] * 3, -1))
            cv2.imwrite(str(camvid / f"{split}annot" / f"f{i}.png"), label)
            lines.append(f"/SegNet/CamVid/{split}/f{i}.png /SegNet/CamVid/{split}annot/f{i}.png")
        (camvid / f"{split}.txt").write_text("\n".join(lines) + "\n")
    synthetic = tmp_path / "synthetic"
    (tmp_path / "mix.yaml").write_text("truck: 0\n")
    subprocess.run([sys.executable, "-m", "icnet_ros.data.synthetic", "--out", str(synthetic), "--splits", "train=2",
                    "--height", "48", "--width", "96", "--object-mix", str(tmp_path / "mix.yaml")],
                   check=True, capture_output=True)
    _camvid_model(tmp_path / "camvid.safetensors")
    out = tmp_path / "run"
    mix = json.dumps([{"dataset": "cityscapes", "data_root": str(synthetic), "split": "train", "per_batch": 1}])
    command = [sys.executable, "-m", "icnet_ros.training.cli", "--config", str(REPO / "config/train/cityscapes_cpu.yaml"),
               f"data_root={camvid}", "train_split=train", f"mix={mix}", f"init_from={tmp_path / 'camvid.safetensors'}",
               f"out_dir={out}", "iterations=2", "batch_size=2", "crop_size=[32, 32]", "image_size=null",
               "val_every=2", "checkpoint_every=2", "threads=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config, _, provenance = read_checkpoint(out / "model.safetensors")
    assert config.class_map == "cityscapes" and config.num_classes == 19
    assert [(d["dataset"], d["label_sets"], d["per_batch"]) for d in provenance["data"]] == [
        ("camvid", "cityscapes_to_camvid", 1), ("cityscapes", None, 1)]
    # the generated drives say how they were made; real frames say nothing more
    assert "generated" not in provenance["data"][0]
    assert provenance["data"][1]["generated"] == {"frames": 2, "seed": 0, "height": 48, "width": 96, "city": "synth",
                                                  "object_mix": {"truck": 0.0}}
    assert provenance["init_from_provenance"] is not None and provenance["iteration"] == 2
    assert "camvid:building" in provenance["targets"]
    # validation scored the 19-class predictions as CamVid's classes
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(metrics["sub124"]["iou"]) == set(CAMVID.names)


def test_mix_sources_must_leave_room_for_the_main_data_set():
    from icnet_ros.training.trainer import batch_shares

    config = load_config(TrainConfig, REPO / "config/train/cityscapes_cpu.yaml")
    assert batch_shares(config) == [6, 2]
    with pytest.raises(ValueError, match="main data set needs at least one"):
        batch_shares(load_config(TrainConfig, REPO / "config/train/cityscapes_cpu.yaml", ["batch_size=2"]))


def test_predictions_mapped_to_the_labels_classes_are_scored_there():
    from icnet_ros.evaluation.evaluate import evaluate

    model = ICNet(ModelConfig(num_classes=19, keep_rate=0.25, class_map="cityscapes", aux_heads=False)).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[CITYSCAPES.index("wall")] = 5.0  # predicts wall everywhere
    label = np.full((32, 48), CAMVID.index("building"), np.uint8)
    dataset = [{"image": np.zeros((32, 48, 3), np.uint8), "label": label, "path": "x"}]
    lut = load_label_map("cityscapes_to_camvid").lut[:19]
    report = evaluate(model, dataset, CAMVID, progress=False, prediction_lut=lut)
    assert report["sub124"]["iou"]["building"] == 1.0  # wall is a CamVid building
    matrix = ConfusionMatrix(19)
    matrix.update(torch.from_numpy(label.astype(np.int64)), torch.full(label.shape, CITYSCAPES.index("wall")))
    assert matrix.report(CITYSCAPES.names)["miou"] == 0.0  # unmapped, the same answer scores nothing


def test_a_label_map_leaving_a_class_unmapped_cannot_score_or_start_predictions():
    from icnet_ros.classmap import ClassMapError, LabelMap

    label_map = load_label_map("cityscapes_to_camvid")
    lut = label_map.lut.copy()
    lut[CITYSCAPES.index("terrain")] = CAMVID.ignore_index  # "terrain: null"
    with_null = LabelMap("with_null", label_map.source, label_map.target, lut)
    with pytest.raises(ClassMapError, match=r"maps \['terrain'\] to nothing; validation needs"):
        with_null.prediction_lut("validation")
    assert np.array_equal(label_map.prediction_lut("validation"), label_map.lut[:19])
    # as sets for a split bound, a class mapped to nothing is in no set, not in a set of the unmapped
    sets = with_null.source_sets()
    assert sets[CITYSCAPES.index("terrain")] == -1
    assert sets[CITYSCAPES.index("vegetation")] == CAMVID.index("tree")
    assert np.array_equal(label_map.source_sets(), label_map.lut[:19])


def test_init_classes_from_without_a_checkpoint_is_refused():
    from icnet_ros.training.trainer import initial_model

    config = load_config(TrainConfig, REPO / "config/train/cityscapes_cpu.yaml", ["init_from="])
    with pytest.raises(ValueError, match="init_from is empty"):
        initial_model(config, CITYSCAPES)
