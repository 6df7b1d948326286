"""The training loop: paper recipe, AMP on CUDA, torchrun/DDP, exact resume, progressive compression.

Reproducibility and exact resume come from deriving all randomness from (seed, iteration): the
sample order of iteration i and each sample's augmentation are functions of the seed and i, so a
run resumed at iteration k sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from icnet_ros import __version__
from icnet_ros.atomic import atomic_path, atomic_write_text
from icnet_ros.classmap import ClassMap, load_class_map, load_label_map
from icnet_ros.config import config_to_dict
from icnet_ros.data.datasets import build_dataset
from icnet_ros.data.synthetic import read_manifest
from icnet_ros.data.transforms import augment_sample
from icnet_ros.evaluation.evaluate import evaluate
from icnet_ros.model.checkpoint import checkpoint_provenance, load_model, save_model
from icnet_ros.model.icnet import ICNet, ModelConfig
from icnet_ros.model.loss import CascadeLoss
from icnet_ros.model.preprocess import prepare_input
from icnet_ros.model.prune import progressive_schedule, prune_model
from icnet_ros.model.sparsity import sparsity_loss
from icnet_ros.training.class_weights import resolve_class_weights
from icnet_ros.training.config import TrainConfig
from icnet_ros.training.targets import TargetVocabulary, build_vocabulary

log = logging.getLogger("icnet_ros.train")
STATE_FILE = "last.pt"
MODEL_FILE = "model.safetensors"


# --- distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) -----------------------------
def init_distributed(device_kind: str) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(config: TrainConfig, local_rank: int) -> torch.device:
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but PyTorch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# --- data: batches as functions of (seed, iteration) ----------------------------------------------
class IterationBatches:
    """Batch sampler yielding, for each iteration, this process's share of the global batch.

    A batch holds per_batch[s] samples of each source s (the main data set is source 0), at fixed
    positions, so the mix is the same in every batch. Items are keys (source, dataset index,
    iteration, position) so that augmentation can be seeded by them. Each source's epochs are
    shuffled with a permutation seeded by (seed, [source,] epoch).
    """

    def __init__(self, dataset_sizes: int | Sequence[int], per_batch: int | Sequence[int], iterations: int,
                 seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.sizes = (dataset_sizes,) if isinstance(dataset_sizes, int) else tuple(dataset_sizes)
        self.per_batch = (per_batch,) if isinstance(per_batch, int) else tuple(per_batch)
        if len(self.sizes) != len(self.per_batch) or min(self.per_batch) < 1:
            raise ValueError(f"every source needs at least one sample per batch; got {list(self.per_batch)} for "
                             f"{len(self.sizes)} sources")
        self.batch = sum(self.per_batch)
        if self.batch % world:
            raise ValueError(f"batch_size {self.batch} must be divisible by the {world} processes")
        self.iterations, self.seed, self.start, self.rank, self.world = iterations, seed, start, rank, world
        # global batch position -> (source, its slot among that source's samples)
        self.slots = [(s, j) for s, count in enumerate(self.per_batch) for j in range(count)]
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _index(self, source: int, position: int) -> int:
        epoch, offset = divmod(position, self.sizes[source])
        if (source, epoch) not in self._permutations:
            # source 0 keeps the single-source seeding, so earlier runs resume onto the same batches
            key = [self.seed, epoch] if source == 0 else [self.seed, source, epoch]
            permutation = np.random.default_rng(key).permutation(self.sizes[source])
            self._permutations = {k: v for k, v in self._permutations.items() if k[0] != source}
            self._permutations[(source, epoch)] = permutation
        return int(self._permutations[(source, epoch)][offset])

    def __iter__(self):
        per_rank = self.batch // self.world
        for iteration in range(self.start, self.iterations):
            batch = []
            for position in range(self.rank * per_rank, (self.rank + 1) * per_rank):
                source, slot = self.slots[position]
                stream = iteration * self.per_batch[source] + slot
                batch.append((source, self._index(source, stream), iteration, position))
            yield batch

    def __len__(self):
        return self.iterations - self.start


class AugmentedDataset(Dataset):
    """Applies the paper's augmentation with a generator seeded by the sample's key.

    Samples stay uint8 (H, W, 3) RGB; the training step normalizes whole batches on the device with
    the model's own preprocessing, the same function the engine and evaluation use. Labels are
    target ids (training/targets.py), the same for every source.
    """

    def __init__(self, sources, config: TrainConfig, model_config: ModelConfig, ignore_index: int):
        self.sources, self.config, self.ignore_index = list(sources), config, ignore_index
        self.pad_value = np.asarray(model_config.input_mean, dtype=np.float32)  # padding normalizes to ~0

    def __len__(self):
        return sum(len(source) for source in self.sources)

    def __getitem__(self, key):
        source, index, iteration, position = key
        rng = np.random.default_rng([self.config.seed, iteration, position])
        sample = self.sources[source][index]
        image, label = augment_sample(
            sample["image"], sample["label"], rng, crop_size=self.config.crop_size,
            scale_range=self.config.scale_range, mirror=self.config.mirror,
            ignore_index=self.ignore_index, image_size=self.config.image_size, pad_value=self.pad_value,
            jitter=self.config.color_jitter, white_balance=self.config.white_balance_jitter,
        )
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(label.astype(np.int64))


def make_loader(sources, config: TrainConfig, model_config, ignore_index, start, rank, world, pin):
    sampler = IterationBatches([len(s) for s in sources], batch_shares(config), config.iterations, config.seed,
                               start, rank, world)
    augmented = AugmentedDataset(sources, config, model_config, ignore_index)
    return DataLoader(augmented, batch_sampler=sampler, num_workers=config.workers, pin_memory=pin,
                      persistent_workers=False)


def batch_shares(config: TrainConfig) -> list[int]:
    """Samples per global batch of the main data set, then of each mix source."""
    mixed = sum(source.per_batch for source in config.mix)
    if mixed >= config.batch_size:
        raise ValueError(f"the mix sources take {mixed} of batch_size {config.batch_size} samples per batch; "
                         "the main data set needs at least one: raise batch_size or lower per_batch")
    return [config.batch_size - mixed] + [source.per_batch for source in config.mix]


# --- learning rate, loss check and state -----------------------------------------------------------
def finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """True when the loss is finite in every process.

    A process that stopped alone on a NaN would leave the others waiting forever in DDP's gradient
    all-reduce, so the processes agree first (one float all-reduce) and all stop together.
    """
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    return base_lr * (1.0 - iteration / total) ** power


def save_state(path: Path, model, optimizer, scaler, iteration: int, config: TrainConfig) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "iteration": iteration, "config": config_to_dict(config),
             "model_config": config_to_dict(model.config)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, map_location) -> dict:
    # weights_only: a training state holds tensors and plain containers; nothing in it may execute.
    return torch.load(path, map_location=map_location, weights_only=True)


# --- one training stage --------------------------------------------------------------------------
class Stage:
    """Trains one model for config.iterations iterations in `out_dir` (resumable)."""

    def __init__(self, model: ICNet, config: TrainConfig, out_dir: Path, data: TrainingData,
                 device: torch.device, rank: int, world: int, class_weights: tuple[float, ...] | None = None,
                 lineage: dict | None = None):
        """lineage: the provenance of the checkpoint training started from (init_from), kept in ours."""
        self.model, self.config, self.out_dir = model.to(device), config, out_dir
        self.data, self.lineage = data, lineage
        self.device, self.rank, self.world = device, rank, world
        self.use_amp = config.amp and device.type == "cuda"
        self.class_weights = class_weights
        vocabulary = data.vocabulary
        self.criterion = CascadeLoss(dict(zip(("sub4", "sub24", "sub124"), config.loss_weights)),
                                     vocabulary.ignore_index, class_weights,
                                     vocabulary.membership() if vocabulary.has_sets else None).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.base_lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.iteration = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume(self) -> bool:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return False
        state = load_state(path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        if self.is_main:
            log.info("resumed %s at iteration %d", path, self.iteration)
        return True

    def run(self) -> dict:
        config = self.config
        network = self._wrapped()
        loader = make_loader(self.data.sources, config, self.model.config, self.data.vocabulary.ignore_index,
                             self.iteration,
                             self.rank, self.world, pin=self.device.type == "cuda")
        writer = self._tensorboard()
        bar = tqdm(total=config.iterations, initial=self.iteration, disable=not self.is_main,
                   desc=f"train {self.out_dir.name}", dynamic_ncols=True)
        metrics = {}
        self.model.train()
        for images, labels in loader:
            self._step(network, images, labels, writer, bar)
            self.iteration += 1
            bar.update(1)
            done = self.iteration == config.iterations
            if done or self.iteration % config.checkpoint_every == 0:
                self._checkpoint()
            if self.data.val is not None and config.val_every and (done or self.iteration % config.val_every == 0):
                metrics = self.validate(writer)
        bar.close()
        if writer is not None:
            writer.close()
        if self.is_main:
            self._save_model(metrics)
        return metrics

    def _step(self, network, images, labels, writer, bar) -> float:
        config = self.config
        lr = poly_lr(config.base_lr, self.iteration, config.iterations, config.lr_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = prepare_input(images.to(self.device, non_blocking=True), self.model.config)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = network(images)
        loss, per_branch = self.criterion({k: v.float() for k, v in outputs.items()}, labels)
        if "gate" in outputs:
            per_branch["gate_sparsity"] = self._gate_loss(outputs["gate"])
            loss = loss + per_branch["gate_sparsity"]
        if not finite_on_every_rank(loss, self.world):
            raise FloatingPointError(f"loss became non-finite (here {loss.item()}) at iteration {self.iteration}"
                                     f"{' on at least one of the processes' if self.world > 1 else ''}; "
                                     "lower base_lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.is_main and (self.iteration % self.config.log_every == 0):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if writer is not None:
                writer.add_scalar("train/loss", loss.item(), self.iteration)
                writer.add_scalar("train/lr", lr, self.iteration)
                for branch, value in per_branch.items():
                    writer.add_scalar(f"train/loss_{branch}", value.item(), self.iteration)
                if "gate" in outputs:  # the mean coarse-to-fine weight: where the sparsity term holds it
                    writer.add_scalar("train/gate_active", self.gate_active.item(), self.iteration)
        return lr

    def _gate_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """The sparsity term; advances the gate's moving average q (kept in the model's state)."""
        gate = self.model.region_gate
        self.gate_active = torch.sigmoid(scores.detach()).mean()  # read (a sync on CUDA) only when logged
        loss, gate.active_mean = sparsity_loss(scores, gate.active_mean, self.config.gate_target_active,
                                               self.config.gate_sparsity_weight)
        return loss

    def validate(self, writer=None) -> dict:
        data = self.data
        metrics = evaluate(self.model, data.val, data.val_classes, self.device, progress=False,
                           prediction_lut=data.val_prediction_lut)
        if self.is_main:
            summary = {b: round(m["miou"] or 0.0, 4) for b, m in metrics.items()}
            tqdm.write(f"iteration {self.iteration}: val mIoU {summary}")
            record = {"iteration": self.iteration, **metrics}
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if writer is not None:
                for branch, report in metrics.items():
                    writer.add_scalar(f"val/miou_{branch}", report["miou"] or 0.0, self.iteration)
        self.model.train()
        return metrics

    def _wrapped(self):
        self.model = self.model.to(memory_format=torch.channels_last)
        if self.world == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _tensorboard(self):
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.iteration)

    def _checkpoint(self) -> None:
        if self.is_main:
            save_state(self.out_dir / STATE_FILE, self.model, self.optimizer, self.scaler, self.iteration,
                       self.config)

    def _save_model(self, metrics: dict) -> None:
        provenance = {"icnet_ros_version": __version__, "torch_version": torch.__version__,
                      "iteration": self.iteration, "train_config": config_to_dict(self.config),
                      "world_size": self.world, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "class_weights": self.class_weights, "targets": list(self.data.vocabulary.names),
                      "data": self.data.described, "init_from_provenance": self.lineage,
                      "val_miou": {b: m["miou"] for b, m in metrics.items()}}
        save_model(self.out_dir / MODEL_FILE, self.model.cpu(), provenance)
        self.model.to(self.device)
        tqdm.write(f"wrote {self.out_dir / MODEL_FILE}")


# --- the whole run --------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """The training sources (labels as target ids) and the validation set, in one place."""

    sources: list  # the main data set, then each mix source
    vocabulary: TargetVocabulary
    val: object | None  # labels in val_classes
    val_classes: ClassMap
    val_prediction_lut: np.ndarray | None  # model class -> val class, when they differ
    described: list[dict]  # each source as the provenance records it (describe_sources)


def describe_sources(config: TrainConfig, sources: list) -> list[dict]:
    """Each source as the provenance records it; generated drives also with how they were made, read
    from their manifest when the data is loaded (a broken manifest stops the run before it trains)."""
    specs = [(config.dataset, config.data_root, config.train_split, config.label_sets)]
    specs += [(m.dataset, m.data_root, m.split, m.label_sets) for m in config.mix]
    described = []
    for (dataset, root, split, label_sets), source, share in zip(specs, sources, batch_shares(config)):
        entry = {"dataset": dataset, "split": split, "label_sets": label_sets or None, "images": len(source),
                 "per_batch": share}
        manifest = read_manifest(root)
        if manifest is not None and split in manifest["splits"]:
            entry["generated"] = manifest["splits"][split]
        described.append(entry)
    return described


def build_training_data(config: TrainConfig, class_map: ClassMap) -> TrainingData:
    """Every source's labels as target ids of one vocabulary (sets where label_sets says so)."""
    vocabulary, luts = build_vocabulary(class_map, [n for n in [config.label_sets, *(m.label_sets for m in config.mix)]
                                                    if n])

    def source(dataset, root, split, label_sets):
        if not label_sets:
            return build_dataset(dataset, root, split, class_map, skip_bad=config.skip_bad)
        return build_dataset(dataset, root, split, load_label_map(label_sets).target, skip_bad=config.skip_bad,
                             relabel=luts[label_sets])

    sources = [source(config.dataset, config.data_root, config.train_split, config.label_sets)]
    sources += [source(m.dataset, m.data_root, m.split, m.label_sets) for m in config.mix]
    for dataset in sources:
        dataset.require_labels("training")
    val, val_classes, prediction_lut = None, class_map, None
    if config.label_sets:
        # validation scores the model in the data's own classes, its predictions mapped to them
        label_map = load_label_map(config.label_sets)
        val_classes, prediction_lut = label_map.target, label_map.prediction_lut("validation")
    if config.val_split:
        val = build_dataset(config.dataset, config.data_root, config.val_split, val_classes, skip_bad=config.skip_bad)
        val.require_labels("validation")
    return TrainingData(sources, vocabulary, val, val_classes, prediction_lut, describe_sources(config, sources))


