"""The legend of side-by-side pictures: which classes it lists, how it wraps, how it is composed."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from icnet_ros.classmap import load_class_map
from icnet_ros.visualization import (
    LEGEND_BACKGROUND,
    LEGEND_MIN_SHARE,
    draw_legend,
    present_classes,
    side_by_side,
)


def swatch_corners(strip: np.ndarray, palette: np.ndarray, solid: int = 4) -> dict[int, list[tuple[int, int]]]:
    """class id -> (x, y) of every solid block (at least solid x solid pixels) of its palette color in
    the RGB strip. Anti-aliased text leaves single grey pixels, never solid blocks, so grey palette
    colors (Cityscapes building and pole, CamVid sky) are not taken for swatches."""
    found = {}
    for class_id, color in enumerate(palette):
        mask = np.all(strip == color, axis=-1).astype(np.uint8)
        cores = cv2.erode(mask, np.ones((solid, solid), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        count, _, stats, _ = cv2.connectedComponentsWithStats(cores)
        if count > 1:
            found[class_id] = [(int(x), int(y)) for x, y in stats[1:, :2]]
    return found


def swatches(strip: np.ndarray, palette: np.ndarray) -> dict[int, int]:
    """class id -> how many swatches of its color the strip holds (classes without one left out)."""
    return {class_id: len(corners) for class_id, corners in swatch_corners(strip, palette).items()}


def labels_with(shares: dict[int, float], size=(100, 200), fill: int = 255) -> np.ndarray:
    """An HxW label image: each class id covers its share of the pixels, the rest is `fill`."""
    flat = np.full(size[0] * size[1], fill, np.uint8)
    start = 0
    for class_id, share in shares.items():
        count = round(share * flat.size)
        flat[start:start + count] = class_id
        start += count
    return flat.reshape(size)


def test_present_classes_lists_the_classes_in_the_picture_in_id_order():
    labels = labels_with({13: 0.5, 0: 0.3, 10: 0.1999, 11: 0.0001})  # 11: a 2-pixel speck; the rest ignore
    assert present_classes(labels, 19) == [0, 10, 13]  # the speck is under the 0.1 % default
    assert present_classes(labels, 19, min_share=0) == [0, 10, 11, 13]
    assert present_classes(labels, 19, min_share=0.25) == [0, 13]
    assert present_classes(labels, 11) == [0, 10]  # ids outside the class map (13 here) are never listed
    assert present_classes(np.zeros((0, 4), np.uint8), 19) == []
    assert LEGEND_MIN_SHARE == 0.001
    with pytest.raises(ValueError, match="min_share"):
        present_classes(labels, 19, min_share=1.5)


@pytest.mark.parametrize("dataset", ["cityscapes", "camvid"])
def test_the_legend_shows_a_swatch_for_exactly_the_classes_asked_for(dataset):
    class_map = load_class_map(dataset)
    ids = [0, 3, 8, 10]
    strip = draw_legend(class_map, ids, 640)
    assert strip.dtype == np.uint8 and strip.ndim == 3 and strip.shape[1:] == (640, 3)
    assert swatches(strip, class_map.palette()) == {i: 1 for i in ids}  # absent classes: no swatch
    everything = draw_legend(class_map, range(class_map.num_classes), 640)
    assert swatches(everything, class_map.palette()) == {i: 1 for i in range(class_map.num_classes)}


def test_legend_entries_are_in_id_order_and_named_from_the_class_map():
    class_map = load_class_map("cityscapes")
    strip = draw_legend(class_map, [0, 10, 13], 1024)
    corners = swatch_corners(strip, class_map.palette())
    xs, ys = zip(*[corners[i][0] for i in (0, 10, 13)])
    assert len(set(ys)) == 1 and list(xs) == sorted(xs)  # one row, road | sky | car from left to right
    renamed = dataclasses.replace(class_map, names=tuple(n.upper() for n in class_map.names))
    other = draw_legend(renamed, [0, 10, 13], 1024)
    assert other.shape == strip.shape and not np.array_equal(other, strip)  # the text is the class map's names
    assert swatches(other, class_map.palette()) == swatches(strip, class_map.palette())


@pytest.mark.parametrize("dataset, width", [("cityscapes", 90), ("cityscapes", 192), ("cityscapes", 320),
                                            ("cityscapes", 700), ("cityscapes", 2048), ("cocostuff", 640)])
def test_wrapping_keeps_every_entry_inside_the_strip(dataset, width):
    class_map = load_class_map(dataset)
    strip = draw_legend(class_map, range(class_map.num_classes), width)
    assert strip.shape[1] == width
    assert swatches(strip, class_map.palette()) == {i: 1 for i in range(class_map.num_classes)}
    background = np.asarray(LEGEND_BACKGROUND, np.uint8)
    for edge in (strip[0], strip[-1], strip[:, 0], strip[:, -1]):  # nothing drawn over the strip's edge
        assert np.all(edge == background)
    columns = len({x for corners in swatch_corners(strip, class_map.palette()).values() for x, _ in corners})
    assert columns < class_map.num_classes  # wrapped into rows: fewer columns than entries
    if width <= 192:
        assert columns == 1


def test_the_text_grows_with_the_picture():
    class_map = load_class_map("cityscapes")

    def swatch_side(width):
        return int(np.all(draw_legend(class_map, [0], width) == class_map.palette()[0], axis=-1).sum(axis=0).max())

    assert swatch_side(640) < swatch_side(2048) < swatch_side(4096)
    assert draw_legend(class_map, [0], 4096).shape[0] > draw_legend(class_map, [0], 640).shape[0]


def test_no_classes_is_an_empty_strip_and_unknown_ids_are_errors():
    class_map = load_class_map("camvid")
    assert draw_legend(class_map, [], 300).shape == (0, 300, 3)
    with pytest.raises(ValueError, match="not in class map"):
        draw_legend(class_map, [11], 300)
    with pytest.raises(ValueError, match="width"):
        draw_legend(class_map, [0], 0)


def test_side_by_side_is_the_two_panels_over_the_legend_of_the_present_classes():
    class_map = load_class_map("cityscapes")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)
    shown = rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)
    labels = labels_with({2: 0.5, 8: 0.3, 18: 0.0001}, fill=0)  # road fills the rest; bicycle is a speck
    pair = side_by_side(image, shown, labels, class_map)
    legend = draw_legend(class_map, [0, 2, 8], 400)
    assert pair.shape == (100 + legend.shape[0], 400, 3) and legend.shape[0] > 0
    assert np.array_equal(pair[:100, :200], image) and np.array_equal(pair[:100, 200:], shown)
    assert np.array_equal(pair[100:], legend)
    assert swatches(pair[100:], class_map.palette()) == {0: 1, 2: 1, 8: 1}
    with_speck = side_by_side(image, shown, labels, class_map, min_share=0)
    assert swatches(with_speck[100:], class_map.palette()) == {0: 1, 2: 1, 8: 1, 18: 1}
    with pytest.raises(ValueError, match="labels"):
        side_by_side(image, shown, labels[:50], class_map)
    with pytest.raises(ValueError, match="panels"):
        side_by_side(image, shown[:50], labels, class_map)
