"""Check that the engine's labels agree with the plain eager fp32 model on real frames.

On a GPU this is the fp16 check: the engine in fp16 (folded, channels-last, CUDA graphs; or the
TensorRT engine with --backend tensorrt) against the unfolded eager model in fp32 with TF32 off, on
the nine Cityscapes frames; the target is >= 99.5% of pixels with equal labels. On a CPU it compares
the fp32 engine with the eager model (expect 100%).

    python -m icnet_ros.inference.gpu_check /data/cityscapes_val9 --checkpoint model.safetensors
    python -m icnet_ros.inference.gpu_check /data/cityscapes_val9 --checkpoint m.safetensors --backend tensorrt
    python -m icnet_ros.inference.gpu_check /data/cityscapes_val9 --device cpu
    python -m icnet_ros.inference.gpu_check /data/cityscapes_val9 --checkpoint m.safetensors --batches 2 4

Both label maps are at the frame's size: the reference runs the eager model at the network size the
engine uses (the checkpoint's input size, e.g. 720 rows for the bundled models, or --input-size) and
upsamples its branch logits straight to the frame, as the engine and icnet-evaluate do.

--batches N ...: also segment the frames in batches of N (cycling through the frames to fill the
last batch); a batch size passes when its labels reach the same --target against the eager fp32
reference as batch 1 does. Their agreement with the engine's own batch-1 labels is reported too: a
frame mixed up with another or read from a misaligned buffer drops both to a fraction, while in fp16
a batch of 4 runs other cuDNN kernels than a batch of 1 and differs from it at about 1 pixel in
8000 (0.013% with the CamVid model on an H200), less than either differs from fp32.

Exit status 0 when the overall agreement and every batch size reach --target, 1 when one does not,
2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from icnet_ros.atomic import atomic_write_text
from icnet_ros.inference.engine import BACKENDS, PRECISIONS, SegmentationEngine, label_agreement
from icnet_ros.model.checkpoint import load_model
from icnet_ros.model.icnet import BRANCHES, ICNet, ModelConfig, upsample
from icnet_ros.model.preprocess import parse_input_size

DEFAULT_TARGET = 0.995


def read_frames(folder: Path, pattern: str) -> list[tuple[str, np.ndarray]]:
    """(name, RGB frame) for every readable image in `folder` matching `pattern`."""
    frames = []
    for path in sorted(folder.glob(pattern)):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is not None:
            frames.append((path.name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    return frames


def reference_labels(model: ICNet, engine: SegmentationEngine, frame: np.ndarray, branch: str) -> np.ndarray:
    """Eager fp32 labels at the frame's size: unfolded model, NCHW, at the engine's network size, the
    branch logits upsampled straight to the frame (as the engine and icnet-evaluate do), argmax.

    TF32 is disabled by check() before this runs.
    """
    x = engine.preprocess(frame).contiguous()  # normalization and resize to the network size, NCHW memory
    with torch.no_grad():
        logits = model.branch_logits(x, branch).float()
        return upsample(logits, frame.shape[:2]).argmax(1)[0].cpu().numpy()


def batched_labels(engine: SegmentationEngine, frames: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Each frame's labels when the engine segments the frames `batch` at a time (the last batch is
    filled up by cycling from the first frame; those extra results are dropped)."""
    labels: list[np.ndarray] = []
    for start in range(0, len(frames), batch):
        group = [frames[(start + i) % len(frames)] for i in range(batch)]
        results = engine.segment(group)
        labels.extend(seg.labels for seg in results[:len(frames) - start])
    return labels


def build_model(checkpoint: Path | None, frames: list[np.ndarray]) -> ICNet:
    if checkpoint is not None:
        return load_model(checkpoint)
    from icnet_ros.inference.benchmark import calibrate_batchnorm

    torch.manual_seed(0)
    return calibrate_batchnorm(ICNet(ModelConfig(keep_rate=0.5, num_classes=19)), frames)


