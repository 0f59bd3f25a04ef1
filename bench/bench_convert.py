#!/usr/bin/env python
"""COCO -> YOLO export speed: ``welde_det.datasets.coco_to_yolo`` vs Ultralytics' ``convert_coco``.

Both convert the same COCO JSON (N images, about 9 boxes each, the lumbar set's density)
in the same run; ours also checks every image file, symlinks it into ``images/<split>/``
and writes ``data.yaml``, Ultralytics' writes label files only. Prints seconds and the
ratio ours / Ultralytics (lower is better).

Usage:
    OMP_NUM_THREADS=1 python bench/bench_convert.py [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.coco import coco_to_yolo, make_annotation, make_categories, make_image_entry


def make_coco(root: Path, n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True)
    png = (root / "template.png")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    images, anns = [], []
    for i in range(1, n_images + 1):
        name = f"img{i:05d}.png"
        shutil.copyfile(png, root / "imgs" / name)
        images.append(make_image_entry(i, name, width=384, height=384))
        for _ in range(int(rng.integers(5, 13))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(10, 80, 2)
            anns.append(make_annotation(len(anns) + 1, i, int(rng.integers(1, 7)), [x, y, w, h]))
    return {"info": {}, "images": images, "annotations": anns, "categories": make_categories(LUMBAR_CLASSES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from ultralytics.data.converter import convert_coco

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco = make_coco(root, args.images)
        (root / "ann").mkdir()
        (root / "ann" / "train.json").write_text(json.dumps(coco))
        ours, theirs = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            coco_to_yolo(coco, root / "imgs", root / f"ours{r}")
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                convert_coco(str(root / "ann"), str(root / f"ultra{r}"), cls91to80=False)
            theirs.append(time.perf_counter() - t0)
        o, t = min(ours), min(theirs)
        print(f"images={args.images} boxes={len(coco['annotations'])} repeats={args.repeats} (best of)")
        print(f"welde_det coco_to_yolo      {o:.3f} s  ({args.images / o:.0f} images/s)")
        print(f"ultralytics convert_coco    {t:.3f} s  ({args.images / t:.0f} images/s)")
        print(f"ratio ours/ultralytics      {o / t:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