def initial_model(config: TrainConfig, class_map: ClassMap) -> ICNet:
    """A fresh ICNet, or the init_from checkpoint at its own width (training_stages prunes it)."""
    if config.gate_region_size and config.compress_schedule:
        raise ValueError("a region gate is added after compression: run compress_schedule without "
                         "gate_region_size, then fine-tune the pruned model with the gate")
    if config.init_classes_from and not config.init_from:
        raise ValueError(f"init_classes_from {config.init_classes_from!r} re-heads the init_from checkpoint, but "
                         "init_from is empty; give the checkpoint to start from")
    if config.init_from and config.init_classes_from:
        model = model_with_classes_from(config.init_from, config.init_classes_from, class_map)
    elif config.init_from:
        model = load_model(config.init_from, expected_num_classes=class_map.num_classes)
    else:
        model = ICNet(ModelConfig(num_classes=class_map.num_classes, keep_rate=config.keep_rate,
                                  class_map=class_map.name, input_size=config.image_size,
                                  gate_region_size=config.gate_region_size))
        if model.region_gate is not None:
            model.region_gate.active_mean.fill_(config.gate_target_active)
        return model
    model = with_gate(model, config)
    if model.config.keep_rate < config.keep_rate:
        raise ValueError(f"init_from {config.init_from} has keep rate {model.config.keep_rate}, narrower "
                         f"than keep_rate {config.keep_rate}; pruning only removes filters")
    if config.image_size is not None:
        model.config = replace(model.config, input_size=config.image_size)
    return model.train()


