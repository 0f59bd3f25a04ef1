#!/usr/bin/env python
"""Run a trained detector on MRI slices; write an overlay PNG and a JSON per input.

Usage:
    python tools/infer.py --weights runs/<run>/weights/model.pt --source <file or folder> --out overlays/ \
        [--conf 0.25] [--device cpu] [--classes DDD,LDB,...] [--skip-bad] [--series N|HASH] \
        [--key-file KEY] [--keep-names]

Sources: a DICOM series folder, a DICOM file, a NIfTI file (.nii/.nii.gz), a PNG/JPEG, or a
folder of them (each image, NIfTI file or DICOM sub-folder is one input). Volumes give
their mid-sagittal slice. All inputs are read and checked before anything is written.

Outputs are named by a keyed pseudonym (the key of tools/convert.py: --key-file,
$WELDE_DEID_KEY, or your own key file), never by the input's name; --keep-names also
writes names.csv (pseudonym -> input). Prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.infer import run_inference
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint written by tools/train.py (local file)")
    parser.add_argument("--source", required=True, help="DICOM folder/file, NIfTI, PNG/JPEG, or a folder of them")
    parser.add_argument("--out", required=True, help="output folder for <pseudonym>.png and <pseudonym>.json")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--classes", help="comma-separated class list the checkpoint must have")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and report) bad inputs of a folder")
    parser.add_argument("--batch", type=int, default=16,
                        help="slices per forward pass (tools/evaluate.py --weights uses the same default)")
    parser.add_argument("--series", help="DICOM input holding several series or patients: the one to use (the "
                                         "index or the hash its error listing shows)")
    parser.add_argument("--key-file", help="de-identification key file (default: $WELDE_DEID_KEY, else your own "
                                           "key file, as tools/convert.py)")
    parser.add_argument("--keep-names", action="store_true",
                        help="also write names.csv mapping each pseudonym to its input (it names the inputs)")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    expected = [n.strip() for n in args.classes.split(",") if n.strip()] if args.classes else None
    summary = run_inference(args.weights, args.source, args.out, conf=args.conf, device=args.device,
                            expected_names=expected, skip_bad=args.skip_bad, batch=args.batch, series=args.series,
                            key_file=args.key_file, keep_names=args.keep_names)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
