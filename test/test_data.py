"""Data: synthetic drives, the Cityscapes / CamVid / COCO-Stuff layouts, bad data, augmentation."""
import hashlib

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA

from icnet_ros.classmap import load_class_map
from icnet_ros.config import ConfigError
from icnet_ros.data.datasets import DatasetError, build_dataset, cityscapes_sequence_frames
from icnet_ros.data.synthetic import (
    MANIFEST,
    OBJECTS,
    Scene,
    load_object_mix,
    main,
    make_drives,
    read_manifest,
)
from icnet_ros.data.transforms import augment_sample
from icnet_ros.paths import config_dir

CITYSCAPES = load_class_map("cityscapes")
# sha256 (first 16 hex digits) of Scene(7, 64, 128).render(19)'s image bytes, then its labels
OWN_MIX_SCENE_7 = "1de55a791d964bb2"


def test_synthetic_frames_are_deterministic_per_seed():
    first, again, other = (Scene(s, 128, 256).render(19, CITYSCAPES)[0] for s in (4, 4, 5))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_synthetic_drives_cover_all_19_classes_with_small_objects():
    counts = np.zeros(19, np.int64)
    for seed in range(12):
        counts += np.bincount(Scene(seed, 256, 512).render(19, CITYSCAPES)[1].ravel(), minlength=19)
    share = counts / counts.sum()
    assert (counts > 0).all(), [n for n, c in zip(CITYSCAPES.names, counts) if c == 0]
    for small in ("pole", "traffic_light", "traffic_sign", "person", "rider"):
        assert share[CITYSCAPES.index(small)] < 0.01  # thin and small, where the cascade matters


def test_a_sequence_drives_forward():
    scene = Scene(1, 128, 256)
    frames = [scene.render(t, CITYSCAPES)[0].astype(int) for t in (0, 1, 10)]
    assert 0 < np.abs(frames[1] - frames[0]).mean() < np.abs(frames[2] - frames[0]).mean()


def _object_kinds(mix, seeds=range(40)):
    return [o["kind"] for seed in seeds for o in Scene(seed, 64, 128, mix).objects]


def test_the_street_mix_makes_cars_outnumber_large_vehicles_and_signs_outnumber_lights():
    mix = load_object_mix(config_dir() / "synthetic" / "street_mix.yaml")
    own, street = _object_kinds(None), _object_kinds(mix)
    large = ("truck", "bus", "train")
    assert sum(street.count(k) for k in large) * 20 < street.count("car")  # by count; ~88 % of the pixels
    assert sum(own.count(k) for k in large) * 5 > own.count("car")
    assert street.count("pole_sign") > 2 * street.count("pole_light")
    assert street.count("person") > 5 * (street.count("rider_bicycle") + street.count("rider_motorcycle"))
    # the draws follow the same random stream: the kinds change, the depths do not
    assert [o["z"] for o in Scene(3, 64, 128, mix).objects] == [o["z"] for o in Scene(3, 64, 128).objects]


def test_without_an_object_mix_the_generator_writes_its_own_frames(tmp_path):
    (tmp_path / "empty.yaml").write_text("{}\n")
    image, label = Scene(7, 64, 128).render(19, CITYSCAPES)
    # the frame every earlier drive held (object mixes came later): the data the bundled models learnt from
    assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()[:16] == OWN_MIX_SCENE_7
    empty_mix = load_object_mix(tmp_path / "empty.yaml")
    assert np.array_equal(Scene(7, 64, 128, empty_mix).render(19, CITYSCAPES)[1], label)


@pytest.mark.parametrize("text, says", [("lorry: 1\n", "unknown object kind 'lorry'"),
                                        ("car: -1\n", "non-negative number"),
                                        ("car: many\n", "non-negative number"),
                                        ("car: .nan\n", "finite non-negative number"),
                                        ("car: [1\n", "not valid YAML"),
                                        ("- car\n", "mapping")])
def test_a_bad_object_mix_is_refused_naming_what_is_wrong(tmp_path, text, says):
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_object_mix(path)
    assert main(["--out", str(tmp_path / "out"), "--splits", "train=1", "--object-mix", str(path)]) == 2
    assert not (tmp_path / "out").exists()


def test_drives_record_how_each_split_was_made(tmp_path, monkeypatch):
    make_drives(tmp_path, {"train": 2}, 32, 64, seed=3, object_mix={"car": 1.0})
    make_drives(tmp_path, {"val": 1}, 32, 64)  # another split into the same folder keeps the first's record
    splits = read_manifest(tmp_path)["splits"]
    assert splits["train"] == {"frames": 2, "seed": 3, "height": 32, "width": 64, "city": "synth",
                               "object_mix": {"car": 1.0}}
    assert splits["val"]["object_mix"] is None and splits["val"]["seed"] == 0
    assert read_manifest(tmp_path / "nothing here") is None
    monkeypatch.chdir(tmp_path)
    assert read_manifest("") is None  # no data root: not the working directory's manifest
    (tmp_path / MANIFEST).write_text("[]\n")
    with pytest.raises(ConfigError, match="not a drives manifest"):
        read_manifest(tmp_path)