def with_gate(model: ICNet, config: TrainConfig) -> ICNet:
    """`model` with the configured region gate added (fresh) when it has none; its other weights kept."""
    size = config.gate_region_size
    if size == model.config.gate_region_size:
        return model
    if not size:
        raise ValueError(f"init_from has a region gate of {model.config.gate_region_size} px but gate_region_size "
                         f"is 0; set gate_region_size: {model.config.gate_region_size}")
    if model.config.gate_region_size:
        raise ValueError(f"init_from has a region gate of {model.config.gate_region_size} px, the recipe asks for "
                         f"{size}; a gate cannot change its region size")
    if config.compress_schedule or model.config.keep_rate != config.keep_rate:
        raise ValueError(f"a region gate is added after compression: prune to keep_rate {config.keep_rate} first "
                         f"(init_from is at {model.config.keep_rate}), then fine-tune with the gate")
    gated = ICNet(replace(model.config, gate_region_size=size))
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("region_gate.") for key in missing):
        raise ValueError(f"cannot add a gate to init_from: unexpected {unexpected}, missing {missing}")
    with torch.no_grad():
        gated.region_gate.active_mean.fill_(config.gate_target_active)
    return gated.train(model.training)


def model_with_classes_from(path: str, label_map_name: str, class_map: ClassMap) -> ICNet:
    """The checkpoint at `path`, re-headed for `class_map`'s classes through a label map.

    Every class's classifier rows start as those of the class it maps to, and its bias is lowered
    by log(size of that class's set): the summed probability of a set then equals the old model's
    probability of its class, so training starts from the old model's answers, not from noise.
    """
    label_map = load_label_map(label_map_name)
    if label_map.source.name != class_map.name:
        raise ValueError(f"init_classes_from {label_map_name!r} maps {label_map.source.name!r} classes; the model "
                         f"predicts {class_map.name!r}")
    old = load_model(path, expected_class_map=label_map.target.name)
    old_class = label_map.prediction_lut("init_classes_from")
    model = ICNet(replace(old.config, num_classes=class_map.num_classes, class_map=class_map.name))
    set_size = torch.from_numpy(np.bincount(old_class, minlength=label_map.target.num_classes)[old_class]).float()
    state = old.state_dict()
    index = torch.from_numpy(old_class)
    for name in model.state_dict():
        if not _is_classifier(name):
            continue
        # a classifier (weight: classes x in x 1 x 1, bias: classes): one row per new class
        rows = state[name][index]
        state[name] = rows - torch.log(set_size) if name.endswith("bias") else rows
    model.load_state_dict(state, strict=True)
    return model


