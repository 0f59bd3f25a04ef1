#!/usr/bin/env python
"""Evaluator speed and peak memory: welde_det (CPU, and CUDA when present) vs pycocotools
and faster-coco-eval, on the same data in one run, with a check that all agree.

Workloads:
- spine-like: 5,000 images, 6 classes, 8-9 GT and 100-300 detections per image;
- COCO-sized: 5,000 images, 80 classes, ~7 GT and 100 detections per image.

Usage:
    python bench/bench_eval.py [--images 5000] [--quick] [--skip-pycocotools]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil
import torch

from welde_det.evaluation import evaluate_coco


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


class PeakRSS:
    """Peak resident memory above the starting point, sampled every 10 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.mb = (self.peak - self.base) / 2**20


def run_pycocotools(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        e = COCOeval(c, c.loadRes(copy.deepcopy(dets)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.array(e.stats)


def run_faster(gt, dets):
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO(copy.deepcopy(gt))
        e = COCOeval_faster(c, c.loadRes(copy.deepcopy(dets)), "bbox", print_function=lambda *a, **k: None)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.array(e.stats)


def timed(fn, *args):
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
    return out, dt, mem.mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="500 images")
    parser.add_argument("--skip-pycocotools", action="store_true")
    args = parser.parse_args()
    n = 500 if args.quick else args.images
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    for kind in ("spine", "coco"):
        gt, dets = workload(kind, n)
        print(f"\n== {kind}-like: {n} images, {len(gt['categories'])} classes, {len(gt['annotations'])} GT, "
              f"{len(dets)} detections")
        rows = []
        ours, t_ours, m_ours = timed(lambda g, d: np.array(evaluate_coco(g, d, device="cpu")["stats"]), gt, dets)
        rows.append(("welde_det (cpu)", t_ours, m_ours))
        if torch.cuda.is_available():
            evaluate_coco(gt, dets[:1000], device="cuda")  # warm-up
            _, t_gpu, m_gpu = timed(lambda g, d: evaluate_coco(g, d, device="cuda"), gt, dets)
            rows.append(("welde_det (cuda)", t_gpu, m_gpu))
        fast, t_fast, m_fast = timed(run_faster, gt, dets)
        rows.append(("faster-coco-eval", t_fast, m_fast))
        ref = None
        if not args.skip_pycocotools:
            ref, t_ref, m_ref = timed(run_pycocotools, gt, dets)
            rows.append(("pycocotools", t_ref, m_ref))
        print(f"{'evaluator':<18} {'seconds':>8} {'peak MB':>8} {'vs pycocotools':>15} {'vs faster-coco-eval':>20}")
        for name, t, m in rows:
            vs_ref = f"{t_ref / t:.1f}x faster" if ref is not None else "-"
            print(f"{name:<18} {t:>8.2f} {m:>8.0f} {vs_ref:>15} {t_fast / t:>19.2f}x")
        if ref is not None:
            print(f"max |stats - pycocotools|: ours {np.abs(ours - ref).max():.2e}, "
                  f"faster-coco-eval {np.abs(fast - ref).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
