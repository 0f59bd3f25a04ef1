#!/usr/bin/env python
"""Evaluator speed and peak memory: welde_det vs pycocotools vs faster-coco-eval, one run.

Each evaluator runs in its own fresh subprocess per repeat, on one CPU thread
(``OMP_NUM_THREADS=1`` etc. and ``torch.set_num_threads(1)``), on the same JSON files; the
timed part starts from the loaded Python objects (COCO dict + results list) and ends with
the 12 stats, so everyone pays for their own conversion and indexing. Peak memory is the
process's high-water mark (``ru_maxrss``) minus its resident size just before the timed part.
The median over ``--repeats`` is printed (wall seconds, and CPU seconds of the process, which
a shared machine distorts less), with the machine's load average around each run.

Workloads (random, seeded):
- spine-like: 3,000 slices, 6 classes, 8-9 GT and 100-200 detections per slice (~450k);
- COCO-sized: 5,000 images, 80 classes, 3-12 GT and 100 detections per image (500k).

Evaluators: ``welde_det`` (``evaluate_coco`` from the results list: full result, including
the confusion matrix and the Ultralytics flavour), ``welde_det[arrays]`` (from an (N, 7)
array), ``welde_det[no extras]`` (``extras=False``: no confusion matrix and no Ultralytics
flavour, i.e. the work pycocotools does), ``pycocotools`` 2.0.x, ``faster-coco-eval``. Stats of every evaluator are checked
against pycocotools'.

Usage:
    python bench/bench_eval.py [--repeats 3] [--quick] [--only spine|coco] [--skip-pycocotools]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

EVALUATORS = ("welde_det", "welde_det[arrays]", "welde_det[no extras]", "faster-coco-eval", "pycocotools")


def workload(kind: str, n_img: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_cat, (g_lo, g_hi), (d_lo, d_hi) = (6, (8, 9), (100, 200)) if kind == "spine" else (80, (3, 12), (100, 100))
    images = [{"id": i + 1, "width": 384, "height": 384} for i in range(n_img)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(n_cat)]
    anns, dets = [], []
    aid = 1
    for img in images:
        ng = rng.integers(g_lo, g_hi + 1)
        gx = rng.uniform(0, 300, (ng, 2))
        gwh = rng.uniform(8, 120, (ng, 2))
        gc = rng.integers(1, n_cat + 1, ng)
        crowd = rng.random(ng) < 0.02
        for j in range(ng):
            b = [float(gx[j, 0]), float(gx[j, 1]), float(gwh[j, 0]), float(gwh[j, 1])]
            anns.append({"id": aid, "image_id": img["id"], "category_id": int(gc[j]), "bbox": b,
                         "area": b[2] * b[3], "iscrowd": int(crowd[j])})
            aid += 1
        nd = rng.integers(d_lo, d_hi + 1)
        src = rng.integers(0, ng, nd)
        jit = rng.normal(0, 6, (nd, 4))
        near = rng.random(nd) < 0.5
        boxes = np.where(near[:, None], np.c_[gx[src], gwh[src]] + jit, np.c_[rng.uniform(0, 300, (nd, 2)),
                                                                            rng.uniform(8, 120, (nd, 2))])
        boxes[:, 2:] = np.abs(boxes[:, 2:]) + 1
        cat = np.where(near & (rng.random(nd) < 0.8), gc[src], rng.integers(1, n_cat + 1, nd))
        score = rng.random(nd)
        for j in range(nd):
            dets.append({"image_id": img["id"], "category_id": int(cat[j]), "bbox": boxes[j].tolist(),
                         "score": float(score[j])})
    return {"images": images, "annotations": anns, "categories": cats}, dets



def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name: str, gt_path: str, dets_path: str) -> dict:
    """One timed evaluation in this (fresh) process."""
    import gc

    import torch

    torch.set_num_threads(1)
    gt = json.loads(Path(gt_path).read_text())
    dets = json.loads(Path(dets_path).read_text())
    if name == "welde_det[arrays]":
        dets = np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets])
    if name.startswith("welde_det"):
        from welde_det.evaluation import evaluate_coco

        def run():
            return evaluate_coco(gt, dets, device="cpu", extras=name != "welde_det[no extras]")["stats"]
    elif name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        def run():
            with contextlib.redirect_stdout(io.StringIO()):
                c = COCO()
                c.dataset = gt
                c.createIndex()
                e = COCOeval(c, c.loadRes(dets), "bbox")
                e.evaluate()
                e.accumulate()
                e.summarize()
            return list(e.stats)
    else:
        from faster_coco_eval import COCO, COCOeval_faster

        def run():
            with contextlib.redirect_stdout(io.StringIO()):
                c = COCO(gt)
                e = COCOeval_faster(c, c.loadRes(dets), "bbox", print_function=lambda *a, **k: None)
                e.evaluate()
                e.accumulate()
                e.summarize()
            return list(e.stats)
    gc.collect()
    base = _rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    stats = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "cpu_s": cpu, "peak_mb": (peak - base) / 2**20, "stats": [float(v) for v in stats],
            "threads": torch.get_num_threads()}


def run_once(name: str, gt_path: Path, dets_path: Path) -> dict:
    load0 = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--worker", name, str(gt_path), str(dets_path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load"] = (load0, os.getloadavg()[0])
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 spine slices / 500 COCO images")
    parser.add_argument("--only", choices=("spine", "coco"))
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "GT", "DETS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    import torch

    print(f"torch {torch.__version__}, numpy {np.__version__}, CPUs {os.cpu_count()}, one thread per evaluator, "
          f"{args.repeats} repeats (median); load average now {os.getloadavg()}")
    sizes = {"spine": 300 if args.quick else 3000, "coco": 500 if args.quick else 5000}
    names = [n for n in EVALUATORS if not (args.skip_pycocotools and n == "pycocotools")]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("spine", "coco"):
            if args.only and kind != args.only:
                continue
            gt, dets = workload(kind, sizes[kind])
            gt_path, dets_path = Path(tmp) / f"{kind}_gt.json", Path(tmp) / f"{kind}_dets.json"
            gt_path.write_text(json.dumps(gt))
            dets_path.write_text(json.dumps(dets))
            print(f"\n== {kind}-like: {sizes[kind]} images, {len(gt['categories'])} classes, "
                  f"{len(gt['annotations'])} GT, {len(dets)} detections")
            del gt, dets
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for _ in range(args.repeats):  # interleaved, so that load changes hit everyone
                for n in names:
                    runs[n].append(run_once(n, gt_path, dets_path))
            med = {n: statistics.median(r["seconds"] for r in runs[n]) for n in names}
            cpu = {n: statistics.median(r["cpu_s"] for r in runs[n]) for n in names}
            mem = {n: statistics.median(r["peak_mb"] for r in runs[n]) for n in names}
            ref = runs["pycocotools"][0]["stats"] if "pycocotools" in runs else None
            print(f"{'evaluator':<21} {'median s':>9} {'runs s':>22} {'CPU s':>7} {'peak MB':>8} {'vs pycocotools':>15} "
                  f"{'(CPU)':>6} {'vs faster-coco-eval':>20} {'(CPU)':>6} {'max|stats-ref|':>15} {'load avg':>12}")
            for n in names:
                ts = ", ".join(f"{r['seconds']:.2f}" for r in runs[n])
                vs_ref = f"{med['pycocotools'] / med[n]:.1f}x" if ref is not None else "-"
                vs_ref_cpu = f"{cpu['pycocotools'] / cpu[n]:.1f}x" if ref is not None else "-"
                vs_fast = f"{med['faster-coco-eval'] / med[n]:.2f}x"
                vs_fast_cpu = f"{cpu['faster-coco-eval'] / cpu[n]:.2f}x"
                diff = f"{max(abs(a - b) for a, b in zip(runs[n][0]['stats'], ref)):.1e}" if ref is not None else "-"
                loads = [x for r in runs[n] for x in r["load"]]
                print(f"{n:<21} {med[n]:>9.2f} {ts:>22} {cpu[n]:>7.2f} {mem[n]:>8.0f} {vs_ref:>15} {vs_ref_cpu:>6} "
                      f"{vs_fast:>20} {vs_fast_cpu:>6} {diff:>15} {min(loads):>5.1f}-{max(loads):<5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
