"""Set-valued training targets: labels that name a set of the model's classes.

A data set annotated in a coarser class map still teaches a finer model: CamVid's `building` says
"building or wall" in Cityscapes' classes. A label map (config/label_maps/) from the model's class
map to the data's says which of the model's classes each coarser label stands for; its inverse is
that label's set. The loss then maximises the summed probability of the set (a partial-label loss),
which is exact cross-entropy for a set of one.

All sources of a run share one target vocabulary: ids 0..C-1 are the model's own classes (sets of
one), followed by one id per class of each coarser class map in use. A source's labels are turned
into target ids once, when they are read, so the sampler, the augmentation and the class weights
treat every source alike.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from icnet_ros.classmap import ClassMap, ClassMapError, load_label_map


@dataclass(frozen=True)
class TargetVocabulary:
    """The targets of a run: names and, for each target, which of the model's classes it stands for."""

    class_map: ClassMap  # the model's
    names: tuple[str, ...]  # the model's class names, then "<class map>:<class>" for each set
    members: np.ndarray  # (targets, classes) bool

    @property
    def num_targets(self) -> int:
        return len(self.names)

    @property
    def ignore_index(self) -> int:
        return self.class_map.ignore_index

    @property
    def has_sets(self) -> bool:
        """False when every target is one class: plain cross-entropy applies."""
        return self.num_targets > self.class_map.num_classes

    def membership(self) -> torch.Tensor:
        return torch.from_numpy(self.members.copy())


def build_vocabulary(class_map: ClassMap, label_set_maps: Iterable[str]) -> tuple[TargetVocabulary, dict]:
    """The vocabulary for `class_map` and label maps named `label_set_maps`, and for each of them
    the lookup table from the data's class ids (and its ignore index) to target ids.

    Each label map must go from `class_map` to the data's class map (e.g. cityscapes_to_camvid for
    CamVid labels under a Cityscapes model).
    """
    names = list(class_map.names)
    members = [np.eye(class_map.num_classes, dtype=bool)]
    luts = {}
    for name in dict.fromkeys(label_set_maps):  # each map once, in order of first use
        label_map = load_label_map(name)
        if label_map.source.name != class_map.name:
            raise ClassMapError(f"label_sets {name!r} maps the {label_map.source.name!r} classes, but the model "
                                f"predicts {class_map.name!r}; use a label map whose source is {class_map.name!r} "
                                f"(config/label_maps/{class_map.name}_to_<data's class map>.yaml)")
        data = label_map.target
        sets = _inverse(label_map.lut[:class_map.num_classes], data.num_classes)
        lut = np.full(max(data.num_classes, data.ignore_index + 1), class_map.ignore_index, dtype=np.int64)
        for data_id, classes in enumerate(sets):
            if classes.any():  # a data class no model class maps to teaches nothing: ignored
                lut[data_id] = len(names)
                names.append(f"{data.name}:{data.names[data_id]}")
                members.append(classes[None])
        luts[name] = lut
    vocabulary = TargetVocabulary(class_map, tuple(names), np.concatenate(members))
    if vocabulary.num_targets > class_map.ignore_index:
        raise ClassMapError(f"{vocabulary.num_targets} targets do not fit below the ignore index "
                            f"{class_map.ignore_index} of {class_map.name!r}")
    return vocabulary, luts


def _inverse(lut: np.ndarray, data_classes: int) -> np.ndarray:
    """(data classes, model classes) bool: the model classes that map to each data class."""
    sets = np.zeros((data_classes, len(lut)), dtype=bool)
    for model_class, data_class in enumerate(lut):
        if 0 <= data_class < data_classes:
            sets[data_class, model_class] = True
    return sets
