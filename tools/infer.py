#!/usr/bin/env python
"""Run a trained detector on MRI slices; write an overlay PNG and a JSON per input.

Usage:
    python tools/infer.py --weights runs/<run>/weights/model.pt --source <file or folder> --out overlays/ \
        [--conf 0.25] [--device cpu] [--classes DDD,LDB,...] [--skip-bad]

Sources: a DICOM series folder, a DICOM file, a NIfTI file (.nii/.nii.gz), a PNG/JPEG, or a
folder of them (each image, NIfTI file or DICOM sub-folder is one input). Volumes give
their mid-sagittal slice. All inputs are read and checked before anything is written.
Prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.infer import run_inference
from welde_det.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint written by tools/train.py (local file)")
    parser.add_argument("--source", required=True, help="DICOM folder/file, NIfTI, PNG/JPEG, or a folder of them")
    parser.add_argument("--out", required=True, help="output folder for <name>.png and <name>.json")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--classes", help="comma-separated class list the checkpoint must have")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and report) bad inputs of a folder")
    parser.add_argument("--batch", type=int, default=16,
                        help="slices per forward pass (tools/evaluate.py --weights uses the same default)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    expected = [n.strip() for n in args.classes.split(",") if n.strip()] if args.classes else None
    try:
        summary = run_inference(args.weights, args.source, args.out, conf=args.conf, device=args.device,
                                expected_names=expected, skip_bad=args.skip_bad, batch=args.batch)
    except (ValueError, FileNotFoundError) as exc:  # user input: the message says what to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
