"""``make demo``: phantom → CE baseline, CE-ensemble control and WELDE → comparison report and overlays.

On a fresh machine, with the quick CPU profile (Ultralytics YOLOv8n, random init):

1. generates (and caches) the lumbar MRI phantom at the default difficulty;
2. trains the plain-BCE YOLO baseline (``configs/yolo_ce.yaml``);
3. starts from that baseline's checkpoint for the frozen-detector stage (the WELDE paper's
   setting: backbone, neck and box branch frozen, only adapters, heads and weights train)
   twice: the architecture-matched ``ce_ensemble`` control (four CE heads) and WELDE (ce,
   focal, cb, ldam) — same heads, same schedule, only the losses differ;
4. evaluates all three on the same validation split with the pycocotools-exact
   evaluator, writes WELDE-vs-CE reports and a three-run summary (``summary.md``);
5. draws WELDE's detections on validation slices (``overlays/``);

and prints where everything is, with a one-line summary. ``--framework rcnn`` runs the
same comparison with torchvision Faster R-CNN (MobileNetV3-FPN).

Usage:
    python -m welde_det.engine.demo [--framework yolo|rcnn] [--n-images 120] [--imgsz 256]
        [--epochs 30] [--stage2-epochs 10] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from welde_det.engine.run import run_training
from welde_det.utils.fileio import atomic_write_json, atomic_write_text
from welde_det.utils.logging import setup_logging

ROOT = Path(__file__).resolve().parents[2]
RUNS = (("ce", "CE"), ("ce_ensemble", "CE ensemble (control)"), ("welde", "WELDE"))
#: The CPU profiles behind docs/results.md: YOLO about 13 minutes on two cores (what
#: ``make demo`` runs), Faster R-CNN about 30 (a random-init two-stage detector needs more).
PROFILES: dict[str, dict[str, Any]] = {
    "yolo": {"n_images": 120, "imgsz": 256, "batch": 16, "epochs": 30, "stage2_epochs": 10},
    "rcnn": {"n_images": 120, "imgsz": 256, "batch": 4, "epochs": 12, "stage2_epochs": 4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=tuple(PROFILES), default="yolo")
    parser.add_argument("--n-images", type=int, help="phantom studies (T1 + T2 slices each)")
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--epochs", type=int, help="epochs of the CE baseline (= WELDE's stage 1)")
    parser.add_argument("--stage2-epochs", type=int, help="epochs of the frozen-detector stage")
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--cache-dir", default="data/generated")
    parser.add_argument("--overlays", type=int, default=4, help="validation slices to draw")
    args = parser.parse_args(argv)
    for key, value in PROFILES[args.framework].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _train_all(args: argparse.Namespace) -> dict[str, Path]:
    fw = args.framework
    common = [f"output={args.out}", f"n_images={args.n_images}", f"imgsz={args.imgsz}", f"batch={args.batch}",
              f"cache_dir={args.cache_dir}", f"difficulty={args.difficulty}", "workers=0"]
    if fw == "yolo":
        common.append(f"nbs={args.batch}")  # one optimiser step per batch: a short run needs the steps
    runs = {"ce": run_training(ROOT / "configs" / f"{fw}_ce.yaml", [*common, f"epochs={args.epochs}"])}
    # the frozen stage starts from the CE baseline itself: its stage 1 is the baseline
    stage2 = ["stage1_epochs=0", f"model.weights={_checkpoint(runs['ce']).resolve()}"]
    for name in ("ce_ensemble", "welde"):
        runs[name] = run_training(ROOT / "configs" / f"{fw}_{name}.yaml",
                                  [*common, *stage2, f"epochs={args.stage2_epochs}", "warmup_steps=20"])
    return runs


def _checkpoint(run: Path) -> Path:
    """The model a run ends with (the one schema; chosen by the run's ``train.select``)."""
    return run / "weights" / "model.pt"


def _val_split(run: Path) -> tuple[Path, Path]:
    """The COCO ground truth a run was measured on and its image folder."""
    meta = json.loads((run / "eval_split.json").read_text())
    return run / "ground_truth.json", (run / meta["images"]).resolve()


def summary_markdown(reports: dict[str, dict[str, Any]], title: str, seconds: float) -> str:
    """One table of the headline metrics and one of per-class AP, a column per run."""
    labels = dict(RUNS)
    names = list(reports)
    lines = [f"# {title}", "", "| run | mAP@[.5:.95] | mAP@.5 | mAP_tail | mAP50_tail |", "|---|---:|---:|---:|---:|"]
    for name in names:
        r = reports[name]
        lines.append(f"| {labels[name]} | {100 * r['map']:.1f} | {100 * r['map50']:.1f} | {100 * r['map_tail']:.1f} "
                     f"| {100 * r['map50_tail']:.1f} |")
    first = reports[names[0]]
    lines += ["", f"Tail classes: {', '.join(first['tail_classes'])} — {first['tail_rule']}.", "",
              "| class | GT | " + " | ".join(f"AP {labels[n]}" for n in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for k, row in enumerate(first["per_class"]):
        cls = f"**{row['class']}** (tail)" if row["tail"] else row["class"]
        aps = " | ".join("—" if reports[n]["per_class"][k]["ap"] < 0 else f"{100 * reports[n]['per_class'][k]['ap']:.1f}"
                         for n in names)
        lines.append(f"| {cls} | {row['num_gt']} | {aps} |")
    lines += ["", f"AP in %, pycocotools-exact. Every run is the last epoch of its fixed schedule (nothing "
              f"measured chose it); measured on the validation split ({first['num_images']} slices). "
              f"Wall time {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    t0 = time.time()
    runs = _train_all(args)
    from welde_det.engine.evaluate import write_detection_report
    from welde_det.engine.infer import load_detector, run_inference

    val, images = _val_split(runs["welde"])
    out = Path(args.out)
    fw_name = {"yolo": "YOLOv8n", "rcnn": "Faster R-CNN"}[args.framework]
    cmp_dir = out / "comparison"
    write_detection_report(val, runs["welde"] / "detections.json", cmp_dir,
                           class_stats=runs["welde"] / "class_stats.json", compare=runs["ce"] / "detections.json",
                           compare_label="CE", label="WELDE",
                           title=f"{fw_name} on the lumbar phantom: WELDE vs CE")
    reports = {name: json.loads((runs[name] / "report.json").read_text()) for name, _ in RUNS}
    title = (f"{fw_name} on the lumbar phantom (difficulty {args.difficulty:g}, {args.n_images} studies, "
             f"{args.imgsz} px): CE vs CE ensemble vs WELDE")
    seconds = time.time() - t0
    atomic_write_text(out / "summary.md", summary_markdown(reports, title, seconds))
    atomic_write_json(out / "summary.json", {
        "title": title, "seconds": round(seconds, 1), "args": vars(args),
        "runs": {name: {"folder": str(runs[name]), "map": r["map"], "map50": r["map50"], "map_tail": r["map_tail"],
                        "map50_tail": r["map50_tail"]} for name, r in reports.items()}})
    detector = load_detector(_checkpoint(runs["welde"]), "cpu")
    gt = json.loads(val.read_text())
    for info in sorted(gt["images"], key=lambda im: im["id"])[:args.overlays]:
        run_inference(detector, images / info["file_name"], out / "overlays", conf=0.25, progress=False)
    ce, welde = reports["ce"], reports["welde"]
    print(f"\nruns:       {', '.join(str(runs[n]) for n, _ in RUNS)}\n"
          f"summary:    {out / 'summary.md'}\ncomparison: {cmp_dir / 'report.md'}\noverlays:   {out / 'overlays'}")
    print(f"{fw_name}: mAP CE {ce['map']:.3f} / CE-ens {reports['ce_ensemble']['map']:.3f} / WELDE {welde['map']:.3f}"
          f" | mAP_tail CE {ce['map_tail']:.3f} / CE-ens {reports['ce_ensemble']['map_tail']:.3f} / "
          f"WELDE {welde['map_tail']:.3f} (tail: {', '.join(welde['tail_classes'])}) | {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
