"""TIDE-style error analysis (Bolya et al., ECCV 2020) on top of the COCO matching, and GT co-location.

Every false positive at IoU ``fg`` (0.5) gets one error type, tested in ``tidecv``'s order
with its IoUs against the image's non-crowd ground truth:

1. background: the image has no ground truth at all;
2. localisation: best IoU with a GT of its own class in ``[bg, fg]`` (``bg`` = 0.1);
3. classification: best IoU with a GT of another class ``≥ fg``;
4. duplicate: best IoU with an already matched GT of its own class ``≥ fg``;
5. background: best IoU with any GT ``≤ bg``;
6. both: anything else (wrong class and poorly localised).

A GT that no detection matched is *missed* unless it is the target of a localisation or
classification error (then fixing that error recovers it). ΔAP of a type is the AP50 gain
when only that type is fixed, as ``tidecv`` fixes it: a localisation / classification error
becomes a true positive of the GT's class (only the highest-scoring error per unmatched
GT; the others are removed), duplicate / background / both errors are removed, a missed
GT is removed from the positives. ΔmAP averages the per-class ΔAP over classes with GT.

Where this differs from ``tidecv`` 1.0.1 (the test compares the rest to 1e-9):
- the matching is pycocotools' (best 100 detections per image *and class*, highest IoU
  taking the last GT on ties, crowd GTs absorbing detections, which are then no error),
  so the baseline AP is exactly the report's AP50; tidecv keeps the best 100 per image,
  takes the first GT on ties and still classifies detections inside crowd regions;
- AP is pycocotools' 101-point interpolation; tidecv's is the same but for its recall
  points ``k/100``, ten of which (0.35, 0.41, 0.47, 0.57, 0.69, 0.70, 0.82, 0.83, 0.94,
  0.95) are one ulp below ``np.linspace``'s: a class whose recall hits one exactly can
  differ (and the ``eps`` in pycocotools' precision moves values by ~1e-16);
- mAP averages classes with ground truth (tidecv also averages classes that only have
  detections, with AP 0), and a class whose GT are all removed as missed keeps AP 0;
- ΔAP is not clipped at 0 (tidecv clips; with this AP no fix can lower it).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from welde_det.evaluation.coco_eval import AREA_RNG, _GroundTruth, _load_gt
from welde_det.evaluation.intervals import _class_ap, _ClassSequence
from welde_det.evaluation.per_image import Matching, match_detections

__all__ = ["ERROR_TYPES", "colocation_table", "tide_errors"]

#: Error types in ``tidecv``'s order (its short names: Cls, Loc, Both, Dupe, Bkg, Miss).
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
_CLS, _LOC, _BOTH, _DUPE, _BKG = range(5)


def _iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou for boxes [x, y, w, h]: d (n, 4), g (m, 4) -> (n, m); crowd: IoU = inter / det area."""
    w = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0])
    h = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = w * h
    da = (d[:, 2] * d[:, 3])[:, None]
    ga = (g[:, 2] * g[:, 3])[None, :]
    union = np.where(crowd[None, :], da, (da + ga) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w <= 0) | (h <= 0), 0.0, iou)


