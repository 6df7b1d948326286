"""Training: batches as functions of (seed, iteration), the poly schedule, config files, resume."""
import math
from pathlib import Path

import pytest

from icnet_ros.config import ConfigError, load_config
from icnet_ros.training.config import TrainConfig
from icnet_ros.training.trainer import IterationBatches, poly_lr

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "train"


def test_batches_depend_only_on_seed_and_iteration():
    full = list(IterationBatches(10, 4, 6, seed=1))
    resumed = list(IterationBatches(10, 4, 6, seed=1, start=3))
    assert resumed == full[3:]
    assert list(IterationBatches(10, 4, 6, seed=2)) != full


def test_every_sample_is_seen_once_per_epoch():
    batches = list(IterationBatches(12, 4, 3, seed=0))
    assert sorted(index for batch in batches for _, index, _, _ in batch) == list(range(12))


def test_processes_split_the_global_batch_without_overlap():
    single = list(IterationBatches(20, 4, 3, seed=0))
    ranks = [list(IterationBatches(20, 4, 3, seed=0, rank=r, world=2)) for r in range(2)]
    for iteration in range(3):
        assert ranks[0][iteration] + ranks[1][iteration] == single[iteration]
    with pytest.raises(ValueError, match="divisible"):
        IterationBatches(20, 3, 3, seed=0, world=2)


def test_poly_learning_rate():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100, 0.9), 0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


@pytest.mark.parametrize("name", ["cityscapes", "camvid", "cocostuff", "synthetic"])
def test_shipped_training_configs_train_every_branch_and_the_full_resolution_one_most(name):
    """What the cascade's weights do, not their values: with each shipped config's weights, a mistake
    in any branch raises the loss, and one in the full-resolution branch (what the node publishes)
    raises it most."""
    config = load_config(TrainConfig, CONFIG_DIR / f"{name}.yaml")
    branches = ("sub4", "sub24", "sub124")
    criterion = CascadeLoss(dict(zip(branches, config.loss_weights)))
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    sizes = {"sub4": 4, "sub24": 8, "sub124": 16}  # the branches' own resolutions: 1/8, 1/4, 1/2 of the labels

    def logits(wrong: str | None) -> dict:
        out = {}
        for branch, size in sizes.items():
            scores = torch.zeros(1, 3, size, size)
            scores[:, 1 if branch == wrong else 0] = 5.0  # the wrong branch says class 1 everywhere
            out[branch] = scores
        return out

    right = float(criterion(logits(None), labels)[0])
    worse = {branch: float(criterion(logits(branch), labels)[0]) - right for branch in branches}
    assert all(increase > 1e-3 for increase in worse.values()), worse
    assert worse["sub124"] == max(worse.values()), worse


def test_paper_defaults_per_dataset():
    iterations = {n: load_config(TrainConfig, CONFIG_DIR / f"{n}.yaml").iterations
                  for n in ("cityscapes", "camvid", "cocostuff")}
    assert iterations == {"cityscapes": 30000, "camvid": 10000, "cocostuff": 30000}
    defaults = TrainConfig()
    assert (defaults.base_lr, defaults.lr_power, defaults.momentum, defaults.weight_decay,
            defaults.batch_size, defaults.scale_range) == (0.01, 0.9, 0.9, 1e-4, 16, (0.5, 2.0))


def test_unknown_keys_and_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, None, ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="iterations: expected an integer"):
        load_config(TrainConfig, None, ["iterations=ten"])


# --- end-to-end runs on a tiny Cityscapes layout made here ------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from icnet_ros.model.checkpoint import read_checkpoint  # noqa: E402


