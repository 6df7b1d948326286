"""The training configuration: one typed dataclass, loaded from config/train/<dataset>.yaml.

Defaults are the paper's recipe (section 5.1); each dataset's YAML documents its own values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from icnet_ros.paths import config_dir

DATASETS = ("cityscapes", "camvid", "cocostuff", "cityscapes_val9")


@dataclass(frozen=True)
class DataSource:
    """Another data set mixed into every training batch (TrainConfig.mix)."""

    dataset: Literal["cityscapes", "camvid", "cocostuff", "cityscapes_val9"]
    data_root: str
    split: str = "train"
    per_batch: int = 1  # samples of this source in every global batch
    # a label map from the model's class map to this data's (config/label_maps/): its labels are
    # then sets of the model's classes (training/targets.py); empty: labels are the model's classes
    label_sets: str = ""


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: Literal["cityscapes", "camvid", "cocostuff", "cityscapes_val9"] = "cityscapes"
    data_root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    class_map: str = "cityscapes"
    # the training data's labels as sets of class_map's classes: a label map from class_map to the
    # data's class map, e.g. cityscapes_to_camvid for CamVid labels under a Cityscapes model
    label_sets: str = ""
    # other data sets in every batch; the main data set fills the rest of batch_size
    mix: tuple[DataSource, ...] = ()
    # (height, width) frames are resized to first (0 on one side keeps the aspect ratio); recorded in
    # the model as its input size, so the engine and evaluation resize frames the same way
    image_size: Optional[tuple[int, int]] = None
    crop_size: tuple[int, int] = (1024, 1024)
    scale_range: tuple[float, float] = (0.5, 2.0)
    mirror: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - j, 1 + j]; 0 = off
    white_balance_jitter: float = 0.0  # a gain per R, G, B channel in [1 - j, 1 + j]; 0 = off
    skip_bad: bool = False
    workers: int = 4
    # model
    keep_rate: float = 0.5
    init_from: str = ""  # a checkpoint to start from (fine-tuning, compression)
    # init_from predicts another class map: a label map from class_map to it; each class starts
    # from the classifier of the class it maps to (so sets start at the old model's probabilities)
    init_classes_from: str = ""
    # optimization (paper: SGD, lr 0.01, poly 0.9, momentum 0.9, wd 1e-4, batch 16)
    iterations: int = 30000
    batch_size: int = 16  # global batch, split over torchrun processes
    base_lr: float = 0.01
    lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    loss_weights: tuple[float, float, float] = (0.4, 0.4, 1.0)  # sub4, sub24, sub124
    # per-class cross-entropy weights: "none", "median_frequency" (from the training labels, raised
    # to class_weight_power; see training/class_weights.py) or one number per class
    class_weights: Union[Literal["none", "median_frequency"], tuple[float, ...]] = "none"
    class_weight_power: float = 1.0
    amp: bool = True  # mixed precision, used on CUDA only
    # progressive compression: prune to each rate in turn, fine-tuning `iterations` after each cut
    compress_schedule: tuple[float, ...] = ()
    # spatial sparsity (model/sparsity.py): a gate over square regions of this many network-input
    # pixels (0: none); its sparsity term (paper Eq. 1, 2, 4) holds each image's mean activation near
    # gate_target_active (p) with weight gate_sparsity_weight (lambda)
    gate_region_size: int = 0
    gate_target_active: float = 0.25
    gate_sparsity_weight: float = 1.0
    # bookkeeping
    out_dir: str = "runs/cityscapes"
    val_every: int = 1000
    checkpoint_every: int = 500
    log_every: int = 20
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # CPU threads for PyTorch; 0 keeps PyTorch's default


def default_config_path(dataset: str):
    return config_dir() / "train" / f"{dataset}.yaml"
