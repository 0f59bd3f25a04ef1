"""``make demo``: phantom → CE and WELDE detectors (quick CPU profile) → comparison report.

Runs the Faster R-CNN (MobileNetV3-FPN) path end to end on a freshly generated (and
cached) lumbar phantom: a CE baseline, then WELDE on the same data with the CE schedule
as its first stage, both evaluated with the pycocotools-exact evaluator on the same
validation split, and a side-by-side report. Prints where everything is.

Usage:
    python -m welde_det.engine.demo [--n-images 30] [--epochs 4] [--imgsz 160] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from welde_det.engine.train import run_training
from welde_det.utils.logging import setup_logging

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=30, help="phantom studies (T1 + T2 slices each)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    common = [f"output={args.out}", f"n_images={args.n_images}", f"imgsz={args.imgsz}", "batch=4",
              "cache_dir=data/generated"]
    ce = run_training(ROOT / "configs" / "rcnn_ce.yaml", [*common, f"epochs={args.epochs}"])
    welde = run_training(ROOT / "configs" / "rcnn_welde.yaml",
                         [*common, f"stage1_epochs={args.epochs}", f"epochs={max(1, args.epochs // 2)}",
                          "warmup_steps=20"])
    from welde_det.engine.evaluate import write_detection_report

    val = sorted(Path("data/generated").glob(f"phantom-n{args.n_images}-*/annotations/val.json"))[-1]
    cmp_dir = Path(args.out) / "comparison"
    res = write_detection_report(val, welde / "detections.json", cmp_dir, class_stats=welde / "class_stats.json",
                                 compare=ce / "detections.json", compare_label="CE", label="WELDE",
                                 title="Faster R-CNN on the lumbar phantom: WELDE vs CE")
    rep = json.loads((cmp_dir / "report.json").read_text())
    print(f"\nCE    run: {ce}\nWELDE run: {welde}\ncomparison: {cmp_dir / 'report.md'}")
    print(f"mAP  CE {rep['compare']['map']:.3f}  WELDE {rep['map']:.3f} | "
          f"mAP_tail CE {rep['compare']['map_tail']:.3f}  WELDE {res['map_tail']:.3f} "
          f"(tail: {', '.join(res['tail_classes'])}) | {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