def check(args: argparse.Namespace) -> dict:
    """Per-frame and overall agreement of engine labels with the eager fp32 reference."""
    frames = read_frames(args.folder, args.glob)
    if not frames:
        raise SystemExit(f"gpu_check: no readable image matches {args.glob!r} in {args.folder}")
    model = build_model(args.checkpoint, [f for _, f in frames])
    engine = SegmentationEngine(model, device=args.device, branch=args.branch, precision=args.precision,
                                backend=args.backend)
    engine.input_size = parse_input_size(args.input_size, model.config.input_size)
    model = model.to(engine.device).eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    torch.backends.cudnn.allow_tf32 = False
    results, mine, theirs = [], [], []
    for name, frame in frames:
        labels = engine.segment(frame).labels
        reference = reference_labels(model, engine, frame, args.branch)
        results.append({"frame": name, "agreement": label_agreement(labels, reference)})
        mine.append(labels)
        theirs.append(reference)
    overall = label_agreement(mine, theirs)
    batches = []
    for size in args.batches:
        batched = batched_labels(engine, [frame for _, frame in frames], size)
        agreement = label_agreement(batched, theirs)
        batches.append({"batch": size, "agreement": agreement,
                        "agreement_with_batch_1": label_agreement(batched, mine),
                        "passed": agreement >= args.target})
    height, width = frames[0][1].shape[:2]
    return {"device": str(engine.device), "backend": engine.backend, "precision": engine.precision,
            "branch": args.branch,
            "weights": str(args.checkpoint) if args.checkpoint else "random (BatchNorm calibrated)",
            "frame_size": [height, width], "network_size": list(engine.preprocess(frames[0][1]).shape[-2:]),
            "frames": results, "overall": overall, "target": args.target,
            "batches": batches,
            "passed": overall >= args.target and all(row["passed"] for row in batches)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m icnet_ros.inference.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of frames, e.g. /data/cityscapes_val9")
    parser.add_argument("--glob", default="*_src.png", help="which files are frames (default: *_src.png)")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: random, BatchNorm calibrated)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="engine precision (auto: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--branch", choices=BRANCHES, default="sub124")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="engine backend (auto: tensorrt on CUDA when installed, else torch)")
    parser.add_argument("--input-size", default="checkpoint",
                        help="network input size: checkpoint (default: the size stored with the model), frame, "
                             "or HxW (0 on one side keeps the aspect ratio)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET)
    parser.add_argument("--batches", type=int, nargs="*", default=[], metavar="N",
                        help="also segment in batches of N, each held to --target (e.g. --batches 2 4)")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.folder.is_dir():
        print(f"gpu_check: {args.folder} is not a folder", file=sys.stderr)
        return 2
    if any(size < 1 for size in args.batches):
        print(f"gpu_check: --batches takes sizes >= 1, got {args.batches}", file=sys.stderr)
        return 2
    report = check(args)
    for row in report["frames"]:
        print(f"{row['frame']:<50} {100 * row['agreement']:8.4f} %")
    verdict = "PASS" if report["overall"] >= report["target"] else "FAIL"
    print(f"{report['device']} {report['backend']} {report['precision']} engine vs eager fp32 ({report['branch']}, "
          f"{report['weights']}, frames {report['frame_size'][0]}x{report['frame_size'][1]}, network "
          f"{report['network_size'][0]}x{report['network_size'][1]}): {100 * report['overall']:.4f} % of pixels "
          f"agree; target {100 * report['target']:.2f} %: {verdict}")
    for row in report["batches"]:
        print(f"batch {row['batch']}: {100 * row['agreement']:.4f} % of pixels agree with eager fp32 (target "
              f"{100 * report['target']:.2f} %: {'PASS' if row['passed'] else 'FAIL'}), "
              f"{100 * row['agreement_with_batch_1']:.4f} % with the engine's batch 1")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
