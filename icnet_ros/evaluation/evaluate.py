"""Evaluate a model on a dataset: mIoU, per-class IoU and pixel accuracy for every branch in one pass."""
from __future__ import annotations

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


def image_to_tensor(image: np.ndarray, mean, std, device) -> torch.Tensor:
    """HxWx3 uint8 RGB -> normalized (1, 3, H, W) float32 on `device`."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (tensor - mean) / std


@torch.inference_mode()
def predict_branches(model: ICNet, image: np.ndarray, branches: Iterable[str], device,
                     network_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Full-resolution label maps (H, W) of each branch from one forward pass.

    With `network_size`, the image is resized for the network and logits are upsampled back to
    the image's own size, so labels are always scored at their original resolution.
    """
    height, width = image.shape[:2]
    if network_size is not None and tuple(network_size) != (height, width):
        image = cv2.resize(image, (network_size[1], network_size[0]), interpolation=cv2.INTER_LINEAR)
    x = image_to_tensor(image, model.config.input_mean, model.config.input_std, device)
    logits = model.all_branch_logits(x)
    return {b: upsample(logits[b].float(), (height, width)).argmax(1)[0] for b in branches}


def shard(indices: range) -> Iterable[int]:
    """This process's share of the indices under torchrun (all of them otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return indices[dist.get_rank()::dist.get_world_size()]
    return indices


def evaluate(model: ICNet, dataset, class_map: ClassMap, device="cpu", branches=BRANCHES,
             network_size: tuple[int, int] | None = None,
             on_prediction: Callable[[dict, dict[str, torch.Tensor]], None] | None = None,
             progress: bool = True) -> dict[str, dict]:
    """{branch: {'miou', 'pixel_acc', 'iou': {class: IoU}}} over every sample of `dataset`."""
    was_training = model.training
    model.eval()
    matrices = {b: ConfusionMatrix(class_map.num_classes, class_map.ignore_index) for b in branches}
    indices = shard(range(len(dataset)))
    for index in tqdm(indices, desc="evaluate", disable=not progress, leave=False):
        sample = dataset[index]
        predictions = predict_branches(model, sample["image"], branches, device, network_size)
        target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
        for branch, labels in predictions.items():
            matrices[branch].update(target, labels.cpu())
        if on_prediction is not None:
            on_prediction(sample, predictions)
    model.train(was_training)
    reports = {}
    for branch, matrix in matrices.items():
        matrix.reduce_across_processes()
        reports[branch] = matrix.report(class_map.names)
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
