"""Evaluate a model on a dataset: mIoU, per-class IoU and pixel accuracy for every branch in one pass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from icnet_ros.atomic import atomic_path
from icnet_ros.classmap import ClassMap
from icnet_ros.evaluation.metrics import ConfusionMatrix
from icnet_ros.model.icnet import BRANCHES, ICNet, upsample
from icnet_ros.model.preprocess import image_to_input, network_size
from icnet_ros.model.sparsity import sparse_input_size, sparse_logits


@dataclass(frozen=True)
class SparseRegions:
    """Score sub124 as fast inference computes it: the high-resolution path in `regions` per image."""

    regions: int
    selector: str = "auto"
    region_size: int = 256


@torch.inference_mode()
def predict_branches(model: ICNet, image: np.ndarray, branches: Iterable[str], device,
                     input_size: tuple[int, int] | None = None,
                     sparse: SparseRegions | None = None) -> dict[str, torch.Tensor]:
    """Full-resolution label maps (H, W) of each branch from one forward pass.

    The network runs at network_size(image size, input_size), the model's own input size unless
    `input_size` is given; logits are upsampled straight to the image's own size, so labels are
    always scored at their original resolution (as the engine publishes them).
    """
    height, width = image.shape[:2]
    size = network_size((height, width), model.config.input_size if input_size is None else input_size)
    if sparse is not None:
        size = sparse_input_size(*size)
    network_input = image_to_input(image, model.config, device, size=size)
    if sparse is not None:
        logits = {"sub124": sparse_logits(model, network_input, sparse.regions, sparse.selector,
                                          sparse.region_size).logits}
    else:
        logits = model.all_branch_logits(network_input)
    return {b: upsample(logits[b].float(), (height, width)).argmax(1)[0] for b in branches}


def shard(indices: range) -> Iterable[int]:
    """This process's share of the indices under torchrun (all of them otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return indices[dist.get_rank()::dist.get_world_size()]
    return indices


def evaluate(model: ICNet, dataset, class_map: ClassMap, device="cpu", branches=BRANCHES,
             input_size: tuple[int, int] | None = None,
             on_prediction: Callable[[dict, dict[str, torch.Tensor]], None] | None = None,
             progress: bool = True, prediction_lut: np.ndarray | None = None,
             sparse: SparseRegions | None = None, split_sets: np.ndarray | None = None) -> dict[str, dict]:
    """{branch: {'miou', 'pixel_acc', 'iou': {class: IoU}}} over every sample of `dataset`.

    class_map: the classes scored, those of the dataset's labels. prediction_lut maps the model's
    class ids to them when the model predicts another class map (LabelMap.lut: a Cityscapes model
    scored on CamVid labels); on_prediction still sees the model's own classes.
    Branches the model does not have (an imported evaluation net has sub124 only) are left out.
    split_sets: each scored class's set in a coarser class map (LabelMap.source_sets); each branch then also
    reports 'split_bound', its scores had every set been split perfectly (ConfusionMatrix.split_within_sets).
    """
    branches = ["sub124"] if sparse is not None else [b for b in branches if b in model.config.branches]
    if not branches:
        raise ValueError(f"none of the requested branches exist in this model; it has {list(model.config.branches)}")
    was_training = model.training
    model.eval()
    matrices = {b: ConfusionMatrix(class_map.num_classes, class_map.ignore_index) for b in branches}
    to_scored = None if prediction_lut is None else torch.from_numpy(np.asarray(prediction_lut, dtype=np.int64))
    indices = shard(range(len(dataset)))
    for index in tqdm(indices, desc="evaluate", disable=not progress, leave=False):
        sample = dataset[index]
        predictions = predict_branches(model, sample["image"], branches, device, input_size, sparse)
        target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
        for branch, labels in predictions.items():
            labels = labels.cpu()
            matrices[branch].update(target, labels if to_scored is None else to_scored[labels])
        if on_prediction is not None:
            on_prediction(sample, predictions)
    model.train(was_training)
    reports = {}
    for branch, matrix in matrices.items():
        matrix.reduce_across_processes()
        reports[branch] = matrix.report(class_map.names)
        if split_sets is not None:
            reports[branch]["split_bound"] = matrix.split_within_sets(split_sets).report(class_map.names)
    return reports


def cityscapes_prediction_writer(out_dir: Path, class_map: ClassMap, branch: str = "sub124"):
    """A callback writing `<image stem>.png` with official Cityscapes label ids (for submission)."""
    to_label_ids = class_map.class_to_source_lut().astype(np.uint8)
    out_dir = Path(out_dir)

    def write(sample: dict, predictions: dict[str, torch.Tensor]) -> None:
        stem = Path(sample["path"]).name.replace("_leftImg8bit", "").rsplit(".", 1)[0]
        label_ids = to_label_ids[predictions[branch].cpu().numpy()]
        with atomic_path(out_dir / f"{stem}.png") as tmp:
            if not cv2.imwrite(str(tmp) + ".png", label_ids):
                raise OSError(f"could not write {out_dir / stem}.png")
            Path(str(tmp) + ".png").replace(tmp)

    return write