def write_tiny_cityscapes(root: Path, frames=(("train", 6), ("val", 2)), size=(64, 128)) -> Path:
    """Blocks of a few classes in the Cityscapes layout (train ids written as *_labelTrainIds.png)."""
    rng = np.random.default_rng(0)
    for split, count in frames:
        for index in range(count):
            label = rng.choice([0, 2, 8, 10, 13], size=(size[0] // 16, size[1] // 16))
            label = label.repeat(16, 0).repeat(16, 1).astype(np.uint8)
            image = np.stack([label * 9 % 255, label * 23 % 255, label * 41 % 255], -1).astype(np.uint8)
            image = cv2.add(image, rng.integers(0, 30, image.shape, dtype=np.uint8))
            stem = f"tiny_{index:06d}_000019"
            for folder, suffix, data in (("leftImg8bit", "leftImg8bit", image[..., ::-1]),
                                         ("gtFine", "gtFine_labelTrainIds", label)):
                path = root / folder / split / "tiny" / f"{stem}_{suffix}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), data)
    return root


def train_command(data_root: Path, out_dir: Path, iterations=12, extra=()):
    return [sys.executable, "-m", "icnet_ros.training.cli", "--config",
            str(CONFIG_DIR / "synthetic.yaml"), f"data_root={data_root}", f"out_dir={out_dir}",
            f"iterations={iterations}", "batch_size=2", "crop_size=[64, 64]", "workers=0",
            "checkpoint_every=2", "val_every=0", "threads=1", "deterministic=true", *extra]


def final_weights(out_dir: Path) -> dict:
    return read_checkpoint(out_dir / "model.safetensors")[1]


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path):
    # Long enough (60 iterations) that the kill always lands mid-run, even on a loaded machine.
    data = write_tiny_cityscapes(tmp_path / "data")
    subprocess.run(train_command(data, tmp_path / "straight", iterations=60), check=True, capture_output=True)
    killed = subprocess.Popen(train_command(data, tmp_path / "killed", iterations=60),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if state.is_file() and torch.load(state, weights_only=True)["iteration"] >= 4:
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run must be killed mid-way"
    resumed_from = torch.load(state, weights_only=True)["iteration"]
    assert 4 <= resumed_from < 60
    subprocess.run(train_command(data, tmp_path / "killed", iterations=60, extra=["--resume"]), check=True,
                   capture_output=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert read_checkpoint(tmp_path / "killed" / "model.safetensors")[2]["iteration"] == 60
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_two_process_torchrun_on_cpu_trains_and_evaluates(tmp_path):
    data = write_tiny_cityscapes(tmp_path / "data", frames=(("train", 8), ("val", 3)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *train_command(data, tmp_path / "ddp", iterations=6, extra=["val_every=6", "device=cpu"])[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(metrics) == 1 and "sub124" in metrics[0]
    assert read_checkpoint(tmp_path / "ddp" / "model.safetensors")[2]["world_size"] == 2


# --- defects found in review ------------------------------------------------------------------------
from icnet_ros.classmap import load_class_map  # noqa: E402
from icnet_ros.data.datasets import DatasetError, build_dataset  # noqa: E402
from icnet_ros.model import ICNet, ModelConfig  # noqa: E402
from icnet_ros.model.checkpoint import save_model  # noqa: E402
from icnet_ros.training.trainer import finite_on_every_rank, stage_model, training_stages  # noqa: E402


def test_syncbatchnorm_survives_every_pruning_cut():
    model = ICNet(ModelConfig(keep_rate=1.0, num_classes=4))
    for rate in (0.75, 0.5):
        model = stage_model(model, rate, sync_batchnorm=True)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert model.config.keep_rate == rate and norms
        assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm)
                   for m in stage_model(ICNet(ModelConfig(num_classes=4)), 0.25, sync_batchnorm=False).modules())


def test_init_from_a_wider_model_prunes_progressively(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "run"), keep_rate=0.25, init_from="wide.safetensors")
    stages = training_stages(config, start_keep_rate=1.0)
    assert [rate for _, rate in stages] == [0.75, 0.5, 0.25]
    assert [d.name for d, _ in stages] == ["keep0.75", "keep0.5", "keep0.25"]
    assert training_stages(TrainConfig(out_dir="r", keep_rate=0.5), 0.5) == [(Path("r"), 0.5)]


def test_init_from_a_wider_checkpoint_fine_tunes_after_each_cut(tmp_path):
    data = write_tiny_cityscapes(tmp_path / "data")
    wide = save_model(tmp_path / "wide.safetensors", ICNet(ModelConfig(keep_rate=0.75, num_classes=19)))
    subprocess.run(train_command(data, tmp_path / "run", iterations=2,
                                 extra=[f"init_from={wide}", "keep_rate=0.25"]), check=True, capture_output=True)
    for rate in (0.5, 0.25):
        config, _, provenance = read_checkpoint(tmp_path / "run" / f"keep{rate:g}" / "model.safetensors")
        assert config.keep_rate == rate and provenance["iteration"] == 2


def _nan_on_rank_one(rank, world, store_path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    loss = torch.tensor(float("nan") if rank == 1 else 0.5)
    results[rank] = finite_on_every_rank(loss, world)
    dist.destroy_process_group()


def test_a_nan_on_one_process_stops_every_process(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    context = mp.spawn(_nan_on_rank_one, args=(2, tmp_path / "store", results), nprocs=2, join=False)
    deadline = time.time() + 120
    while not context.join(timeout=1):
        assert time.time() < deadline, "a process is still waiting: the NaN was not agreed on"
    assert dict(results) == {0: False, 1: False}
    assert finite_on_every_rank(torch.tensor(1.0), world=1)


def test_a_split_without_labels_is_refused_before_training(tmp_path):
    root = write_tiny_cityscapes(tmp_path / "data", frames=(("train", 3),))
    for label in (root / "gtFine" / "train").rglob("*.png"):
        label.unlink()
    dataset = build_dataset("cityscapes", root, "train", load_class_map("cityscapes"))
    with pytest.raises(DatasetError, match=r"3 of 3 images have no label.*training needs one.*gtFine"):
        dataset.require_labels("training")
    result = subprocess.run(train_command(root, tmp_path / "run", iterations=2, extra=["val_split="]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "have no label" in result.stderr


# --- the real-image recipe: class balancing, colour jitter, input size --------------------------------
from icnet_ros.data.transforms import augment_sample, color_jitter, white_balance_jitter  # noqa: E402
from icnet_ros.model.loss import CascadeLoss  # noqa: E402
from icnet_ros.training.class_weights import class_frequencies, median_frequency_weights  # noqa: E402


def test_median_frequency_weights_favour_rare_classes(tmp_path):
    root = write_tiny_cityscapes(tmp_path / "data", frames=(("train", 4),))
    class_map = load_class_map("cityscapes")
    dataset = build_dataset("cityscapes", root, "train", class_map)
    frequencies = class_frequencies([dataset], class_map.num_classes, class_map.ignore_index)
    present = [0, 2, 8, 10, 13]
    assert np.isfinite(frequencies[present]).all() and np.isnan(np.delete(frequencies, present)).all()
    weights = median_frequency_weights(frequencies)
    assert np.isclose(np.median(weights[present]), 1.0)
    rarest, commonest = present[int(np.argmin(frequencies[present]))], present[int(np.argmax(frequencies[present]))]
    assert weights[rarest] > 1.0 > weights[commonest]
    assert np.allclose(median_frequency_weights(frequencies, power=0.5)[present], np.sqrt(weights[present]))


def test_class_weights_reach_the_loss():
    logits = {b: torch.zeros(1, 3, 4, 4) for b in ("sub4", "sub24", "sub124")}
    logits["sub124"][:, 0] = 1.0
    labels = torch.tensor([[[0, 0, 1, 1]] * 4])
    plain, _ = CascadeLoss()(logits, labels)
    weighted, _ = CascadeLoss(class_weights=torch.tensor([1.0, 9.0, 1.0]))(logits, labels)
    assert weighted > plain  # the misclassified class 1 now weighs more


def test_colour_jitter_is_seeded_and_zero_strength_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert np.array_equal(color_jitter(image, np.random.default_rng(5), 0.3),
                          color_jitter(image, np.random.default_rng(5), 0.3))
    assert np.abs(color_jitter(image, np.random.default_rng(5), 0.0).astype(int) - image).max() <= 1
    label = np.zeros((32, 48), np.uint8)
    out, out_label = augment_sample(image, label, np.random.default_rng(1), crop_size=(32, 48),
                                    scale_range=(1, 1), mirror=False, jitter=0.3)
    assert out.shape == image.shape and not np.array_equal(out, image) and (out_label == 0).all()


def test_white_balance_jitter_tints_the_channels_apart():
    gray = np.full((8, 8, 3), 100, np.uint8)
    tinted = white_balance_jitter(gray, np.random.default_rng(3), 0.3)
    gains = tinted[0, 0].astype(float) / 100
    assert ((gains >= 0.7 - 0.01) & (gains <= 1.3 + 0.01)).all() and len(set(tinted[0, 0])) == 3
    assert (tinted == tinted[0, 0]).all()  # one gain per channel, the same over the whole image
    assert np.array_equal(white_balance_jitter(gray, np.random.default_rng(3), 0.0), gray)
    out, _ = augment_sample(gray, np.zeros((8, 8), np.uint8), np.random.default_rng(1), crop_size=(8, 8),
                            scale_range=(1, 1), mirror=False, white_balance=0.3)
    assert len(set(out[0, 0])) == 3


def test_image_size_with_a_zero_keeps_the_aspect_ratio_in_training():
    image = np.zeros((36, 48, 3), np.uint8)
    label = np.ones((36, 48), np.uint8)
    _, out_label = augment_sample(image, label, np.random.default_rng(0), crop_size=(80, 80),
                                    scale_range=(1, 1), mirror=False, image_size=(72, 0), ignore_index=255)
    assert (out_label[:72, :] != 255).all() and (out_label[72:] == 255).all()  # 72x96, padded to 80x96 crop
    assert (out_label[:72, :80] == 1).all()
