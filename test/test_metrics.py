"""Metrics: our mIoU must equal cityscapesScripts' pixel-level evaluation on the same predictions."""
import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from icnet_ros.classmap import load_class_map
from icnet_ros.evaluation.metrics import ConfusionMatrix


def test_confusion_matrix_iou_and_accuracy_by_hand():
    matrix = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([0, 0, 1, 1, 255, 2])
    prediction = torch.tensor([0, 1, 1, 1, 0, 0])
    matrix.update(target, prediction)
    iou = matrix.iou()
    assert np.allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert math.isclose(matrix.pixel_accuracy(), 3 / 5)
    report = matrix.report(["a", "b", "c"])
    assert math.isclose(report["miou"], (1 / 3 + 2 / 3 + 0) / 3)


def test_classes_absent_everywhere_are_left_out_of_the_mean():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    report = matrix.report(["a", "b", "c"])
    assert report["iou"]["c"] is None and report["miou"] == 1.0


def test_miou_labelled_leaves_out_classes_only_predicted():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1]))  # class 2 predicted, never labelled
    report = matrix.report(["a", "b", "c"])
    assert report["iou"]["c"] == 0.0 and math.isclose(report["miou"], (1 / 2 + 1 + 0) / 3)
    assert math.isclose(report["miou_labelled"], (1 / 2 + 1) / 2)


def test_splitting_sets_perfectly_moves_only_confusions_inside_a_set():
    # a, b form one set, c another, d and e none: a<->b confusions become right, a<->c and d<->e stay wrong
    matrix = ConfusionMatrix(5)
    matrix.update(torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4]), torch.tensor([0, 1, 2, 0, 1, 0, 3, 4, 3]))
    bound = matrix.split_within_sets(np.array([0, 0, 1, -1, -1]))
    assert bound.matrix.tolist() == [[2, 0, 1, 0, 0], [0, 2, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1],
                                     [0, 0, 0, 1, 0]]
    assert bound.matrix.sum() == matrix.matrix.sum() and matrix.matrix[0, 1] == 1  # the original is kept
    assert bound.report("abcde")["miou_labelled"] > matrix.report("abcde")["miou_labelled"]
    with pytest.raises(ValueError, match="one set per class"):
        matrix.split_within_sets(np.array([0, 0, 1]))


