#!/usr/bin/env python
"""Train a detector or classifier from a YAML config.

Usage:
    python tools/train.py --config configs/yolo_welde.yaml [key=value ...]
    python tools/train.py --config configs/cls_welde.yaml --task classify data.source=x.npz
    python tools/train.py --resume runs/yolo_welde-20260101-120000 [epochs=N]

On --resume only the schedule may grow (epochs, stage1_epochs); everything is checked
before the run folder is touched. Prints the run folder (checkpoint, config.yaml,
report.json, report.md) as its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.run import run_training
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--task", choices=["detect", "classify"], help="shortcut for task=...")
    parser.add_argument("--resume", help="run folder or checkpoint to continue")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=1 imgsz=160")
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give --config configs/<name>.yaml (or --resume <run folder>)")
    if args.config and args.resume:
        parser.error("give --config or --resume, not both (a resume uses the run's own config.yaml)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    overrides = list(args.overrides)
    if args.task:
        overrides.insert(0, f"task={args.task}")
        if args.task == "classify":
            overrides.insert(1, "model.framework=classify")
    run_dir = run_training(args.config, overrides, resume=args.resume)
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
