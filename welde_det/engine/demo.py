"""``make demo``: a small study on the phantom — CE, the CE-ensemble control and WELDE over seeds — through
the study code path (:mod:`welde_det.engine.study`), then a comparison report and overlays.

On a fresh machine, with the quick CPU profile (``configs/study_phantom.yaml``: Ultralytics
YOLOv8n, random init, 120 phantom studies, 256 px):

1. generates (and caches) the lumbar MRI phantom at the default difficulty;
2. runs :func:`~welde_det.engine.study.run_study` on ``configs/study_phantom.yaml``: one stage 1
   (plain CE, full network, 30 epochs), then, for each of 2 seeds, the frozen stage (backbone,
   neck and box branch fixed; the frozen network's outputs cached) of a CE head, the
   architecture-matched ``ce_ensemble`` control (four CE heads) and WELDE (ce, focal, cb, ldam)
   from the stage-1 checkpoint — same heads, same schedule, only the losses differ;
3. writes the study's ``study.json`` / ``study.md`` (mean ± std and 95 % intervals over seeds,
   per-class AP, the paired WELDE − control / WELDE − CE differences with the honest reading)
   and its plots;
4. writes a WELDE-vs-control report on the first seed (``comparison/``) and draws WELDE's
   detections on validation slices (``overlays/``);

and prints where everything is, with a one-line summary last. ``--framework rcnn`` runs the
same study with torchvision Faster R-CNN (MobileNetV3-FPN, ``configs/study_phantom_rcnn.yaml``).
Running the same command again continues a killed demo (the study is resumable) and reuses a
finished one (only the summary, the comparison and the overlays are written again): remove
``runs/demo`` (or give ``--out``) to train afresh.

Usage:
    python -m welde_det.engine.demo [--framework yolo|rcnn] [--seeds 2] [--n-images 120] [--imgsz 256]
        [--epochs 30] [--stage2-epochs 10] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from welde_det.engine.study import load_study_config, run_study
from welde_det.utils.logging import setup_logging

ROOT = Path(__file__).resolve().parents[2]
#: the study file behind ``make demo`` per framework
STUDIES: dict[str, Path] = {"yolo": ROOT / "configs" / "study_phantom.yaml",
                            "rcnn": ROOT / "configs" / "study_phantom_rcnn.yaml"}
RUNS = (("ce", "CE"), ("ce_ensemble", "CE ensemble (control)"), ("welde", "WELDE"))
FW_NAMES = {"yolo": "YOLOv8n", "rcnn": "Faster R-CNN"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=tuple(STUDIES), default="yolo")
    parser.add_argument("--seeds", type=int, help="frozen-stage seeds (the study file's by default)")
    parser.add_argument("--n-images", type=int, help="phantom studies (T1 + T2 slices each)")
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--epochs", type=int, help="epochs of stage 1 (plain CE, full network)")
    parser.add_argument("--stage2-epochs", type=int, help="epochs of the frozen-detector stage")
    parser.add_argument("--difficulty", type=float)
    parser.add_argument("--out", default="runs/demo", help="the study folder")
    parser.add_argument("--cache-dir", help="where the phantom is cached")
    parser.add_argument("--overlays", type=int, default=4, help="validation slices to draw")
    return parser.parse_args(argv)


def study_overrides(args: argparse.Namespace) -> list[str]:
    """The demo's flags as study overrides (flags left out keep the study file's values)."""
    out = [f"out={json.dumps(str(args.out))}"]
    for flag, key in (("seeds", "seeds"), ("epochs", "stage1_epochs"), ("stage2_epochs", "epochs"),
                      ("n_images", "data.n_images"), ("imgsz", "train.imgsz"), ("batch", "train.batch"),
                      ("difficulty", "data.difficulty"), ("cache_dir", "data.cache_dir")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if args.batch is not None and args.framework == "yolo":
        out.append(f"train.nbs={args.batch}")  # one optimiser step per batch: a short run needs the steps
    return out


def summary_line(fw_name: str, summary: dict[str, Any], seconds: float) -> str:
    """The one-line summary: each method's mean mAP and mAP_tail, and WELDE − control on mAP_tail."""
    m = summary["methods"]

    def mean(method: str, key: str) -> str:
        return f"{m[method][key]['mean']:.3f}" if method in m and m[method][key]["mean"] is not None else "—"

    line = (f"{fw_name}: mAP CE {mean('ce', 'map')} / CE-ens {mean('ce_ensemble', 'map')} / WELDE "
            f"{mean('welde', 'map')} | mAP_tail CE {mean('ce', 'map_tail')} / CE-ens {mean('ce_ensemble', 'map_tail')}"
            f" / WELDE {mean('welde', 'map_tail')} (mean of {len(summary['seeds'])} seed(s); tail: "
            f"{', '.join(summary['tail_classes'])})")
    diff = summary["paired"].get("welde-ce_ensemble", {}).get("map_tail")
    if diff and diff["value"] is not None and diff["ci95"] is not None:
        line += (f" | WELDE − control mAP_tail {100 * diff['value']:+.1f} "
                 f"[{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}]")
    return f"{line} | {seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    t0 = time.time()
    study = load_study_config(STUDIES[args.framework], study_overrides(args))
    folder = run_study(study)
    summary = json.loads((folder / "study.json").read_text())
    from welde_det.engine.evaluate import write_detection_report
    from welde_det.engine.infer import load_detector, run_inference

    first = {name: folder / summary["methods"][name]["runs"][0]["run_dir"] for name, _ in RUNS}
    welde = first["welde"]
    meta = json.loads((welde / "eval_split.json").read_text())
    images = (welde / meta["images"]).resolve()
    fw_name = FW_NAMES[args.framework]
    cmp_dir = folder / "comparison"
    seed = summary["methods"]["welde"]["runs"][0]["seed"]
    write_detection_report(welde / "ground_truth.json", welde / "detections.json", cmp_dir,
                           class_stats=welde / "class_stats.json", compare=first["ce_ensemble"] / "detections.json",
                           compare_label="CE ensemble", label="WELDE",
                           title=f"{fw_name} on the lumbar phantom: WELDE vs the CE-ensemble control (seed {seed})")
    detector = load_detector(welde / "weights" / "model.pt", "cpu")
    gt = json.loads((welde / "ground_truth.json").read_text())
    for info in sorted(gt["images"], key=lambda im: im["id"])[:args.overlays]:
        run_inference(detector, images / info["file_name"], folder / "overlays", conf=0.25, progress=False)
    print(f"\nstudy:      {folder}\nsummary:    {folder / 'study.md'}\ncomparison: {cmp_dir / 'report.md'}\n"
          f"overlays:   {folder / 'overlays'}")
    print(summary_line(fw_name, summary, time.time() - t0))
    return 0


if __name__ == "__main__":
    from welde_det.utils.cli import run_cli

    sys.exit(run_cli(main))
