"""FROC: sensitivity against false positives per image, per class and averaged, from the one matching.

For a class ``k`` and a score threshold ``s`` (detections with ``score ≥ s`` kept):

    sensitivity_k(s) = TP_k(s) / #non-crowd GT of class k
    fppi_k(s)        = FP_k(s) / #images (all images of the ground truth)

with TP / FP the pycocotools-exact flags at one IoU threshold (default 0.5; greedy in
score order, so thresholding the matched set equals matching the thresholded set). The
operating points are the distinct detection scores plus the empty point (0, 0).
Sensitivity at a rate ``f`` is the highest sensitivity among operating points with
``fppi ≤ f`` — an operating point the detector can actually be set to, no interpolation.
The averaged curve is the mean over classes with ground truth at each rate (``mean``);
``pooled`` counts every class's TPs and FPs together at one common score threshold
(the lesion-level FROC of medical detection papers). ``cpm`` is the mean sensitivity over
the seven rates 1/8 … 8 (LUNA16's competition performance metric).

Compared with ``coco-froc-analysis`` (0.2.15): it keeps ``score > s`` and matches by IoU
``>`` the threshold with a Hungarian assignment per image and class; its count of lesion
localisations is ``min(#GT, #detections)`` per image and class whatever the overlap (the
IoU only changes the assignment cost), so the two agree only where that count is right
(see ``tests/evaluation/test_froc.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from welde_det.evaluation.coco_eval import IOU_THRS
from welde_det.evaluation.per_image import Matching, iou_index, match_detections

__all__ = ["FROC_RATES", "froc_analysis", "sensitivity_at"]

#: False positives per image at which FROC sensitivities are reported (LUNA16 / nnDetection).
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def sensitivity_at(fppi: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Highest sensitivity among operating points with ``fppi ≤ rate``, for each rate (0 if none).

    Shape:
        fppi, sensitivity (P,) operating points; returns (len(rates),).
    """
    fppi, sensitivity = np.asarray(fppi, float), np.asarray(sensitivity, float)
    out = np.zeros(len(rates))
    for i, r in enumerate(rates):
        ok = fppi <= r
        out[i] = sensitivity[ok].max() if ok.any() else 0.0
    return out


def _curve(score: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int, n_images: int) -> dict[str, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    score, tp, fp = score[order], tp[order], fp[order]
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    last = np.r_[score[1:] != score[:-1], True] if len(score) else np.zeros(0, bool)  # end of a tie block
    return {"score": np.r_[np.inf, score[last]],
            "fppi": np.r_[0.0, fp_c[last] / n_images],
            "sensitivity": np.r_[0.0, tp_c[last] / n_pos] if n_pos else np.full(1 + int(last.sum()), np.nan),
            "tp": np.r_[0, tp_c[last]].astype(np.int64), "fp": np.r_[0, fp_c[last]].astype(np.int64)}


def froc_analysis(
    gt: str | os.PathLike | Mapping[str, Any] | None,
    detections: Any,
    *,
    iou: float = 0.5,
    rates: Sequence[float] = FROC_RATES,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """FROC curves and sensitivities at fixed false-positive rates.

    Args:
        gt: COCO ground truth (dict or path); unused when ``detections`` is a ``Matching``.
        detections: COCO results (any form ``evaluate_coco`` takes) or a ``Matching``.
        iou: IoU threshold on the COCO grid 0.50 … 0.95.
        rates: false positives per image to report.
        device: matching device.

    Returns:
        ``iou``, ``rates``, ``num_images``; ``per_class``: ``{name: {"num_gt", "sensitivity"
        (per rate, NaN without GT), "cpm", "curve": {"score", "fppi", "sensitivity", "tp", "fp"}}}``;
        ``mean``: ``{"sensitivity", "cpm"}`` over classes with GT; ``pooled``: as a class entry.
    """
    matching = detections if isinstance(detections, Matching) else match_detections(gt, detections, device=device)
    t = iou_index(iou)
    rates = [float(r) for r in rates]
    if not rates or min(rates) <= 0:
        raise ValueError(f"FROC rates must be positive false positives per image, got {rates}")
    m = matching.matched
    n_img = matching.num_images
    n_pos = matching.gt_per_image.sum(0)
    per_class: dict[str, Any] = {}
    for k, name in enumerate(matching.class_names):
        sel = m["cat"] == k
        curve = _curve(m["score"][sel], m["tp"][sel, t, 0], m["fp"][sel, t, 0], int(n_pos[k]), n_img)
        sens = sensitivity_at(curve["fppi"], curve["sensitivity"], rates) if n_pos[k] else np.full(len(rates), np.nan)
        per_class[name] = {"num_gt": int(n_pos[k]), "sensitivity": sens.tolist(),
                           "cpm": float(np.mean(sens)), "curve": {key: v.tolist() for key, v in curve.items()}}
    with_gt = [per_class[n]["sensitivity"] for k, n in enumerate(matching.class_names) if n_pos[k]]
    mean = np.mean(with_gt, axis=0) if with_gt else np.full(len(rates), np.nan)
    pooled_curve = _curve(m["score"], m["tp"][:, t, 0], m["fp"][:, t, 0], int(n_pos.sum()), n_img)
    pooled = (sensitivity_at(pooled_curve["fppi"], pooled_curve["sensitivity"], rates) if n_pos.sum()
              else np.full(len(rates), np.nan))
    return {
        "iou": float(IOU_THRS[t]),
        "rates": rates,
        "num_images": n_img,
        "per_class": per_class,
        "mean": {"sensitivity": mean.tolist(), "cpm": float(np.mean(mean))},
        "pooled": {"num_gt": int(n_pos.sum()), "sensitivity": pooled.tolist(), "cpm": float(np.mean(pooled)),
                   "curve": {key: v.tolist() for key, v in pooled_curve.items()}},
    }
