#!/usr/bin/env python
"""Evaluate COCO-format detections with the pycocotools-exact evaluator; write a report.

Usage:
    python tools/evaluate.py --gt val.json --dets dets.json --out reports/run1 \
        [--class-stats class_stats.json] [--compare dets_ce.json --compare-label CE]

Writes report.json, report.md, pr_curves.png, per_class_ap.png and confusion.png, prints
the pycocotools summary and, last, the report folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.engine.evaluate import write_detection_report
from welde_det.evaluation import summary_lines
from welde_det.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    parser.add_argument("--dets", required=True, help="COCO results JSON (list of detections)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--class-stats", help="ClassStats JSON of the training split (defines the tail set)")
    parser.add_argument("--compare", help="a second run's COCO results JSON to compare against")
    parser.add_argument("--compare-label", default="baseline")
    parser.add_argument("--label", default="this run")
    parser.add_argument("--title", default="")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    res = write_detection_report(args.gt, args.dets, args.out, class_stats=args.class_stats, compare=args.compare,
                                 compare_label=args.compare_label, label=args.label, title=args.title,
                                 device=args.device, plots=not args.no_plots)
    print("\n".join(summary_lines(res["stats"])))
    print(f"mAP_tail {res['map_tail']:.3f} (tail: {', '.join(res['tail_classes'])})")
    print(res["report_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
