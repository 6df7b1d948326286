"""Class maps: the names, colors and id mappings of a dataset's classes, read from config/classmaps/.

The YAML files are the only place class names and colors live; everything else (loaders, the
evaluator, the colorizer, the ROS LabelInfo message) asks a ClassMap.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from icnet_ros.paths import config_dir


class ClassMapError(ValueError):
    """A class map file is missing or malformed."""


@dataclass(frozen=True)
class ClassMap:
    name: str
    ignore_index: int
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    source_ids: tuple[tuple[int, ...], ...]  # raw dataset label ids that map to each class

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def label_dtype(self) -> np.dtype:
        """uint8 while every class id and the ignore index fit in a byte, else uint16."""
        return np.dtype(np.uint8) if max(self.num_classes - 1, self.ignore_index) <= 255 else np.dtype(np.uint16)

    def palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 RGB colors, indexed by class id."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    def source_to_class_lut(self) -> np.ndarray:
        """Lookup table from raw dataset label values (0..65535) to class ids; unknown -> ignore_index."""
        lut = np.full(65536, self.ignore_index, dtype=np.uint16)
        for class_id, raw_ids in enumerate(self.source_ids):
            lut[list(raw_ids)] = class_id
        return lut

    def class_to_source_lut(self) -> np.ndarray:
        """Class id -> the first raw dataset id (e.g. Cityscapes train id -> official label id)."""
        return np.asarray([raw_ids[0] for raw_ids in self.source_ids], dtype=np.int64)

    def index(self, class_name: str) -> int:
        try:
            return self.names.index(class_name)
        except ValueError:
            raise KeyError(f"class map {self.name!r} has no class {class_name!r}; it has {list(self.names)}")


def available_class_maps() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "classmaps").glob("*.yaml"))


@lru_cache(maxsize=None)
def load_class_map(name_or_path: str) -> ClassMap:
    """Load a class map by name (`cityscapes`, `camvid`, `cocostuff`) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config_dir() / "classmaps" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ClassMapError(
                f"unknown class map {name_or_path!r}; available: {available_class_maps()} "
                "(or give the path of a class map YAML file)"
            )
    return _parse_class_map(yaml.safe_load(path.read_text()), path)


def _parse_class_map(data: dict, path: Path) -> ClassMap:
    try:
        classes = sorted(data["classes"], key=lambda c: c["id"])
        ids = [c["id"] for c in classes]
        if ids != list(range(len(ids))):
            raise ClassMapError(f"{path}: class ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        colors = tuple(tuple(int(v) for v in c["color"]) for c in classes)
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise ClassMapError(f"{path}: every color must be three integers in 0..255")
        return ClassMap(
            name=str(data["name"]),
            ignore_index=int(data["ignore_index"]),
            names=tuple(str(c["name"]) for c in classes),
            colors=colors,
            source_ids=tuple(tuple(int(i) for i in c.get("source_ids", [c["id"]])) for c in classes),
        )
    except (KeyError, TypeError) as error:
        raise ClassMapError(
            f"{path}: malformed class map ({error!r}); expected keys name, ignore_index and classes "
            "(a list of {id, name, color: [r, g, b], source_ids})"
        ) from error


@dataclass(frozen=True)
class LabelMap:
    """Class ids of one class map expressed in another (config/label_maps/<name>.yaml)."""

    name: str
    source: ClassMap
    target: ClassMap
    lut: np.ndarray  # source class id (and the source's ignore index) -> target class id or ignore

    def prediction_lut(self, purpose: str) -> np.ndarray:
        """source class id -> target class id for a model's predictions, every class mapped (a
        prediction mapped to the ignore index could be neither scored nor learnt from)."""
        lut = self.lut[:self.source.num_classes]
        unmapped = [name for name, target in zip(self.source.names, lut) if target == self.target.ignore_index]
        if unmapped:
            raise ClassMapError(f"label map {self.name} maps {unmapped} to nothing; {purpose} needs a "
                                f"{self.target.name!r} class for every {self.source.name!r} class")
        return lut

    def source_sets(self) -> np.ndarray:
        """source class id -> the target class whose set it belongs to, -1 for a class mapped to nothing."""
        lut = self.lut[:self.source.num_classes]
        return np.where(lut == self.target.ignore_index, -1, lut)


def available_label_maps() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "label_maps").glob("*.yaml"))


def load_label_map(name: str) -> LabelMap:
    """A label map by name, e.g. `cityscapes_to_camvid` (scoring a CamVid model on Cityscapes frames)."""
    path = config_dir() / "label_maps" / f"{name}.yaml"
    if not path.is_file():
        raise ClassMapError(f"unknown label map {name!r}; available: {available_label_maps()}")
    data = yaml.safe_load(path.read_text())
    source, target = load_class_map(data["source"]), load_class_map(data["target"])
    unknown = [n for n in data["classes"] if n not in source.names]
    unknown += [t for t in data["classes"].values() if t is not None and t not in target.names]
    if unknown or set(data["classes"]) != set(source.names):
        raise ClassMapError(f"{path}: every class of {source.name!r} must map to a class of {target.name!r} "
                            f"or null; unknown or missing: {unknown or sorted(set(source.names) - set(data['classes']))}")
    lut = np.full(max(source.num_classes, source.ignore_index + 1), target.ignore_index, dtype=np.int64)
    for source_name, target_name in data["classes"].items():
        if target_name is not None:
            lut[source.index(source_name)] = target.index(target_name)
    return LabelMap(name, source, target, lut)

