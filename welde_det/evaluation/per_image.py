"""Per-image detection counts from the one COCO matching, and the slices that miss the most tail boxes.

:func:`match_detections` runs the pycocotools-exact matching of
:mod:`welde_det.evaluation.coco_eval` once and keeps it as a :class:`Matching`; the
error analysis, FROC and the bootstrap all read that object, so every figure in a
report rests on the same true/false-positive flags.

Per-image counts at one IoU threshold ``t`` and score threshold ``s``:

    TP[i, k] = #{detections of class k in image i with score ≥ s, matched at IoU ≥ t}
    FP[i, k] = #{... with score ≥ s, not matched and not ignored}
    FN[i, k] = #{non-crowd GT of class k in image i} − TP[i, k]

The matching is greedy in score order, so restricting it to ``score ≥ s`` gives the same
flags as re-matching the thresholded set (detections beyond the 100 best per image and
class are dropped first, as pycocotools does; detections matched to a crowd box are
neither TP nor FP).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from welde_det.evaluation.coco_eval import (
    AREA_RNG,
    IOU_THRS,
    DetectionArrays,
    _check_dets,
    _GroundTruth,
    _load_gt,
    _match,
    _resolve_device,
)
from welde_det.utils.fileio import atomic_writer

__all__ = [
    "Matching",
    "iou_index",
    "match_detections",
    "per_image_counts",
    "worst_slices",
    "write_per_image_csv",
]


@dataclass(frozen=True)
class Matching:
    """One pycocotools-exact matching of a detection set against its ground truth.

    Attributes:
        gt: the ground truth as arrays (images and categories sorted by id).
        detections: the checked detections (unknown categories dropped).
        matched: ``coco_eval._match``'s output: per kept detection ``img`` / ``cat``
            (indices), ``rank``, ``score``, ``tp`` / ``fp`` (N, T, A) flags; ``npig`` (K, A).
        image_names: ``file_name`` of each image, in ``gt.img_ids`` order (basename only).
        gt_per_image: non-crowd GT counts (n_images, K) — the positives of area range "all".
    """

    gt: _GroundTruth
    detections: DetectionArrays
    matched: dict[str, np.ndarray]
    image_names: tuple[str, ...]
    gt_per_image: np.ndarray

    @property
    def class_names(self) -> list[str]:
        return list(self.gt.cat_names)

    @property
    def num_images(self) -> int:
        return len(self.gt.img_ids)


def match_detections(gt: str | os.PathLike | Mapping[str, Any], detections: Any, *,
                     device: str | torch.device | None = None) -> Matching:
    """Load, check and match ``detections`` against ``gt`` once (same rules as ``evaluate_coco``).

    Args:
        gt: COCO ground-truth dict or JSON path.
        detections: COCO results list / path, dict of arrays, or ``DetectionArrays``.
        device: matching device (default CUDA when available).

    Returns:
        A :class:`Matching`.
    """
    data, source = _load_gt(gt)
    g = _GroundTruth(data, source)
    dets, _ = _check_dets(DetectionArrays.from_any(detections), g)
    matched = _match(g, dets, _resolve_device(device))
    names_by_id = {int(im["id"]): os.path.basename(str(im.get("file_name", im["id"]))) for im in data["images"]}
    names = tuple(names_by_id[int(i)] for i in g.img_ids)
    lo, hi = AREA_RNG[0]
    positive = ~g.crowd & (g.area >= lo) & (g.area <= hi)
    counts = np.zeros((len(g.img_ids), len(g.cat_ids)), np.int64)
    np.add.at(counts, (np.searchsorted(g.img_ids, g.image_id[positive]),
                       np.searchsorted(g.cat_ids, g.category_id[positive])), 1)
    return Matching(g, dets, matched, names, counts)


def iou_index(iou: float) -> int:
    """Index of ``iou`` in the COCO IoU grid (0.50, 0.55, ..., 0.95); other values raise."""
    hit = np.nonzero(np.isclose(IOU_THRS, iou, rtol=0, atol=1e-9))[0]
    if len(hit) == 0:
        raise ValueError(f"IoU threshold {iou} is not on the COCO grid the matching uses; "
                         f"choose one of {[round(float(t), 2) for t in IOU_THRS]}")
    return int(hit[0])


def per_image_counts(matching: Matching, *, iou: float = 0.5, score_threshold: float = 0.25) -> dict[str, Any]:
    """TP / FP / FN per image and class at one IoU and score threshold.

    Args:
        matching: from :func:`match_detections`.
        iou: IoU threshold on the COCO grid (default 0.5).
        score_threshold: detections with ``score ≥ score_threshold`` count.

    Returns:
        ``tp``, ``fp``, ``fn`` (n_images, K) int arrays, ``image_ids``, ``image_names``,
        ``class_names``, ``iou``, ``score_threshold``.
    """
    t = iou_index(iou)
    m = matching.matched
    n_img, k = matching.gt_per_image.shape
    keep = m["score"] >= score_threshold
    tp = np.zeros((n_img, k), np.int64)
    fp = np.zeros((n_img, k), np.int64)
    np.add.at(tp, (m["img"][keep], m["cat"][keep]), m["tp"][keep, t, 0].astype(np.int64))
    np.add.at(fp, (m["img"][keep], m["cat"][keep]), m["fp"][keep, t, 0].astype(np.int64))
    return {"tp": tp, "fp": fp, "fn": matching.gt_per_image - tp, "image_ids": matching.gt.img_ids.tolist(),
            "image_names": list(matching.image_names), "class_names": matching.class_names,
            "iou": float(IOU_THRS[t]), "score_threshold": float(score_threshold)}


def write_per_image_csv(path: str | os.PathLike, counts: Mapping[str, Any]) -> Path:
    """One row per (image, class): ``image_id, file_name, class, gt, tp, fp, fn, iou, score_threshold``."""
    path = Path(path)
    with atomic_writer(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "file_name", "class", "gt", "tp", "fp", "fn", "iou", "score_threshold"])
        iou, thr = f"{counts['iou']:.2f}", f"{counts['score_threshold']:g}"
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        for i, (img_id, name) in enumerate(zip(counts["image_ids"], counts["image_names"])):
            for k, cls in enumerate(counts["class_names"]):
                w.writerow([img_id, name, cls, int(tp[i, k] + fn[i, k]), int(tp[i, k]), int(fp[i, k]),
                            int(fn[i, k]), iou, thr])
    return path


def worst_slices(counts: Mapping[str, Any], tail_classes: Sequence[str], *, top: int = 10) -> list[dict[str, Any]]:
    """The images with the most missed boxes of the tail classes (ties: more tail GT first, then image id).

    Returns:
        Up to ``top`` rows ``{"image_id", "file_name", "missed_tail", "tail_gt", "missed": {class: n},
        "false_positives": n}``; images that miss no tail box are left out.
    """
    names = list(counts["class_names"])
    unknown = [c for c in tail_classes if c not in names]
    if unknown:
        raise ValueError(f"tail classes {unknown} are not among the classes {names}")
    idx = [names.index(c) for c in tail_classes]
    if not idx:
        return []
    fn = counts["fn"][:, idx]
    gt = (counts["tp"] + counts["fn"])[:, idx]
    missed = fn.sum(1)
    ids = np.asarray(counts["image_ids"])
    order = np.lexsort([ids, -gt.sum(1), -missed])
    rows = []
    for i in order[:top]:
        if missed[i] == 0:
            break
        rows.append({"image_id": int(ids[i]), "file_name": counts["image_names"][i], "missed_tail": int(missed[i]),
                     "tail_gt": int(gt[i].sum()),
                     "missed": {names[k]: int(counts["fn"][i, k]) for k in idx if counts["fn"][i, k]},
                     "false_positives": int(counts["fp"][i].sum())})
    return rows
