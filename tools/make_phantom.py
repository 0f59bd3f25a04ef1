#!/usr/bin/env python
"""Generate the synthetic lumbar MRI phantom dataset (DICOM, NIfTI, PNG, COCO, YOLO, crops).

Usage:
    python tools/make_phantom.py --out data/generated/phantom --n-studies 200
    python tools/make_phantom.py --out /tmp/ph --n-studies 40 --difficulty 1 --contrast t2 \\
        --formats coco yolo crops --workers 2
    python tools/make_phantom.py --figure docs/phantom_vs_real.png --real ../shared/real_samples

Prints the dataset folder (or the figure path) as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.phantom import FORMATS, make_phantom_dataset
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import progress_enabled, setup_logging


def _json_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="dataset folder to create")
    parser.add_argument("--n-studies", type=int, default=200, help="studies (patients); one image per contrast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 = clear-cut findings, 1 = subtle")
    parser.add_argument("--contrast", choices=["t1", "t2", "both"], default="both")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--frequencies", type=_json_value, default=None,
                        help=f"JSON mapping of per-box class frequencies over {list(LUMBAR_CLASSES)}")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--bit-depth", type=int, choices=[8, 16], default=8,
                        help="PNG slices in 8 or 16 bits (same window; 16 avoids 8-bit quantisation)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --out")
    parser.add_argument("--figure", type=Path, help="write the phantom-vs-real comparison figure here instead")
    parser.add_argument("--real", type=Path, help="folder of real PNG slices for --figure")
    parser.add_argument("--verbose", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.figure is None and args.out is None:
        parser.error("give --out DIR (or --figure PNG --real DIR)")
    if args.figure is not None and args.real is None:
        parser.error("--figure needs --real DIR with real slices to compare against")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.figure is not None:
        from welde_det.datasets.phantom.figure import comparison_figure

        print(comparison_figure(args.real, args.figure))
        return 0
    freqs = args.frequencies
    ds = make_phantom_dataset(args.out, args.n_studies, seed=args.seed, difficulty=args.difficulty,
                              contrast=args.contrast, class_frequencies=freqs, workers=args.workers,
                              formats=tuple(args.formats), progress=progress_enabled(),
                              overwrite=args.overwrite, bit_depth=args.bit_depth)
    print(ds.root)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
