#!/usr/bin/env python
"""Cached vs through-network frozen stage: seconds per epoch, images/s, cache build time, one run.

For each framework (YOLOv8n and Faster R-CNN mobilenet-v3 FPN, both at ``--imgsz``, WELDE with
the config's four heads), the frozen stage (``stage2``) is fitted twice by the backend's own
``fit_stage`` — through the network (``train.cache_frozen=false``) and from the cache
(``true``) — on the same training images, for ``--epochs`` epochs each. An epoch's time is the
median interval between consecutive per-epoch log rows (``terms.csv``), so it includes the
checkpoints written in it and nothing before the first epoch; it is also given without the
checkpoint writes (YOLO's ``last.pt``/``best.pt``, Faster R-CNN's ``last.pt``), whose fixed cost
weighs more on a short subset than on the whole split. The cached YOLO stage writes its
checkpoint at most every ``train.checkpoint_every_s`` (first and last epoch always), the other
paths every epoch, as in real runs; with the default 5 epochs the median is of 4 intervals, so
the first epoch's write does not decide it (with 3 epochs it would be half of it). The cache
build is timed on its own.
Printed: seconds per epoch, images/s, the build, the per-epoch speed-up, and the speed-up of a
5-epoch stage with the build counted (``5 · through / (build + 5 · cached)``), plus the cache's
bytes per image.

Data: the training split of ``../shared/datasets/lumbar6`` when it exists (the first
``--images`` slices in file order), else the phantom. The frozen stage starts from random
weights (``stage1_epochs=0``): the cost per image does not depend on the weights, except for
Faster R-CNN's proposal count, which an untrained RPN keeps at its maximum — the worst case for
the cache's size and the box head's work.

Usage:
    OMP_NUM_THREADS=2 python bench/bench_frozen.py [--images 128] [--epochs 5] [--imgsz 256]
        [--only yolo|rcnn] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("WELDE_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LUMBAR6 = ROOT.parent / "shared" / "datasets" / "lumbar6"


def _subset_train(data, n: int, out: Path):
    """``data`` with its train split cut to the first ``n`` images (file order)."""
    import dataclasses

    coco = json.loads(Path(data.splits["train"]).read_text())
    images = sorted(coco["images"], key=lambda im: im["file_name"])[:n]
    keep = {im["id"] for im in images}
    coco = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}
    path = out / "train_subset.json"
    path.write_text(json.dumps(coco))
    splits = {**data.splits, "train": path}
    resolved = dataclasses.replace(data.resolved, splits={**data.resolved.splits, "train": path}) \
        if data.resolved is not None else None
    return dataclasses.replace(data, splits=splits, resolved=resolved), len(images)


class _Stamps:
    """Timestamps of the per-epoch ``terms.csv`` rows and the cache builds, by patching the writers."""

    def __init__(self) -> None:
        import welde_det.engine.backends.rcnn as rcnn_backend
        import welde_det.engine.cache.rcnn as cache_rcnn
        import welde_det.engine.cache.yolo as cache_yolo
        import welde_det.utils.fileio as fileio

        self.rows: list[float] = []
        self.builds: list[object] = []
        csv_row = fileio.append_csv_row

        def row(path, values, *a, **k):
            if Path(path).name == "terms.csv":
                self.rows.append(time.perf_counter())
            return csv_row(path, values, *a, **k)

        fileio.append_csv_row = row
        rcnn_backend.append_csv_row = row
        self.saves: list[tuple[float, float]] = []  # (start, seconds) of every checkpoint write
        import welde_det.checkpoint as checkpoint
        from welde_det.integrations.yolo import WELDEDetectionTrainer

        for owner, name in ((checkpoint, "save_checkpoint"), (WELDEDetectionTrainer, "save_model")):
            fn = getattr(owner, name)

            def timed(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.saves.append((t0, time.perf_counter() - t0))

            setattr(owner, name, timed)
        for mod, name in ((cache_yolo, "build_yolo_cache"), (cache_rcnn, "build_rcnn_cache")):
            fn = getattr(mod, name)

            def build(*a, _fn=fn, **k):
                cache = _fn(*a, **k)
                self.builds.append(cache)
                return cache

            setattr(mod, name, build)

    def reset(self) -> None:
        self.rows, self.builds, self.saves = [], [], []

    def epochs(self) -> tuple[float, float]:
        """Median seconds between consecutive epoch rows: as logged, and without the checkpoint writes in between."""
        whole, train = [], []
        for a, b in zip(self.rows, self.rows[1:]):
            whole.append(b - a)
            train.append(b - a - sum(d for t, d in self.saves if a <= t < b))
        if not whole:
            raise SystemExit("fewer than two epochs were logged; use --epochs 2 or more")
        return statistics.median(whole), statistics.median(train)


def run_one(framework: str, cached: bool, args, work: Path, stamps: _Stamps) -> dict:
    from welde_det.engine.backends import get_backend
    from welde_det.engine.config import load_config
    from welde_det.engine.run import class_stats_for, plan_stages, resolve_run_data

    source = [f"data.source={LUMBAR6}"] if LUMBAR6.is_dir() else ["n_images=200"]
    run_dir = work / f"{framework}-{'cached' if cached else 'network'}"
    cfg = load_config(ROOT / "configs" / f"{framework}_welde.yaml", [
        *source, f"imgsz={args.imgsz}", f"epochs={args.epochs}", "stage1_epochs=0", "class_floor=1",
        f"workers={args.workers}", f"cache_frozen={str(cached).lower()}", f"output={work}", "device=cpu",
        f"cache_dir={work / 'phantom'}" if not LUMBAR6.is_dir() else "name=bench"])
    backend = get_backend(cfg)
    backend.check(cfg)
    data = resolve_run_data(cfg, run_dir)
    data, n = _subset_train(data, args.images, run_dir)
    stats = class_stats_for(cfg, data.splits["train"])
    (stage,) = plan_stages(cfg)
    stamps.reset()
    start = time.perf_counter()
    backend.fit_stage(cfg, stage, data, stats, run_dir, init=None)
    total = time.perf_counter() - start
    epoch_s, train_s = stamps.epochs()
    out = {"framework": framework, "cached": cached, "images": n, "epoch_s": epoch_s, "train_s": train_s,
           "total_s": total, "batch": cfg.train.batch}
    if cached:
        (cache,) = stamps.builds
        out["build_s"] = cache.build_seconds
        if framework == "yolo":
            out["bytes_per_image"] = cache.bytes_per_entry
        else:
            out["bytes_per_image"] = cache.nbytes / len(cache)
            out["proposals_per_image"] = cache.proposals / len(cache)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="training images (first N of the split)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fit (2 or more)")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers of the through-network runs")
    parser.add_argument("--only", choices=("yolo", "rcnn"))
    args = parser.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    stamps = _Stamps()
    print(f"data: {'lumbar6 train' if LUMBAR6.is_dir() else 'phantom train'} (first {args.images} images), "
          f"imgsz {args.imgsz}, {args.epochs} epochs per fit, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_frozen_") as tmp:
        for framework in (args.only,) if args.only else ("yolo", "rcnn"):
            pair = {}
            for cached in (False, True):
                pair[cached] = run_one(framework, cached, args, Path(tmp), stamps)
                r = pair[cached]
                print(f"  {framework:4s} {'cached ' if cached else 'network'}: {r['epoch_s']:7.2f} s/epoch "
                      f"({r['images'] / r['epoch_s']:7.1f} images/s; {r['train_s']:.2f} s without the checkpoint "
                      f"writes)"
                      + (f", cache built in {r['build_s']:.2f} s ({r['bytes_per_image'] / 2**20:.2f} MiB per image"
                         + (f", {r['proposals_per_image']:.0f} proposals" if "proposals_per_image" in r else "")
                         + ")" if cached else ""), flush=True)
            net, cac = pair[False], pair[True]
            ratio = net["epoch_s"] / cac["epoch_s"]
            ratio_train = net["train_s"] / cac["train_s"]
            ratio5 = 5 * net["epoch_s"] / (cac["build_s"] + 5 * cac["epoch_s"])
            print(f"  {framework:4s} speed-up: {ratio:.1f}x per epoch ({ratio_train:.1f}x without the checkpoint "
                  f"writes), {ratio5:.1f}x for a 5-epoch stage with the build (load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
            results.append({"network": net, "cached": cac, "ratio_epoch": ratio, "ratio_epoch_train": ratio_train,
                            "ratio_5_epochs": ratio5})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
