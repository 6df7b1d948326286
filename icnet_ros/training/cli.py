"""`icnet-train` / `ros2 run icnet_ros train`: train ICNet from a YAML configuration.

    icnet-train --config config/train/camvid.yaml data_root=/data/CamVid iterations=2000
    icnet-train --dataset cityscapes data_root=/data/cityscapes            # config/train/cityscapes.yaml
    icnet-train --config config/train/synthetic.yaml --resume              # continue a killed run
    torchrun --nproc_per_node 4 -m icnet_ros.training.cli --dataset cityscapes data_root=...

Every `key=value` after the options overrides the YAML; unknown keys and wrong types are rejected.
"""
from __future__ import annotations

import argparse
import logging
import sys

from icnet_ros.config import ConfigError, load_config
from icnet_ros.training.config import DATASETS, TrainConfig, default_config_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="training YAML (see config/train/)")
    source.add_argument("--dataset", choices=DATASETS, help="use config/train/<dataset>.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in out_dir at its last checkpoint (exact iteration and lr)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="count, log and skip unreadable or inconsistent samples instead of stopping")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = args.config or (default_config_path(args.dataset) if args.dataset else None)
    try:
        overrides = list(args.overrides) + (["skip_bad=true"] if args.skip_bad else [])
        config = load_config(TrainConfig, path, overrides)
    except ConfigError as error:
        print(f"icnet-train: {error}", file=sys.stderr)
        return 2
    from icnet_ros.training.trainer import train  # imported late: --help stays fast

    try:
        final = train(config, resume=args.resume)
    except (ValueError, FileNotFoundError) as error:  # DatasetError, CheckpointError, bad batch split
        print(f"icnet-train: {error}", file=sys.stderr)
        return 1
    print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
