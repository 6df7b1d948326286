"""Class maps come from config/ and agree with the official dataset tables."""
import numpy as np
import pytest

from icnet_ros.classmap import ClassMapError, available_class_maps, load_class_map


def test_available_class_maps():
    assert {"cityscapes", "camvid", "cocostuff"} <= set(available_class_maps())


def test_cityscapes_matches_cityscapesscripts_official_table():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels").labels
    class_map = load_class_map("cityscapes")
    train = sorted((l.trainId, l.name.replace(" ", "_"), l.color) for l in labels if 0 <= l.trainId < 255)
    assert [(i, n, c) for i, n, c in zip(range(19), class_map.names, class_map.colors)] == train
    lut = class_map.source_to_class_lut()
    for label in labels:
        if label.id >= 0:
            expected = label.trainId if 0 <= label.trainId < 255 else 255
            assert lut[label.id] == expected, label.name


def test_camvid_and_cocostuff_sizes_and_void():
    camvid = load_class_map("camvid")
    assert camvid.num_classes == 11 and camvid.source_to_class_lut()[11] == 255
    coco = load_class_map("cocostuff")
    assert coco.num_classes == 182 and coco.label_dtype == np.uint8
    assert len(set(coco.colors)) == 182


def test_unknown_class_map_lists_the_available_ones():
    with pytest.raises(ClassMapError, match="available"):
        load_class_map("kitti")


def test_cityscapes_to_camvid_label_map_groups_classes():
    from icnet_ros.classmap import load_label_map

    label_map = load_label_map("cityscapes_to_camvid")
    cityscapes, camvid = label_map.source, label_map.target
    mapped = {name: label_map.lut[cityscapes.index(name)] for name in cityscapes.names}
    assert mapped["wall"] == mapped["building"] == camvid.index("building")
    assert mapped["traffic_light"] == mapped["traffic_sign"] == camvid.index("sign_symbol")
    assert mapped["bus"] == mapped["car"] == camvid.index("car")
    assert label_map.lut[cityscapes.ignore_index] == camvid.ignore_index
    assert set(mapped.values()) == set(range(camvid.num_classes))  # every CamVid class is reachable