def _kept_order(matching: Matching) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detections pycocotools keeps (100 best per image and class): indices, image index, class index, rank."""
    d, g = matching.detections, matching.gt
    img = np.searchsorted(g.img_ids, d.image_id)
    cat = np.searchsorted(g.cat_ids, d.category_id)
    pair = img * len(g.cat_ids) + cat
    order = np.lexsort([-d.score, pair])
    ps = pair[order]
    starts = np.r_[0, np.nonzero(np.diff(ps))[0] + 1] if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = rank < 100
    order, rank = order[keep], rank[keep]
    return order, img[order], cat[order], rank


def _classify(matching: Matching, fg: float, bg: float) -> dict[str, np.ndarray]:
    """Replay the COCO matching at ``fg`` per image, remembering which GT each detection took, and type the errors."""
    g, d = matching.gt, matching.detections
    order, d_img, d_cat, d_rank = _kept_order(matching)
    g_img = np.searchsorted(g.img_ids, g.image_id)
    g_cat = np.searchsorted(g.cat_ids, g.category_id)
    lo, hi = AREA_RNG[0]
    g_ig = g.crowd | (g.area < lo) | (g.area > hi)
    n = len(order)
    status = np.zeros(n, np.int8)  # 0 FP, 1 TP, 2 ignored
    err = np.full(n, -1, np.int8)
    target = np.full(n, -1, np.int64)  # GT row of a localisation / classification error
    g_used = np.zeros(len(g_ig), bool)
    thr = min(fg, 1 - 1e-10)
    by_img = np.argsort(d_img, kind="stable")
    d_bounds = np.searchsorted(d_img[by_img], np.arange(len(g.img_ids) + 1))
    g_by_img = np.argsort(g_img, kind="stable")
    g_bounds = np.searchsorted(g_img[g_by_img], np.arange(len(g.img_ids) + 1))
    for i in range(len(g.img_ids)):
        rows = by_img[d_bounds[i]:d_bounds[i + 1]]  # kept detections of image i, by pair then score
        if len(rows) == 0:
            continue
        gi = g_by_img[g_bounds[i]:g_bounds[i + 1]]
        ious = _iou(d.bbox[order[rows]], g.bbox[gi], g.crowd[gi])
        for k in np.unique(d_cat[rows]):
            in_k = np.nonzero(d_cat[rows] == k)[0]
            gk = np.nonzero(g_cat[gi] == k)[0]
            gk = gk[np.argsort(g_ig[gi[gk]], kind="stable")]  # regular GTs first, as pycocotools
            for r in in_k:
                v = ious[r, gk]
                ok = v >= thr
                free = ok & ~g_ig[gi[gk]] & ~g_used[gi[gk]]
                if free.any():
                    best = np.nonzero(free & (v == v[free].max()))[0][-1]
                    g_used[gi[gk[best]]] = True
                    status[rows[r]] = 1
                elif (ok & g_ig[gi[gk]]).any():
                    status[rows[r]] = 2
                else:
                    box = d.bbox[order[rows[r]]]
                    area = box[2] * box[3]
                    status[rows[r]] = 2 if (area < lo or area > hi) else 0
        # error types of this image's false positives, in score order (ties: input order)
        reg = ~g_ig[gi]
        if not reg.any():
            err[rows[status[rows] == 0]] = _BKG
            continue
        fps = rows[status[rows] == 0]
        pos = {int(r): j for j, r in enumerate(rows)}
        for r in fps[np.lexsort([order[fps], -d.score[order[fps]]])]:
            v = np.where(reg, ious[pos[int(r)]], 0.0)
            same = g_cat[gi] == d_cat[r]
            v_same = np.where(same, v, 0.0)
            j = int(np.argmax(v_same))
            if bg <= v_same[j] <= fg:
                err[r], target[r] = _LOC, gi[j]
                continue
            v_other = np.where(same, 0.0, v)
            j = int(np.argmax(v_other))
            if v_other[j] >= fg:
                err[r], target[r] = _CLS, gi[j]
                continue
            if np.where(g_used[gi], v_same, 0.0).max() >= fg:
                err[r] = _DUPE
            elif v.max() <= bg:
                err[r] = _BKG
            else:
                err[r] = _BOTH
    # the fixable error per unmatched target GT: highest score, first in processing order on ties
    fixable = np.zeros(n, bool)
    cand = np.nonzero(target >= 0)[0]
    cand = cand[~g_used[target[cand]]]
    cand = cand[np.lexsort([order[cand], -d.score[order[cand]], d_img[cand]])]
    seen: set[int] = set()
    for r in cand:
        if int(target[r]) not in seen:
            seen.add(int(target[r]))
            fixable[r] = True
    usable = np.zeros(len(g_ig), bool)
    usable[target[cand]] = True
    missed = ~g_ig & ~g_used & ~usable
    return {"order": order, "img": d_img, "cat": d_cat, "rank": d_rank, "score": d.score[order], "status": status,
            "error": err, "target": target, "fixable": fixable, "g_used": g_used, "g_ig": g_ig, "g_cat": g_cat,
            "missed": missed}


def _ap_per_class(score, tp, img, rank, cat, n_pos, device) -> np.ndarray:
    """AP (101-point, pycocotools' order) per class for (score, tp) points and positive counts n_pos (K,)."""
    aps = np.full(len(n_pos), np.nan)
    for k in range(len(n_pos)):
        sel = np.nonzero(cat == k)[0]
        sel = sel[np.lexsort([rank[sel], img[sel], -score[sel]])]
        seq = _ClassSequence(np.zeros(len(sel), np.int64), np.full(len(sel), -1), tp[sel, None], ~tp[sel, None])
        aps[k] = _class_ap(seq, np.ones((1, 1), np.int64), np.array([n_pos[k]]), device)[0][0]
    return aps


def tide_errors(
    gt: str | os.PathLike | Mapping[str, Any] | None,
    detections: Any,
    *,
    fg_iou: float = 0.5,
    bg_iou: float = 0.1,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """TIDE ΔAP50 per error type, overall and per class, with the error counts.

    Args:
        gt: COCO ground truth (dict or path); unused when ``detections`` is a ``Matching``.
        detections: COCO results (any form ``evaluate_coco`` takes) or a ``Matching``.
        fg_iou: IoU at which a detection is a true positive (0.5).
        bg_iou: IoU at or below which a detection is background (0.1).
        device: matching device.

    Returns:
        ``fg_iou``, ``bg_iou``; ``map``: baseline AP at ``fg_iou`` (= pycocotools' AP50 at 0.5);
        ``delta_map``: ``{type: ΔmAP}``; ``counts``: ``{type: n}``; ``per_class``:
        ``{name: {"ap", "num_gt", "delta": {type: ΔAP}, "counts": {type: n}}}`` (NaN AP without GT).
    """
    if not 0 <= bg_iou < fg_iou < 1:
        raise ValueError(f"need 0 <= bg_iou < fg_iou < 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
    matching = detections if isinstance(detections, Matching) else match_detections(gt, detections, device=device)
    dev = torch.device("cpu")
    c = _classify(matching, fg_iou, bg_iou)
    names = matching.class_names
    n_cat = len(names)
    n_pos = np.bincount(c["g_cat"][~c["g_ig"]], minlength=n_cat)
    scored = c["status"] != 2
    base_args = (c["score"][scored], c["status"][scored] == 1, c["img"][scored], c["rank"][scored])
    base = _ap_per_class(*base_args, c["cat"][scored], n_pos, dev)
    has_gt = n_pos > 0
    per_type = {}
    for e, name in enumerate(ERROR_TYPES):
        cat = c["cat"].copy()
        tp = c["status"] == 1
        keep = scored.copy()
        npos = n_pos.copy()
        if name == "missed":
            npos -= np.bincount(c["g_cat"][c["missed"]], minlength=n_cat)
        else:
            hit = c["error"] == e
            if e in (_CLS, _LOC):
                fix = hit & c["fixable"]
                tp = tp | fix
                if e == _CLS:
                    cat[fix] = c["g_cat"][c["target"][fix]]
                keep &= ~(hit & ~fix)
            else:
                keep &= ~hit
        ap = _ap_per_class(c["score"][keep], tp[keep], c["img"][keep], c["rank"][keep], cat[keep], npos, dev)
        ap = np.where(has_gt & (npos == 0), 0.0, ap)
        per_type[name] = ap - base
    counts = {name: np.bincount(c["cat"][c["error"] == e], minlength=n_cat) for e, name in enumerate(ERROR_TYPES[:5])}
    counts["missed"] = np.bincount(c["g_cat"][c["missed"]], minlength=n_cat)
    return {
        "fg_iou": fg_iou,
        "bg_iou": bg_iou,
        "map": float(base[has_gt].mean()) if has_gt.any() else float("nan"),
        "delta_map": {t: float(per_type[t][has_gt].mean()) if has_gt.any() else float("nan") for t in ERROR_TYPES},
        "counts": {t: int(counts[t].sum()) for t in ERROR_TYPES},
        "per_class": {n: {"ap": float(base[k]), "num_gt": int(n_pos[k]),
                          "delta": {t: float(per_type[t][k]) for t in ERROR_TYPES},
                          "counts": {t: int(counts[t][k]) for t in ERROR_TYPES}} for k, n in enumerate(names)},
    }


def colocation_table(gt: str | os.PathLike | Mapping[str, Any] | _GroundTruth, *, iou: float = 0.5) -> dict[str, Any]:
    """Pairs of non-crowd GT boxes in one image that overlap with IoU ≥ ``iou``, counted per class pair.

    The lumbar set labels e.g. SS and LDB on the same disc level; such pairs make a
    detection of one class sit on a GT of the other, which TIDE calls a classification error.

    Returns:
        ``iou``, ``class_names``; ``matrix`` (K×K, symmetric; diagonal: pairs of one class) and
        ``identical`` (pairs with exactly the same box), both as lists; ``pairs``:
        ``[{"classes": [a, b], "count", "identical"}]`` for a ≤ b with a count, most first.
    """
    g = gt if isinstance(gt, _GroundTruth) else _GroundTruth(*_load_gt(gt))
    k = len(g.cat_ids)
    matrix = np.zeros((k, k), np.int64)
    same = np.zeros((k, k), np.int64)
    reg = ~g.crowd
    img, box = g.image_id[reg], g.bbox[reg]
    cls = np.searchsorted(g.cat_ids, g.category_id[reg])
    srt = np.argsort(img, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(img[srt]))[0] + 1, len(srt)] if len(srt) else np.zeros(1, np.int64)
    for a, b in itertools.pairwise(bounds):
        rows = srt[a:b]
        if len(rows) < 2:
            continue
        ious = _iou(box[rows], box[rows], np.zeros(len(rows), bool))
        i, j = np.nonzero(np.triu(ious >= iou, 1))
        ci, cj = np.minimum(cls[rows[i]], cls[rows[j]]), np.maximum(cls[rows[i]], cls[rows[j]])
        np.add.at(matrix, (ci, cj), 1)
        ident = (box[rows[i]] == box[rows[j]]).all(1)
        np.add.at(same, (ci[ident], cj[ident]), 1)
    names = list(g.cat_names)
    pairs = [{"classes": [names[a], names[b]], "count": int(matrix[a, b]), "identical": int(same[a, b])}
             for a in range(k) for b in range(a, k) if matrix[a, b]]
    pairs.sort(key=lambda p: -p["count"])
    sym = matrix + np.triu(matrix, 1).T
    sym_same = same + np.triu(same, 1).T
    return {"iou": iou, "class_names": names, "matrix": sym.tolist(), "identical": sym_same.tolist(), "pairs": pairs}