def test_an_all_zero_object_mix_is_refused(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("".join(f"{kind}: 0\n" for kind, *_ in OBJECTS))
    with pytest.raises(ConfigError, match="at least one a positive weight"):
        load_object_mix(path)


def test_written_layout_reads_back_with_train_ids_and_label_ids(tmp_path):
    make_drives(tmp_path, {"train": 2, "val": 1}, 64, 128, sequences=1, frames_per_sequence=3)
    by_train_ids = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES)
    assert len(by_train_ids) == 2
    sample = by_train_ids[0]
    assert sample["image"].shape == (64, 128, 3) and sample["label"].shape == (64, 128)
    for path in (tmp_path / "gtFine").rglob("*_labelTrainIds.png"):
        path.unlink()  # now the loader must map raw label ids through the official table
    by_label_ids = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES)
    assert np.array_equal(by_label_ids[0]["label"], sample["label"])
    assert len(cityscapes_sequence_frames(tmp_path, "train", "synth", 0)) == 3


def _camvid(root, foreign_prefix="/SegNet/CamVid"):
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i in range(count):
            cv2.imwrite(str(root / split / f"f{i}.png"), np.full((36, 48, 3), 90, np.uint8))
            cv2.imwrite(str(root / f"{split}annot" / f"f{i}.png"), np.full((36, 48), 11 if i == 0 else 3, np.uint8))
            lines.append(f"{foreign_prefix}/{split}/f{i}.png {foreign_prefix}/{split}annot/f{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_camvid_list_files_from_another_machine_resolve_against_the_root(tmp_path):
    _camvid(tmp_path)
    camvid = load_class_map("camvid")
    dataset = build_dataset("camvid", tmp_path, "train+val", camvid)
    assert len(dataset) == 5
    assert (dataset[0]["label"] == 255).all() and (dataset[1]["label"] == 3).all()  # void -> ignore


@pytest.mark.skipif(not (SHARED_DATA / "CamVid").is_dir(), reason="real CamVid not present at ../shared/data")
def test_real_camvid_split_sizes():
    camvid = load_class_map("camvid")
    sizes = {s: len(build_dataset("camvid", SHARED_DATA / "CamVid", s, camvid)) for s in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}
    sample = build_dataset("camvid", SHARED_DATA / "CamVid", "test", camvid)[0]
    assert sample["image"].shape == (360, 480, 3) and sample["label"].max() <= 255


def test_cocostuff_layout(tmp_path):
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    (tmp_path / "annotations" / "val2017").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "val2017" / "1.jpg"), np.zeros((40, 40, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "annotations" / "val2017" / "1.png"), np.full((40, 40), 181, np.uint8))
    sample = build_dataset("cocostuff", tmp_path, "val2017", load_class_map("cocostuff"))[0]
    assert (sample["label"] == 181).all()


def test_wrong_root_names_what_was_looked_for(tmp_path):
    with pytest.raises(DatasetError, match=r"leftImg8bit/train/<city>/\*_leftImg8bit.png"):
        build_dataset("cityscapes", tmp_path, "train", CITYSCAPES)
    with pytest.raises(DatasetError, match="train.txt"):
        build_dataset("camvid", tmp_path, "train", load_class_map("camvid"))


def _broken(tmp_path, problem):
    make_drives(tmp_path, {"train": 3}, 64, 128)
    labels = sorted((tmp_path / "gtFine" / "train").rglob("*_labelTrainIds.png"))
    images = sorted((tmp_path / "leftImg8bit" / "train").rglob("*.png"))
    if problem == "unreadable image":
        images[1].write_bytes(b"not a png")
    elif problem == "label size":
        cv2.imwrite(str(labels[1]), np.zeros((32, 32), np.uint8))
    elif problem == "label values":
        cv2.imwrite(str(labels[1]), np.full((64, 128), 40, np.uint8))
    return images[1].name


@pytest.mark.parametrize("problem, message", [("unreadable image", "unreadable image"),
                                              ("label size", "must match"),
                                              ("label values", r"label values \[40\] are outside")])
def test_bad_samples_name_the_file_or_are_counted_and_skipped(tmp_path, problem, message):
    bad_name = _broken(tmp_path, problem)
    strict = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES)
    with pytest.raises(DatasetError, match=message):
        strict[1]
    lenient = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES, skip_bad=True)
    assert lenient[1]["path"] != strict.pairs[1].image  # the next good sample instead
    assert len(lenient.skipped) == 1 and bad_name.split("_leftImg8bit")[0] in lenient.skipped[0][0]


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        build_dataset("cityscapes", tmp_path, "val", CITYSCAPES)


def test_augmentation_keeps_label_ids_and_pads_with_ignore():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    label = rng.choice([1, 5, 7], (40, 60)).astype(np.uint8)
    for seed in range(10):
        out_image, out_label = augment_sample(image, label, np.random.default_rng(seed), crop_size=(48, 48),
                                              scale_range=(0.5, 2.0), ignore_index=255)
        assert out_image.shape == (48, 48, 3) and out_label.shape == (48, 48)
        assert set(np.unique(out_label)) <= {1, 5, 7, 255}
    small_image, small_label = augment_sample(image, label, np.random.default_rng(1), crop_size=(100, 100),
                                              scale_range=(1.0, 1.0), mirror=False)
    assert (small_label[40:] == 255).all() and np.array_equal(small_label[:40, :60], label)


def test_mirror_flips_image_and_label_together():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 0] = 200
    label = np.zeros((8, 8), np.uint8)
    label[:, 0] = 3
    for seed in range(8):
        out_image, out_label = augment_sample(image, label, np.random.default_rng(seed), crop_size=(8, 8),
                                              scale_range=(1.0, 1.0))
        assert np.array_equal(out_image[..., 0] == 200, out_label == 3)