def _is_classifier(parameter: str) -> bool:
    """The 1x1 convolutions with one output per class: the sub124 classifier and the two aux heads."""
    return parameter.split(".")[0] == "classifier" or ".aux_classifier." in parameter


def training_stages(config: TrainConfig, start_keep_rate: float) -> list[tuple[Path, float]]:
    """(directory, keep rate) of each stage: one plain run, or one stage per cut of compression.

    Starting from a wider checkpoint without a compress_schedule, the paper's progressive schedule
    is used (keep 3/4, fine-tune, 1/2, fine-tune, ...): one deep cut loses far more than it recovers.
    """
    out_dir = Path(config.out_dir)
    schedule = tuple(config.compress_schedule)
    if not schedule and start_keep_rate != config.keep_rate:
        schedule = tuple(progressive_schedule(start_keep_rate, config.keep_rate))
    if not schedule:
        return [(out_dir, start_keep_rate)]
    return [(out_dir / f"keep{rate:g}", rate) for rate in schedule]


def stage_model(model: ICNet, keep_rate: float, sync_batchnorm: bool) -> ICNet:
    """`model` pruned to keep_rate (if narrower), with SyncBatchNorm when training on several GPUs.

    prune_model builds fresh BatchNorm layers, so the conversion happens after every cut.
    """
    if keep_rate != model.config.keep_rate:
        model = prune_model(model, keep_rate)
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run training (or progressive compression) as configured; returns the final model's path."""
    rank, world, local_rank = init_distributed("cuda" if config.device != "cpu" and torch.cuda.is_available()
                                               else "cpu")
    device = pick_device(config, local_rank)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    class_map = load_class_map(config.class_map)
    data = build_training_data(config, class_map)
    class_weights = resolve_class_weights(config.class_weights, config.class_weight_power, data.sources,
                                          data.vocabulary)
    model = initial_model(config, class_map)
    lineage = checkpoint_provenance(config.init_from) if config.init_from else None
    stages = training_stages(config, model.config.keep_rate)
    for stage_dir, rate in stages:
        if resume and (stage_dir / MODEL_FILE).is_file() and not (stage_dir / STATE_FILE).is_file():
            model = load_model(stage_dir / MODEL_FILE).train()
            continue
        model = stage_model(model, rate, sync_batchnorm=world > 1 and device.type == "cuda")
        stage_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            atomic_write_text(stage_dir / "config.json", json.dumps(config_to_dict(replace(config, keep_rate=rate)),
                                                                    indent=2))
        stage = Stage(model, config, stage_dir, data, device, rank, world, class_weights, lineage)
        if resume:
            stage.resume()
        stage.run()
        if rank == 0:
            (stage_dir / STATE_FILE).unlink(missing_ok=True)  # finished: resume goes on to the next stage
        model = stage.model
    if world > 1:
        dist.barrier()
    return stages[-1][0] / MODEL_FILE
