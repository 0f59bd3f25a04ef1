#!/usr/bin/env python
"""Evaluate a checkpoint on a split, or COCO-format detections, with the pycocotools-exact evaluator.

Usage:
    python tools/evaluate.py --weights runs/<run>/weights/model.pt --data ../shared/datasets/lumbar6 \
        --split val --out reports/run1 [--batch 16] [--conf 0.001]
    python tools/evaluate.py --gt val.json --dets dets.json --out reports/run1 \
        [--class-stats class_stats.json] [--compare dets_ce.json --compare-label CE] [--resamples 1000]

With --weights, writes detections.json, ground_truth.json and the report; --data takes a COCO
folder, tools/convert.py output or a YOLO folder / data.yaml. Outputs name images by index
(<index>.<ext>, in image-id order), never by the data's file names, and hold no absolute path;
--keep-names also writes names.csv (index name -> image path inside the data folder).

Writes report.json, report.md, per_image.csv and the plots (PR curves, per-class AP,
confusion, TIDE errors, FROC), prints the pycocotools summary, with --compare the paired
bootstrap difference of mAP and mAP_tail with its 95 % interval, and, last, the report folder.

Detections for images or categories the ground truth does not have, a missing file or an
unavailable --device are reported in one line (exit status 2) before anything is written;
--debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.evaluate import evaluate_checkpoint, write_detection_report
from welde_det.evaluation import summary_lines
from welde_det.utils.cli import add_debug_flag, run_cli
from welde_det.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a welde_det detector checkpoint (a run's weights/model.pt)")
    parser.add_argument("--data", help="with --weights: the dataset (COCO folder, convert output, YOLO folder)")
    parser.add_argument("--split", default="val", help="with --weights: the split to measure (default val)")
    parser.add_argument("--batch", type=int, default=16, help="with --weights: slices per forward pass")
    parser.add_argument("--conf", type=float, default=0.001, help="with --weights: score threshold kept")
    parser.add_argument("--keep-names", action="store_true",
                        help="with --weights: also write names.csv mapping index names to the data's images "
                             "(it names the user's files)")
    parser.add_argument("--gt", help="COCO ground-truth JSON")
    parser.add_argument("--dets", help="COCO results JSON (list of detections)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--class-stats", help="ClassStats JSON of the training split (defines the tail set)")
    parser.add_argument("--compare", help="a second run's COCO results JSON to compare against")
    parser.add_argument("--compare-label", default="baseline")
    parser.add_argument("--label", default="this run")
    parser.add_argument("--title", default="")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="with --gt/--dets: bootstrap resamples of the 95%% intervals (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="with --gt/--dets: seed of the bootstrap")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.weights and (args.gt or args.dets):
        parser.error("give either --weights with --data, or --gt with --dets")
    if args.keep_names and not args.weights:
        parser.error("--keep-names goes with --weights (with --gt/--dets nothing is renamed)")
    if args.weights and not args.data:
        parser.error("--weights needs --data (the dataset whose --split to measure)")
    if not args.weights and not (args.gt and args.dets):
        parser.error("give --weights W --data SRC [--split S], or --gt G --dets D")
    setup_logging()
    if args.weights:
        res = evaluate_checkpoint(args.weights, args.data, args.out, split=args.split, conf=args.conf,
                                  batch=args.batch, device=args.device, plots=not args.no_plots,
                                  keep_names=args.keep_names)
        print("\n".join(summary_lines(res["stats"])))
        print(f"mAP_tail {res['map_tail']:.3f} (tail: {', '.join(res['tail_classes'])})")
        print(res["report_dir"])
        return 0
    res = write_detection_report(args.gt, args.dets, args.out, class_stats=args.class_stats,
                                 compare=args.compare, compare_label=args.compare_label, label=args.label,
                                 title=args.title, device=args.device, plots=not args.no_plots,
                                 n_resamples=args.resamples, seed=args.seed)
    print("\n".join(summary_lines(res["stats"])))
    print(f"mAP_tail {res['map_tail']:.3f} (tail: {', '.join(res['tail_classes'])})")
    diff = res["analysis"].get("difference")
    if diff is not None:
        for key, name in (("map", "mAP"), ("map_tail", "mAP_tail")):
            iv = diff[key]
            print(f"{name} difference ({args.label} - {args.compare_label}): {100 * iv['value']:+.2f} "
                  f"[{100 * diff['confidence']:.0f}% CI {100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]")
    print(res["report_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
