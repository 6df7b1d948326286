"""`icnet-export`: ONNX export of the inference graph, checked against PyTorch; and model summaries.

    icnet-export model.safetensors -o icnet.onnx --branch sub124 --height 1024 --width 2048
    icnet-export --summary --keep-rate 0.5 --num-classes 19 --height 1024 --width 2048

The exported graph takes `image`: float32 (N, 3, H, W) RGB pixels in 0..255 and returns `logits`
(N, classes, H, W) of the chosen branch (or `labels` (N, H, W) int64 with --labels). Normalization
and BN folding are inside the graph; height and width are dynamic unless --static is given.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icnet_ros.atomic import atomic_path
from icnet_ros.model.checkpoint import load_model, read_checkpoint
from icnet_ros.model.fold import fold_batchnorm
from icnet_ros.model.icnet import BRANCHES, MIN_INPUT_SIZE, ICNet, ModelConfig
from icnet_ros.model.preprocess import normalization_constants
from icnet_ros.model.summary import model_summary

MAX_DYNAMIC_SIZE = 8192


class InferenceGraph(nn.Module):
    """Normalization + BN-folded ICNet + (optionally) argmax: what a deployment runtime executes.

    full_resolution False ends the graph at the branch's own low-resolution logits (H/4 for sub124),
    for runtimes that upsample to the frame themselves, as the engine does.
    """

    def __init__(self, model: ICNet, branch: str = "sub124", labels: bool = False, full_resolution: bool = True):
        super().__init__()
        self.model = fold_batchnorm(model)
        self.model.check_finite = False
        self.branch = branch
        self.labels = labels
        self.full_resolution = full_resolution
        mean, std = normalization_constants(model.config)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.flip = model.config.input_channel_order == "bgr"  # the graph's input is always RGB

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.flip:
            image = image.flip(1)
        x = (image - self.mean) / self.std
        logits = self.model(x, self.branch) if self.full_resolution else self.model.branch_logits(x, self.branch)
        return logits.argmax(1) if self.labels else logits


def export_onnx(model: ICNet, path: Path, branch: str, height: int, width: int, dynamic: bool = True,
                labels: bool = False, opset: int = 18, full_resolution: bool = True) -> Path:
    """Export the inference graph to ONNX atomically; returns the path.

    A network with the released fixed pooling windows (imported Caffe weights) is exported at its
    fixed height and width: its pooling geometry depends on the feature size.
    """
    if dynamic and model.config.pyramid_windows:
        raise ValueError("this network's pyramid pooling windows are fixed for one feature size (released "
                         "Caffe weights): export it with --static at its input size, e.g. --height "
                         f"{(model.config.input_size or (1025, 2049))[0]} --width {(model.config.input_size or (1025, 2049))[1]}")
    graph = InferenceGraph(model, branch, labels, full_resolution).eval()
    example = torch.rand(1, 3, height, width) * 255
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        h = torch.export.Dim("height", min=MIN_INPUT_SIZE, max=MAX_DYNAMIC_SIZE)
        w = torch.export.Dim("width", min=MIN_INPUT_SIZE, max=MAX_DYNAMIC_SIZE)
        dynamic_shapes = {"image": {0: batch, 2: h, 3: w}}
    with atomic_path(path) as tmp:
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=["image"], output_names=["labels" if labels else "logits"],
                                    opset_version=opset, verbose=False)
        _attach_metadata(program.model_proto, model.config, branch)
        program.save(str(tmp))
    return path


def _attach_metadata(proto, config: ModelConfig, branch: str) -> None:
    from icnet_ros.config import config_to_dict

    for key, value in {"icnet_ros.model_config": json.dumps(config_to_dict(config)),
                       "icnet_ros.branch": branch, "icnet_ros.input": "float32 NCHW RGB 0..255"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def check_onnx(model: ICNet, path: Path, branch: str, sizes: list[tuple[int, int]], labels: bool = False,
               seed: int = 0) -> list[dict]:
    """Run the ONNX file with onnxruntime and PyTorch's eager model on the same random inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = InferenceGraph(model, branch, labels=False).eval()
    generator = torch.Generator().manual_seed(seed)
    report = []
    for height, width in sizes:
        image = torch.rand(1, 3, height, width, generator=generator) * 255
        with torch.no_grad():
            expected = reference(image).numpy()
        got = session.run(None, {"image": image.numpy()})[0]
        got_labels = got if labels else got.argmax(1)
        record = {"height": height, "width": width,
                  "label_agreement": float((got_labels == expected.argmax(1)).mean())}
        if not labels:
            record["max_abs_diff"] = float(np.abs(got - expected).max())
            record["max_abs_logit"] = float(np.abs(expected).max())
        report.append(record)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, help="icnet_ros safetensors checkpoint")
    parser.add_argument("-o", "--output", type=Path, help="ONNX file to write (default: <checkpoint>.<branch>.onnx)")
    parser.add_argument("--branch", choices=BRANCHES, default="sub124")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--static", action="store_true", help="fix height and width (default: dynamic)")
    parser.add_argument("--labels", action="store_true", help="output argmax labels instead of logits")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--summary", action="store_true",
                        help="print parameter and MAC counts as JSON (no checkpoint needed)")
    parser.add_argument("--keep-rate", type=float, help="with --summary: kernel keeping rate")
    parser.add_argument("--num-classes", type=int, help="with --summary: number of classes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.height < MIN_INPUT_SIZE or args.width < MIN_INPUT_SIZE:
        print(f"icnet-export: --height and --width must be >= {MIN_INPUT_SIZE}", file=sys.stderr)
        return 2
    try:
        if args.summary:
            return _print_summary(args)
        if args.checkpoint is None:
            print("icnet-export: give a checkpoint to export, or --summary", file=sys.stderr)
            return 2
        return _export(args)
    except ValueError as error:  # CheckpointError, bad keep rate, ...
        print(f"icnet-export: {error}", file=sys.stderr)
        return 1


def _print_summary(args) -> int:
    config = ModelConfig()
    if args.checkpoint is not None:
        config = read_checkpoint(args.checkpoint)[0]
    overrides = {"keep_rate": args.keep_rate, "num_classes": args.num_classes}
    fields = {k: v for k, v in overrides.items() if v is not None}
    config = ModelConfig(**{**config.__dict__, **fields})
    print(json.dumps(model_summary(config, args.height, args.width)))
    return 0


def _export(args) -> int:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = load_model(args.checkpoint)
    output = args.output or args.checkpoint.with_suffix(f".{args.branch}.onnx")
    export_onnx(model, output, args.branch, args.height, args.width, dynamic=not args.static,
                labels=args.labels)
    print(f"wrote {output} (branch {args.branch}, {'static' if args.static else 'dynamic'} height/width)")
    if not args.no_check:
        sizes = [(args.height, args.width)]
        if not args.static:
            sizes.append((max(MIN_INPUT_SIZE, args.height // 2 + 1), max(MIN_INPUT_SIZE, args.width // 2 + 3)))
        for record in check_onnx(model, output, args.branch, sizes, labels=args.labels):
            print("onnxruntime vs PyTorch: " + json.dumps(record))
    return 0