def test_evaluate_reports_the_split_bound_of_a_label_map(tmp_path, capsys):
    import json

    from conftest import trained_bn_model

    from icnet_ros.data.synthetic import make_drives
    from icnet_ros.evaluation.cli import main
    from icnet_ros.model.checkpoint import save_model

    make_drives(tmp_path / "data", {"val": 1}, 64, 128)
    checkpoint = save_model(tmp_path / "m.safetensors", trained_bn_model(num_classes=19, class_map="cityscapes"))
    args = [str(checkpoint), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"), "--split", "val",
            "--branches", "sub124", "--json", str(tmp_path / "r.json")]
    assert main(args + ["--split-bound", "cityscapes_to_camvid"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["branches"]["sub124"]
    assert "every set split perfectly" in capsys.readouterr().out
    # a class that is a set of its own keeps its IoU; a merged one gains what its set's members confused
    for alone in ("road", "sky", "sidewalk"):
        assert report["split_bound"]["iou"][alone] == report["iou"][alone]
    assert report["split_bound"]["iou"]["car"] >= report["iou"]["car"]
    # right up to the set is the same as right after mapping both to CamVid's classes
    assert main(args + ["--label-map", "cityscapes_to_camvid"]) == 0
    mapped = json.loads((tmp_path / "r.json").read_text())["branches"]["sub124"]
    assert report["split_bound"]["pixel_acc"] == pytest.approx(mapped["pixel_acc"])
    # the bound needs scores in the label map's source classes, not in its coarser ones
    assert main(args + ["--split-bound", "cityscapes_to_camvid", "--label-map", "cityscapes_to_camvid"]) == 1
    assert "--split-bound cityscapes_to_camvid splits 'cityscapes' classes" in capsys.readouterr().err


def _scene(rng, height=64, width=128):
    """Raw Cityscapes label ids in blocks, with some void ids, and a noisy train-id prediction."""
    class_map = load_class_map("cityscapes")
    raw_ids = np.array([0, 4, 7, 8, 11, 17, 19, 20, 21, 23, 24, 26, 33])
    gt = rng.choice(raw_ids, size=(height // 8, width // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    train = class_map.source_to_class_lut()[gt].astype(np.int64)
    prediction = np.where(rng.random(train.shape) < 0.7, train, rng.integers(0, 19, train.shape))
    prediction[train == 255] = rng.integers(0, 19, (train == 255).sum())
    return gt, train, prediction


def test_miou_equals_cityscapesscripts_pixel_level_evaluation(tmp_path):
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    class_map = load_class_map("cityscapes")
    to_label_ids = class_map.class_to_source_lut().astype(np.uint8)
    rng = np.random.default_rng(3)
    matrix = ConfusionMatrix(19)
    predictions, ground_truths = [], []
    for index in range(3):
        gt, train, prediction = _scene(rng)
        name = f"frankfurt_000000_{index:06d}"
        gt_path, pred_path = tmp_path / f"{name}_gtFine_labelIds.png", tmp_path / f"{name}_pred.png"
        cv2.imwrite(str(gt_path), gt)
        cv2.imwrite(str(pred_path), to_label_ids[prediction])
        ground_truths.append(str(gt_path))
        predictions.append(str(pred_path))
        matrix.update(torch.from_numpy(train), torch.from_numpy(prediction))
    args = evaluation.args
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
    args.exportFile = str(tmp_path / "result.json")
    results = evaluation.evaluateImgLists(predictions, ground_truths, args)
    ours = matrix.report(class_map.names)
    assert math.isclose(ours["miou"], results["averageScoreClasses"], rel_tol=1e-9)
    scores = {name.replace(" ", "_"): v for name, v in results["classScores"].items()}
    for name in class_map.names:
        ours_value, score = ours["iou"][name], scores[name]
        assert (ours_value is None and math.isnan(score)) or math.isclose(ours_value, score, rel_tol=1e-9)


def test_evaluate_cli_writes_a_json_report_per_branch(tmp_path, capsys):
    import json

    from conftest import trained_bn_model

    from icnet_ros.data.synthetic import make_drives
    from icnet_ros.evaluation.cli import main
    from icnet_ros.model.checkpoint import save_model

    make_drives(tmp_path / "data", {"val": 2}, 64, 128)
    checkpoint = save_model(tmp_path / "m.safetensors", trained_bn_model(num_classes=19, class_map="cityscapes"))
    assert main([str(checkpoint), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"),
                 "--split", "val", "--json", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "pred")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["branches"]) == {"sub4", "sub24", "sub124"}
    assert set(report["branches"]["sub124"]) == {"miou", "miou_labelled", "pixel_acc", "iou"}
    assert "traffic_light" in report["branches"]["sub4"]["iou"]
    predictions = sorted((tmp_path / "pred").glob("*.png"))
    assert len(predictions) == 2
    ids = set(np.unique(cv2.imread(str(predictions[0]), cv2.IMREAD_UNCHANGED)))
    assert ids <= set(load_class_map("cityscapes").class_to_source_lut().tolist())  # official label ids


def test_evaluate_scores_a_camvid_model_on_cityscapes_labels_through_a_label_map(tmp_path):
    import json

    from conftest import trained_bn_model

    from icnet_ros.classmap import load_label_map
    from icnet_ros.data.datasets import build_dataset
    from icnet_ros.data.synthetic import make_drives
    from icnet_ros.evaluation.cli import main
    from icnet_ros.model.checkpoint import save_model

    make_drives(tmp_path / "data", {"val": 1}, 64, 128)
    label_map = load_label_map("cityscapes_to_camvid")
    plain = build_dataset("cityscapes", tmp_path / "data", "val", label_map.source)[0]["label"]
    mapped = build_dataset("cityscapes", tmp_path / "data", "val", label_map.source, relabel=label_map.lut)[0]["label"]
    assert np.array_equal(mapped, label_map.lut[plain])
    assert set(np.unique(mapped)) <= set(range(11)) | {255}
    checkpoint = save_model(tmp_path / "m.safetensors", trained_bn_model(num_classes=11, class_map="camvid"))
    args = [str(checkpoint), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"), "--split", "val",
            "--json", str(tmp_path / "r.json")]
    assert main(args + ["--label-map", "cityscapes_to_camvid"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["branches"]["sub124"]["iou"]) == set(label_map.target.names)
    assert main(args) == 1  # 19-class labels against an 11-class model without a label map: refused


def test_evaluate_scores_a_cityscapes_model_in_camvid_classes_on_either_data_set(tmp_path):
    import json

    from conftest import trained_bn_model

    from icnet_ros.classmap import load_label_map
    from icnet_ros.data.datasets import build_dataset
    from icnet_ros.data.synthetic import make_drives
    from icnet_ros.evaluation.cli import main
    from icnet_ros.evaluation.evaluate import predict_branches
    from icnet_ros.evaluation.metrics import ConfusionMatrix
    from icnet_ros.model.checkpoint import load_model, save_model

    label_map = load_label_map("cityscapes_to_camvid")
    make_drives(tmp_path / "data", {"val": 1}, 64, 128)
    checkpoint = save_model(tmp_path / "m.safetensors", trained_bn_model(num_classes=19, class_map="cityscapes"))
    # Cityscapes labels and a Cityscapes model: both mapped, scored as CamVid's classes
    args = [str(checkpoint), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"), "--split", "val",
            "--label-map", "cityscapes_to_camvid", "--json", str(tmp_path / "r.json"), "--branches", "sub124"]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())["branches"]["sub124"]
    sample = build_dataset("cityscapes", tmp_path / "data", "val", label_map.source)[0]
    prediction = predict_branches(load_model(checkpoint), sample["image"], ["sub124"], "cpu")["sub124"]
    matrix = ConfusionMatrix(11)
    matrix.update(torch.from_numpy(label_map.lut[sample["label"]]), torch.from_numpy(label_map.lut[prediction.numpy()]))
    assert report["miou"] == pytest.approx(matrix.report(label_map.target.names)["miou"])
    # CamVid labels and a Cityscapes model: the predictions are mapped
    camvid = tmp_path / "camvid"
    (camvid / "test").mkdir(parents=True)
    (camvid / "testannot").mkdir()
    cv2.imwrite(str(camvid / "test" / "f.png"), sample["image"][..., ::-1])
    cv2.imwrite(str(camvid / "testannot" / "f.png"), label_map.lut[sample["label"]].astype(np.uint8))
    (camvid / "test.txt").write_text("/x/test/f.png /x/testannot/f.png\n")
    args[2:7] = ["camvid", "--data-root", str(camvid), "--split", "test"]
    assert main(args) == 0
    on_camvid = json.loads((tmp_path / "r.json").read_text())["branches"]["sub124"]
    assert on_camvid["miou"] == pytest.approx(report["miou"], abs=1e-6)  # the same pixels, the same answer


def test_evaluate_at_the_frames_own_size_differs_from_the_checkpoint_size(tmp_path):
    """--input-size frame must run the network at each frame's size, not fall back to the checkpoint's."""
    import json

    from conftest import trained_bn_model

    from icnet_ros.data.synthetic import make_drives
    from icnet_ros.evaluation.cli import main
    from icnet_ros.model.checkpoint import save_model
    from icnet_ros.model.preprocess import network_size, parse_input_size

    assert network_size((64, 128), parse_input_size("frame", (32, 0))) == (64, 128)
    assert network_size((64, 128), parse_input_size("checkpoint", (32, 0))) == (32, 64)
    make_drives(tmp_path / "data", {"val": 2}, 64, 128)
    model = trained_bn_model(num_classes=19, class_map="cityscapes")
    model.config = dataclasses.replace(model.config, input_size=(32, 0))
    checkpoint = save_model(tmp_path / "m.safetensors", model)
    reports = {}
    for size in ("frame", "checkpoint", "64x128"):
        args = [str(checkpoint), "--dataset", "cityscapes", "--data-root", str(tmp_path / "data"), "--split", "val",
                "--input-size", size, "--json", str(tmp_path / f"{size}.json")]
        assert main(args) == 0
        reports[size] = json.loads((tmp_path / f"{size}.json").read_text())["branches"]["sub124"]
    assert reports["frame"] == reports["64x128"] != reports["checkpoint"]
