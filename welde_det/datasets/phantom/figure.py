"""The phantom-vs-real comparison figure (``docs/phantom_vs_real.png``).

Top row: six phantom mid-sagittal slices (T2 and T1 at difficulty 0, 0.5 and 1, boxes in
class colours); bottom row: six real slices (three T2, three T1) at the same size.
Drawn with OpenCV only, so it needs no plotting backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.phantom.study import generate_study
from welde_det.datasets.phantom.writers import to_uint8
from welde_det.utils.fileio import atomic_write_bytes

__all__ = ["CLASS_COLOURS", "comparison_figure", "draw_boxes", "pick_showcase_seeds"]

#: BGR colour per class, in LUMBAR_CLASSES order.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (40, 40, 255), (80, 220, 80), (255, 140, 40), (255, 255, 0), (0, 215, 255), (255, 60, 255),
)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Grey slice (uint8) -> BGR with class-coloured boxes."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    for box, lab in zip(boxes, labels):
        x0, y0, x1, y1 = (round(v) for v in box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), CLASS_COLOURS[int(lab)], thickness, cv2.LINE_AA)
    return out


def pick_showcase_seeds(difficulty: float, count: int, start: int = 0) -> list[int]:
    """Seeds whose studies carry a rare finding (spondylolisthesis, TDB or DDD), for figures."""
    rare = {LUMBAR_CLASSES.index(n) for n in ("DDD", "TDB", "Spondylolisthesis")}
    seeds, seed = [], start
    while len(seeds) < count:
        labels = set(generate_study(seed, difficulty=difficulty, render=False).labels.tolist())
        if (labels & rare and LUMBAR_CLASSES.index("Spondylolisthesis") in labels) or len(labels & rare) >= 2:
            seeds.append(seed)
        seed += 1
    return seeds


def _label(tile: np.ndarray, text: str) -> None:
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 20), (0, 0, 0), -1)
    cv2.putText(tile, text, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)


def comparison_figure(real_dir: str | os.PathLike, out: str | os.PathLike, *, size: int = 384,
                      seeds: list[int] | None = None) -> Path:
    """Write the six-phantom / six-real comparison figure and return its path.

    Args:
        real_dir: folder with real mid-sagittal PNGs (names containing ``T1``/``T2``).
        out: PNG to write.
        size: tile side in pixels (real slices are resized to it as well).
        seeds: six phantom seeds (default: showcase seeds with rare findings).
    """
    real_dir = Path(real_dir)
    pngs = sorted(real_dir.glob("*.png"))
    t2 = [p for p in pngs if "T2" in p.name][:3]
    t1 = [p for p in pngs if "T1" in p.name][:3]
    if len(t1) < 3 or len(t2) < 3:
        raise FileNotFoundError(f"{real_dir}: need 3 T1 and 3 T2 PNGs (names with 'T1'/'T2'), found {len(t1)}/{len(t2)}")
    plan = [("t2", 0.0), ("t2", 0.5), ("t2", 1.0), ("t1", 0.0), ("t1", 0.5), ("t1", 1.0)]
    if seeds is None:
        seeds = pick_showcase_seeds(0.0, 3, start=100) * 2
    top = []
    for (contrast, d), seed in zip(plan, seeds):
        study = generate_study(seed, difficulty=d, contrast=contrast, volume=False)
        tile = draw_boxes(to_uint8(study.mid_slice), study.boxes, study.labels)
        tile = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
        _label(tile, f"phantom {contrast.upper()}  difficulty {d:g}  seed {seed}")
        top.append(tile)
    bottom = []
    for path in t2 + t1:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"{path}: cannot read image")
        tile = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        _label(tile, f"real {'T2' if 'T2' in path.name else 'T1'}  {path.name[:18]}")
        bottom.append(tile)
    legend = np.zeros((26, size * 6, 3), np.uint8)
    x = 6
    for name, colour in zip(LUMBAR_CLASSES, CLASS_COLOURS):
        cv2.rectangle(legend, (x, 7), (x + 14, 19), colour, -1)
        cv2.putText(legend, name, (x + 20, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        x += 40 + 9 * len(name)
    fig = np.vstack([np.hstack(top), np.hstack(bottom), legend])
    ok, buf = cv2.imencode(".png", fig, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"{out}: PNG encoding failed")
    return atomic_write_bytes(out, buf.tobytes())
