"""Which checkpoint to load for a dataset and a compression level, and the models shipped inside the package.

The node and the launch file select a model by dataset (class map) and kernel keeping rate. A
folder of checkpoints named icnet_<dataset>_keep<rate>.safetensors serves every combination (the
imported Cityscapes weights go there as icnet_cityscapes_keep0.5.safetensors); with no folder, the
bundled models answer at keep rate 0.25:

- cityscapes: Cityscapes' 19 classes learnt from CamVid's real frames (labels as sets of Cityscapes
  classes) and synthetic drives (exact labels), from the CamVid model; the default;
- camvid: trained here from scratch on CamVid's real driving frames (11 classes);
- camvid_sparse (by name only): the camvid model fine-tuned with a spatial-sparsity gate
  (model/sparsity.py), for high_res_regions > 0;
- the demo weights (by name, `demo`, and for the demo drive): trained on synthetic drives only. They
  show the pipeline working and are not a model for real roads; the node says so.

A bundled model can also be asked for by its name (model:=cityscapes, camvid, camvid_sparse or demo).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from icnet_ros.model.checkpoint import CheckpointError, read_checkpoint
from icnet_ros.paths import asset_path


@dataclass(frozen=True)
class BundledModel:
    """A checkpoint shipped in icnet_ros/assets/, and how it was made."""

    name: str  # model:=<name> selects it
    file: str
    dataset: str
    keep_rate: float
    synthetic: bool  # trained on synthetic drives only: the node warns that it is a demo
    training_command: str


DEMO = BundledModel("demo", "demo_synthetic_keep0.25.safetensors", "cityscapes", 0.25, True,
                    "icnet-make-drives --out data/synthetic_demo --splits train=400,val=40 --height 512 --width 1024 "
                    "&& icnet-train --config config/train/demo.yaml")
CAMVID = BundledModel("camvid", "camvid_keep0.25.safetensors", "camvid", 0.25, False,
                      "icnet-train --config config/train/camvid_cpu.yaml data_root=<CamVid (SegNet layout)> && "
                      "icnet-train --config config/train/camvid_cpu_robust.yaml data_root=<CamVid (SegNet layout)> && "
                      "python -m icnet_ros.model.checkpoint runs/camvid_cpu_robust/model.safetensors "
                      "camvid_keep0.25.safetensors --fp16")
CAMVID_SPARSE = BundledModel("camvid_sparse", "camvid_sparse_keep0.25.safetensors", "camvid", 0.25, False,
                             "icnet-train --config config/train/camvid_sparse_cpu.yaml data_root=<CamVid (SegNet layout)> "
                             "&& python -m icnet_ros.model.checkpoint runs/camvid_sparse_cpu/model.safetensors "
                             "camvid_sparse_keep0.25.safetensors --fp16")
CITYSCAPES = BundledModel("cityscapes", "cityscapes_keep0.25.safetensors", "cityscapes", 0.25, False,
                          "icnet-make-drives --out data/synthetic_drives --splits train=400 --height 512 --width 1024 "
                          "&& icnet-train --config config/train/cityscapes_cpu.yaml data_root=<CamVid (SegNet layout)> "
                          "&& icnet-train --config config/train/cityscapes_settle_cpu.yaml data_root=<CamVid (SegNet layout)> "
                          "&& icnet-train --config config/train/cityscapes_rare_cpu.yaml data_root=<CamVid (SegNet layout)> "
                          "&& python -m icnet_ros.model.checkpoint runs/cityscapes_settle/model.safetensors "
                          "runs/cityscapes_soup/model.safetensors --average-with runs/cityscapes_rare/model.safetensors --fp16 "
                          "&& icnet-make-drives --out data/street_drives --splits train=400 --height 512 --width 1024 "
                          "--object-mix config/synthetic/street_mix.yaml "
                          "&& icnet-train --config config/train/cityscapes_street_cpu.yaml data_root=<CamVid (SegNet layout)> "
                          "&& python -m icnet_ros.model.checkpoint runs/cityscapes_street/model.safetensors "
                          "cityscapes_keep0.25.safetensors --fp16")
# the first bundled model of a dataset and keep rate is the one selected by them
BUNDLED_MODELS = (CITYSCAPES, CAMVID, CAMVID_SPARSE, DEMO)
BUNDLED_BY_NAME = {model.name: model for model in BUNDLED_MODELS}
DEMO_DATASET, DEMO_KEEP_RATE = DEMO.dataset, DEMO.keep_rate


def bundled_weights(model: BundledModel) -> Path:
    """The file of a bundled model, or CheckpointError saying how to rebuild it."""
    path = asset_path(model.file)
    if not path.is_file():
        raise CheckpointError(f"the bundled model {path} is missing from this installation; reinstall icnet_ros, "
                              f"or rebuild it with: {model.training_command}")
    return path


def demo_weights() -> Path:
    """The bundled demo checkpoint (keep rate 0.25, Cityscapes classes, trained on synthetic drives)."""
    return bundled_weights(DEMO)


def cityscapes_weights() -> Path:
    """The bundled Cityscapes checkpoint (keep rate 0.25, 19 classes, CamVid's real frames + synthetic drives)."""
    return bundled_weights(CITYSCAPES)


def camvid_weights() -> Path:
    """The bundled CamVid checkpoint (keep rate 0.25, CamVid's 11 classes, trained on real driving frames)."""
    return bundled_weights(CAMVID)


def checkpoint_name(dataset: str, keep_rate: float) -> str:
    """icnet_<dataset>_keep<rate>.safetensors, the rate as written in the launch argument (1.0, 0.5, 0.25)."""
    return f"icnet_{dataset}_keep{format_keep_rate(keep_rate)}.safetensors"


def format_keep_rate(keep_rate: float) -> str:
    """1.0 -> "1.0", 0.5 -> "0.5", 0.25 -> "0.25": as the launch argument and file names write it."""
    text = f"{float(keep_rate):g}"
    return text if "." in text else f"{text}.0"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    is_demo: bool


def resolve_checkpoint(model: str, model_dir: str, dataset: str, keep_rate: float) -> ResolvedCheckpoint:
    """The checkpoint for these settings, checked to predict `dataset`'s classes at `keep_rate`.

    model: an explicit file, or a bundled model's name (wins); otherwise <model_dir>/<checkpoint_name>;
    otherwise the bundled model of that dataset and keep rate. CheckpointError says what was looked for.
    """
    if model in BUNDLED_BY_NAME and not Path(model).is_file():
        bundled = BUNDLED_BY_NAME[model]
        resolved = ResolvedCheckpoint(bundled_weights(bundled), is_demo=bundled.synthetic)
    elif model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise CheckpointError(f"model {path} does not exist; give the path of a .safetensors checkpoint "
                                  "written by icnet-train, a bundled model's name "
                                  f"({', '.join(BUNDLED_BY_NAME)}), or leave model empty to select one by "
                                  "dataset and keep_rate")
        resolved = ResolvedCheckpoint(path, is_demo=False)
    else:
        resolved = _by_name(model_dir, dataset, keep_rate)
    check_matches(resolved.path, dataset, keep_rate)
    return resolved


def _by_name(model_dir: str, dataset: str, keep_rate: float) -> ResolvedCheckpoint:
    name = checkpoint_name(dataset, keep_rate)
    looked = []
    if model_dir:
        candidate = Path(model_dir).expanduser() / name
        if candidate.is_file():
            return ResolvedCheckpoint(candidate, is_demo=False)
        looked.append(str(candidate))
    for bundled in BUNDLED_MODELS:
        if dataset == bundled.dataset and float(keep_rate) == bundled.keep_rate:
            return ResolvedCheckpoint(bundled_weights(bundled), is_demo=bundled.synthetic)
    where = f"looked for {looked[0]}" if looked else "model and model_dir are empty"
    shipped = ", ".join(f"{m.name} ({m.dataset} at {m.keep_rate:g})" for m in BUNDLED_MODELS)
    hint = ("; for the authors' Cityscapes weights run icnet-import and put the result there"
            if dataset == "cityscapes" else "")
    raise CheckpointError(
        f"no checkpoint for dataset {dataset} at keep rate {keep_rate:g} ({where}). Train one with "
        f"`icnet-train --dataset {dataset} keep_rate={keep_rate:g}` and copy its model.safetensors to "
        f"<model_dir>/{name}{hint}, or pass model:=<file>. Bundled models: {shipped}."
    )


def check_matches(path: Path, dataset: str, keep_rate: float) -> None:
    """CheckpointError unless the checkpoint predicts `dataset`'s class map at `keep_rate`."""
    config = read_checkpoint(path)[0]
    problems = []
    if config.class_map != dataset:
        problems.append(f"it predicts the {config.class_map!r} class map, not {dataset!r}")
    if abs(config.keep_rate - float(keep_rate)) > 1e-9:
        problems.append(f"its keep rate is {config.keep_rate:g}, not {float(keep_rate):g}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the requested settings: {'; '.join(problems)}. "
                              f"Set dataset:={config.class_map} keep_rate:={config.keep_rate:g}, or choose "
                              "another checkpoint")
