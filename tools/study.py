#!/usr/bin/env python
"""Run a multi-seed comparison study: stage 1, every method's frozen stage, intervals, study.md.

Usage:
    python tools/study.py --config configs/study_phantom.yaml [key=value ...]
    python tools/study.py --config configs/study_lumbar6_yolo.yaml seeds=5 stage1=per_seed
    python tools/study.py --config configs/study_phantom.yaml seeds=2 epochs=1 stage1_epochs=1 imgsz=64 n_images=6 out=DIR

Overrides: study keys (seeds, methods, stage1, end_to_end, epochs, stage1_epochs, cache_frozen,
out, n_resamples, ...), ``stage1.<key>=v`` / ``frozen.<key>=v`` for one kind of run, or any run
config key (imgsz, n_images, train.lr, ...) for every run. Running the same command again
continues a killed study (finished runs are kept). Prints the study folder (study.json,
study.md, plots, runs/) as its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.study import load_study_config, run_study
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study YAML (configs/study_*.yaml)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=2 epochs=1 out=DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    folder = run_study(load_study_config(args.config, args.overrides))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
