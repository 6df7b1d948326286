"""Model checkpoints: weights in safetensors, the ModelConfig and provenance in its metadata.

One file rebuilds the model with no other input. Loading parses JSON and tensors only: nothing in
the file is executed. Writes are atomic, so a crash never leaves a torn checkpoint behind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from icnet_ros.atomic import atomic_path
from icnet_ros.config import ConfigError, config_from_dict, config_to_dict
from icnet_ros.model.icnet import ICNet, ModelConfig

FORMAT = "icnet_ros.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit what the caller needs."""


def save_model(path: str | Path, model: ICNet, provenance: dict[str, Any] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `model`'s weights and configuration to a safetensors file, atomically.

    dtype (e.g. torch.float16) stores the floating-point tensors narrower, halving a shipped file;
    load_model casts them back into the float32 model.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(config_to_dict(model.config)),
        "provenance": json.dumps(provenance or {}, default=str),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, provenance) from a checkpoint, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint ({error}); it may be truncated or corrupt"
        ) from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an icnet_ros checkpoint (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r}); save models with icnet_ros.model.checkpoint"
        )
    try:
        config = config_from_dict(ModelConfig, json.loads(metadata["model_config"]), f"{path} model_config")
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable model configuration in metadata ({error})") from error
    return config, state, provenance


def load_model(path: str | Path, expected_num_classes: int | None = None,
               expected_class_map: str | None = None, map_location: str | torch.device = "cpu") -> ICNet:
    """Rebuild the ICNet stored in `path` (eval mode). Optionally check its classes fit the caller."""
    config, state, _ = read_checkpoint(path)
    if expected_num_classes is not None and config.num_classes != expected_num_classes:
        raise CheckpointError(
            f"{path} predicts {config.num_classes} classes (class map {config.class_map!r}) but "
            f"{expected_num_classes} are expected; use a checkpoint trained for this class map"
        )
    if expected_class_map is not None and config.class_map != expected_class_map:
        raise CheckpointError(
            f"{path} was trained for class map {config.class_map!r}, not {expected_class_map!r}"
        )
    model = ICNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the stored configuration {config}: {error}") from error
    return model.to(map_location).eval()


def checkpoint_provenance(path: str | Path) -> dict[str, Any]:
    return read_checkpoint(path)[2]


def average_models(first: str | Path, second: str | Path, second_weight: float = 0.5) -> tuple[ICNet, dict[str, Any]]:
    """(model, provenance) whose floating-point tensors are (1 - w) * first + w * second, w = second_weight.

    Weight averaging of fine-tunes of one model (a "model soup": Wortsman et al., "Model soups: averaging
    weights of multiple fine-tuned models improves accuracy without increasing inference time", ICML 2022)
    often keeps what each learnt better than either alone. BatchNorm's running statistics are averaged
    too (the mean of two variances only approximates the averaged network's: evaluate the result);
    integer tensors (BatchNorm's batch counters) come from `first`. Both files must hold the same network.
    """
    if not 0.0 <= second_weight <= 1.0:
        raise CheckpointError(f"the second model's weight (--other-weight) must be in [0, 1], got {second_weight}")
    config, state, provenance = read_checkpoint(first)
    other_config, other_state, other_provenance = read_checkpoint(second)
    if other_config != config:
        raise CheckpointError(f"{first} and {second} hold different networks ({config} against {other_config}); "
                              f"only fine-tunes of one model can be averaged")
    if other_state.keys() != state.keys():
        differing = sorted(state.keys() ^ other_state.keys())
        raise CheckpointError(f"{first} and {second} have different tensors ({', '.join(differing[:5])}); only "
                              f"fine-tunes of one model can be averaged")
    averaged = {key: torch.lerp(value.float(), other_state[key].float(), second_weight)
                if value.is_floating_point() else value for key, value in state.items()}
    model = ICNet(config)
    model.load_state_dict(averaged, strict=True)
    sources = [{"file": str(path), "weight": weight, "provenance": source_provenance}
               for path, weight, source_provenance in ((first, 1.0 - second_weight, provenance),
                                                       (second, second_weight, other_provenance))]
    return model.eval(), {"averaged_from": sources}


def main(argv: list[str] | None = None) -> int:
    """`python -m icnet_ros.model.checkpoint IN OUT [--fp16] [--average-with OTHER]`: a copy of a
    checkpoint, stored in fp16, or averaged with another fine-tune of the same model."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m icnet_ros.model.checkpoint", description=main.__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--fp16", action="store_true", help="store the floating-point tensors as float16")
    parser.add_argument("--average-with", type=Path, metavar="OTHER",
                        help="average the weights with OTHER, a fine-tune of the same model (a model soup)")
    parser.add_argument("--other-weight", type=float, default=0.5,
                        help="OTHER's share of the average (default %(default)s: the plain mean)")
    args = parser.parse_args(argv)
    try:
        if args.average_with is not None:
            model, provenance = average_models(args.source, args.average_with, args.other_weight)
        else:
            provenance = read_checkpoint(args.source)[2]
            model = load_model(args.source)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    provenance = {**provenance, "stored_as": "float16" if args.fp16 else "float32", "converted_from": args.source.name}
    save_model(args.target, model, provenance, torch.float16 if args.fp16 else None)
    print(f"wrote {args.target} ({args.target.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
