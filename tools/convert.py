#!/usr/bin/env python
"""Convert annotated spine MRI sources to a de-identified COCO dataset (+ YOLO export).

Usage:
    python tools/convert.py yolo   SRC OUT [--class-names A,B,...] [--patient-pattern REGEX|lumbar6]
    python tools/convert.py rsna   ARCHIVE OUT [--class-by condition] [--class-map map.yaml] [--box-mm 10]
    python tools/convert.py masks  SRC OUT --label-map spider|map.yaml [--per component]
    python tools/convert.py boxes  TABLE.csv OUT --root VOLUMES_DIR [--series INDEX|HASH]
    python tools/convert.py to-yolo OUT --images ROOT --train train.json [--val val.json] [--test test.json]

Common options: --key-file PATH (or $WELDE_DEID_KEY; with neither, your own key file in
~/.config/welde_det/deid.key, created on the first run), --split 0.7,0.15,0.15 | --no-split,
--seed, --yolo, --workers N (process pool), --bit-depth 8|16, --overwrite,
--verbose, --debug (traceback instead of a one-line error). Prints the output folder (or
data.yaml for to-yolo) as its last line. The output is read by training and evaluation as is
(data.source=OUT), for every framework.

One conversion writes an OUT at a time: a second one into the same OUT stops at once, naming
the first (pid, start time); staging folders left by a killed conversion are removed by the next.

boxes only: --series picks the series in DICOM folders holding several (the index or 8-hex
hash that the error listing them shows); a table's own series column wins.

yolo only: --keep-source-splits keeps the folder's own train/val/test.

Example (the public lumbar set, keeping its train/val split and grouping T1/T2 by patient):
    python tools/convert.py yolo ../shared/datasets/lumbar6 data/generated/lumbar6-coco \
        --keep-source-splits --patient-pattern lumbar6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.convert import export_yolo, run_convert
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import progress_enabled, setup_logging


def _fractions(text: str) -> dict[str, float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not 1 <= len(values) <= 3:
        raise argparse.ArgumentTypeError(f"--split takes 1 to 3 comma-separated fractions, got {text!r}")
    return dict(zip(("train", "val", "test"), values))


def _mapping_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{p}: file not found")
    data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{p}: must hold a mapping, got {type(data).__name__}")
    return data


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--key-file", help="file holding the de-identification key (outside OUT); default: "
                        "$WELDE_DEID_KEY, else your key file in $XDG_CONFIG_HOME/welde_det/deid.key (created once)")
    common.add_argument("--split", type=_fractions, default=_fractions("0.7,0.15,0.15"),
                        help="patient-level train,val,test fractions (default 0.7,0.15,0.15)")
    common.add_argument("--no-split", action="store_true", help="write annotations.json only")
    common.add_argument("--seed", type=int, default=0, help="split seed")
    common.add_argument("--yolo", action="store_true", help="also write OUT/yolo with data.yaml")
    common.add_argument("--workers", type=int, default=1, help="processes for large archives")
    common.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    common.add_argument("--verbose", action="store_true", help="debug logging")
    add_debug_flag(common)
    sub = parser.add_subparsers(dest="kind", required=True)

    p = sub.add_parser("yolo", parents=[common], help="YOLO folder (images + labels/*.txt)")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--class-names", type=_names,
                   help="class names in label-index order; required when the folder has no data.yaml names")
    p.add_argument("--patient-pattern", help="regex on the file stem (group 'patient' names the patient), "
                   "or 'lumbar6' for the public lumbar set's naming")
    p.add_argument("--pixel-spacing", type=float, nargs=2, metavar=("ROW_MM", "COL_MM"))
    p.add_argument("--keep-source-splits", action="store_true", help="keep the folder's train/val/test")

    p = sub.add_parser("rsna", parents=[common], help="RSNA 2024 lumbar spine archive")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--class-by", default="condition",
                   choices=["condition", "level", "condition_level", "severity", "condition_severity"])
    p.add_argument("--class-map", type=_mapping_file, help="YAML/JSON {scheme key: class name or null}")
    p.add_argument("--series-types", type=_names, help="e.g. 'Sagittal T2/STIR,Sagittal T1'")
    p.add_argument("--box-mm", type=float, nargs="+", default=[10.0], help="box side, or HEIGHT WIDTH, in mm")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=8)
    p.add_argument("--skip-bad", action="store_true", help="report unreadable series instead of stopping")

    p = sub.add_parser("masks", parents=[common], help="NIfTI label masks (images/ + masks/)")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--label-map", required=True, help="'spider' or a YAML/JSON {label value or 'a-b': class}")
    p.add_argument("--per", choices=["label", "component"], default="label",
                   help="one box per label value, or per connected component")
    p.add_argument("--min-pixels", type=int, default=1, help="ignore components smaller than this")
    p.add_argument("--patient-pattern", help="regex on the case name; group 'patient' names the patient")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=8)

    p = sub.add_parser("boxes", parents=[common], help="CSV/JSON table of boxes per volume and slice")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--root", help="folder the table's volume paths are relative to (default: the table's)")
    p.add_argument("--class-names", type=_names, help="class order (default: order of first appearance)")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=8)
    p.add_argument("--series", help="DICOM folders with several series: the series INDEX or 8-hex HASH "
                   "their listing shows (rows with a series column keep theirs)")

    p = sub.add_parser("to-yolo", help="COCO split files -> YOLO folder + data.yaml")
    p.add_argument("out")
    p.add_argument("--images", required=True, help="folder the COCO file_name entries are relative to")
    p.add_argument("--train", required=True)
    p.add_argument("--val")
    p.add_argument("--test")
    p.add_argument("--class-names", type=_names)
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true")
    add_debug_flag(p)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.kind == "to-yolo":
        splits = {k: getattr(args, k) for k in ("train", "val", "test") if getattr(args, k)}
        data_yaml = export_yolo(splits, args.images, args.out, class_names=args.class_names,
                                link_images=not args.copy, overwrite=args.overwrite)
        print(data_yaml)
        return 0
    options: dict[str, Any] = {
        "fractions": None if args.no_split else args.split,
        "seed": args.seed,
        "yolo": args.yolo,
        "workers": args.workers,
        "progress": progress_enabled(),
        "overwrite": args.overwrite,
    }
    if args.kind == "yolo":
        options.update(class_names=args.class_names, patient_pattern=args.patient_pattern,
                       pixel_spacing=args.pixel_spacing, keep_source_splits=args.keep_source_splits)
    elif args.kind == "rsna":
        box = args.box_mm[0] if len(args.box_mm) == 1 else tuple(args.box_mm)
        options.update(class_by=args.class_by, class_map=args.class_map, series_types=args.series_types,
                       box_mm=box, bit_depth=args.bit_depth, skip_bad=args.skip_bad)
    elif args.kind == "masks":
        label_map: Any = args.label_map if args.label_map == "spider" else _mapping_file(args.label_map)
        options.update(label_map=label_map, per=args.per, min_pixels=args.min_pixels, bit_depth=args.bit_depth,
                       patient_pattern=args.patient_pattern)
    elif args.kind == "boxes":
        options.update(root=args.root, class_names=args.class_names, bit_depth=args.bit_depth, series=args.series)
    result = run_convert(args.kind, args.source, args.out, key_file=args.key_file, **options)
    print(result.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
