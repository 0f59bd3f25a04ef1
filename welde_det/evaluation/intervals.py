"""Bootstrap intervals over images for mAP, mAP50, mAP_tail and per-class AP, reusing one matching.

A bootstrap resample draws ``n`` images with replacement; image ``i`` appears ``w_i``
times (``w ~ Multinomial(n, 1/n)``). Its metrics are *exactly* pycocotools' on the
dataset in which image ``i`` is copied ``w_i`` times under new ids that keep the copies
of one image next to each other in id order (tested). Nothing is re-matched: a copy of
an image has the same true/false-positive flags as the original, so per class only the
accumulation changes:

    TP_j = Σ_{e ≤ j} v_e·tp_e,   FP_j = Σ_{e ≤ j} v_e·fp_e,   npig = Σ_i w_i·n_i
    recall_j = TP_j / npig,      precision_j = TP_j / (FP_j + TP_j + eps)
    AP = mean over IoU thresholds and the 101 recall points of the right-envelope of
         precision sampled at the first j with recall_j ≥ r (0 past the last recall)

over the class's detections in pycocotools' order (score, stable over image then rank),
with ``v_e = w_{image(e)}``: a run of ``w`` identical true (false) positives only raises
(lowers) precision along the run, so one step of weight ``w`` samples the same envelope.
Where one image has several detections of a class with *equal* scores, the copies
interleave (a1 b1 a2 b2 …) and that block is laid out copy by copy instead; entries of
absent copies carry weight 0, which repeats the previous point and changes nothing.

Each resample costs one weighted cumulative sum per class; 1,000 resamples are batched
as tensors (``B × T × S``). The paired bootstrap applies the *same* resampled images to
two detection sets, so identical sets give a difference of exactly 0.

Intervals are percentile intervals (``np.nanquantile``, linear) of the resampled values;
a class without ground truth in a resample has no AP there (its share is reported as
``undefined``) and leaves the mean, as in pycocotools.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse

from welde_det.classes import ClassStats
from welde_det.evaluation.coco_eval import REC_THRS, _resolve_device
from welde_det.evaluation.per_image import Matching, match_detections

__all__ = ["bootstrap_difference", "bootstrap_metrics", "resample_weights"]

_EPS = np.spacing(1)
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class _ClassSequence:
    """One class's detections in pycocotools' accumulation order, laid out for weighting.

    Shape:
        img (S,) image index; copy (S,) −1 for an entry weighted by its image's
        multiplicity, else the copy number it stands for (weight 1 if present);
        tp, fp (S, T) flags at area "all", maxDets 100.
    """

    img: np.ndarray
    copy: np.ndarray
    tp: np.ndarray
    fp: np.ndarray


def _sequences(matching: Matching, max_copies: int) -> list[_ClassSequence]:
    m = matching.matched
    n_cat = matching.gt_per_image.shape[1]
    base = np.lexsort([m["rank"], m["img"], m["cat"]])
    out = []
    for k in range(n_cat):
        idx = base[m["cat"][base] == k]
        idx = idx[np.argsort(-m["score"][idx], kind="mergesort")]
        img, score = m["img"][idx], m["score"][idx]
        if len(idx) == 0:
            out.append(_ClassSequence(img, img.copy(), np.zeros((0, m["tp"].shape[1]), bool),
                                      np.zeros((0, m["tp"].shape[1]), bool)))
            continue
        new_unit = np.r_[True, (img[1:] != img[:-1]) | (score[1:] != score[:-1])]
        starts = np.nonzero(new_unit)[0]
        size = np.diff(np.r_[starts, len(idx)])
        n_entries = np.where(size == 1, 1, size * max_copies)
        unit = np.repeat(np.arange(len(starts)), n_entries)
        offset = np.arange(int(n_entries.sum())) - np.repeat(np.cumsum(n_entries) - n_entries, n_entries)
        det = idx[starts[unit] + offset % size[unit]]
        copy = np.where(size[unit] == 1, -1, offset // size[unit])
        out.append(_ClassSequence(m["img"][det], copy, m["tp"][det, :, 0], m["fp"][det, :, 0]))
    return out


def _unit_weights(seq: _ClassSequence, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs of consecutive entries with the same flags at every threshold into one weighted entry.

    Such a run is all true positives (precision rises along it, so its end carries the
    envelope for every recall point inside it), all false positives (precision falls and
    recall stays, so no recall point lands inside it) or all ignored: one entry with the
    run's total weight samples the same curve. For a good detector most of a class's
    detections fall into a few long runs.

    Returns:
        tp, fp (U, T) of the runs and their weights (B, U) under image weights (B, n_img).
    """
    flags = np.concatenate([seq.tp, seq.fp], axis=1)
    new = np.r_[True, (flags[1:] != flags[:-1]).any(1)]
    unit = np.cumsum(new) - 1
    n_units = int(unit[-1]) + 1
    single = seq.copy < 0
    # weight of a run: Σ w_img over its single entries + Σ [copy < w_img] over its copy entries
    counts = sparse.csr_matrix((np.ones(int(single.sum())), (unit[single], seq.img[single])),
                               shape=(n_units, weights.shape[1]))
    v = np.asarray((counts @ weights.T.astype(np.float64)).T)
    if not single.all():
        cp = np.nonzero(~single)[0]
        present = (seq.copy[cp][None, :] < weights[:, seq.img[cp]]).astype(np.float64)
        np.add.at(v.T, unit[cp], present.T)
    first = np.nonzero(new)[0]
    return seq.tp[first], seq.fp[first], v


def _class_ap(seq: _ClassSequence, weights: np.ndarray, npig: np.ndarray, device: torch.device,
              return_precision: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """AP (B,) and AP at the first IoU threshold (B,) of one class under image weights (B, n_img).

    NaN where the resample has no positive of this class. ``return_precision`` adds the
    interpolated precision (B, T, R), pycocotools' ``precision[:, :, k, 0, -1]``.
    """
    n_b, n_t, n_r = weights.shape[0], seq.tp.shape[1], len(REC_THRS)
    ap = np.full(n_b, np.nan)
    ap50 = np.full(n_b, np.nan)
    prec = np.full((n_b, n_t, n_r), -1.0) if return_precision else None
    has_gt = npig > 0
    if len(seq.img) == 0:
        ap[has_gt], ap50[has_gt] = 0.0, 0.0
        if prec is not None:
            prec[has_gt] = 0.0
        return ap, ap50, prec
    rows = np.nonzero(has_gt)[0]
    rec_thrs = torch.as_tensor(REC_THRS, dtype=torch.float64, device=device)
    # the run layout depends only on the flags; its weights are computed per chunk of resamples
    tp_u, fp_u, _ = _unit_weights(seq, weights[:1])
    s = len(tp_u)
    tp = torch.as_tensor(tp_u.T, dtype=torch.float64, device=device)  # (T, U)
    fp = torch.as_tensor(fp_u.T, dtype=torch.float64, device=device)
    step = max(1, _CHUNK_ELEMENTS // (n_t * s))
    for c0 in range(0, len(rows), step):
        b = rows[c0:c0 + step]
        v = _unit_weights(seq, weights[b])[2]
        v_t = torch.as_tensor(v, dtype=torch.float64, device=device)[:, None, :]  # (b, 1, U)
        tp_sum = torch.cumsum(v_t * tp, -1)  # (b, T, U)
        fp_sum = torch.cumsum(v_t * fp, -1)
        npig_t = torch.as_tensor(npig[b], dtype=torch.float64, device=device)[:, None, None]
        rc = tp_sum / npig_t
        pr = tp_sum / (fp_sum + tp_sum + _EPS)
        pr = torch.flip(torch.cummax(torch.flip(pr, [-1]), -1).values, [-1])
        inds = torch.searchsorted(rc.reshape(-1, s).contiguous(), rec_thrs.expand(len(b) * n_t, n_r).contiguous(),
                                  side="left")
        valid = inds < s
        q = torch.where(valid, torch.gather(pr.reshape(-1, s), 1, inds.clamp(max=s - 1)),
                        torch.zeros((), dtype=torch.float64, device=device)).reshape(len(b), n_t, n_r)
        q_np = q.cpu().numpy()
        ap[b] = q_np.mean(axis=(1, 2))
        ap50[b] = q_np[:, 0].mean(axis=1)
        if prec is not None:
            prec[b] = q_np
    return ap, ap50, prec


def resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """Multiplicities (n_resamples, n_images) of the images in each bootstrap resample (seeded)."""
    if n_images < 1:
        raise ValueError("the bootstrap needs at least one image")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples).astype(np.int64)


def _weighted_metrics(matching: Matching, weights: np.ndarray, tail: Sequence[int], device: torch.device,
                      return_precision: bool = False) -> dict[str, np.ndarray]:
    """Per-class AP / AP50 (B, K), mAP, mAP50, mAP_tail, mAP50_tail (B,) under image weights (B, n_img)."""
    seqs = _sequences(matching, max(1, int(weights.max())))
    npig = weights @ matching.gt_per_image  # (B, K)
    k = len(seqs)
    ap = np.full((weights.shape[0], k), np.nan)
    ap50 = np.full_like(ap, np.nan)
    prec = []
    for c, seq in enumerate(seqs):
        ap[:, c], ap50[:, c], p = _class_ap(seq, weights, npig[:, c], device, return_precision)
        prec.append(p)

    def mean(x: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(x)
        n = ok.sum(1)
        return np.where(n > 0, np.where(ok, x, 0.0).sum(1) / np.maximum(n, 1), np.nan)

    tail = list(tail)
    out = {"per_class_ap": ap, "per_class_ap50": ap50, "map": mean(ap), "map50": mean(ap50),
           "map_tail": mean(ap[:, tail]) if tail else np.full(len(ap), np.nan),
           "map50_tail": mean(ap50[:, tail]) if tail else np.full(len(ap), np.nan)}
    if return_precision:
        out["precision"] = np.stack(prec, axis=2)  # (B, T, K, R)
    return out


def _tail_indices(matching: Matching, class_stats: ClassStats | None, tail: Sequence[str] | None) -> list[int]:
    names = matching.class_names
    if tail is not None:
        unknown = [t for t in tail if t not in names]
        if unknown:
            raise ValueError(f"tail classes {unknown} are not among the ground truth's classes {names}")
        return [names.index(t) for t in tail]
    if class_stats is None:
        counts = matching.gt_per_image.sum(0).tolist()
        class_stats = ClassStats(names, counts, category_ids=matching.gt.cat_ids.tolist(), floor=1)
    pos = {int(c): i for i, c in enumerate(matching.gt.cat_ids.tolist())}
    missing = [class_stats.category_ids[i] for i in class_stats.tail if class_stats.category_ids[i] not in pos]
    if missing:
        raise ValueError(f"ClassStats tail categories {missing} are not in the ground truth categories "
                         f"{matching.gt.cat_ids.tolist()}")
    return [pos[class_stats.category_ids[i]] for i in class_stats.tail]


def _interval(point: float, samples: np.ndarray, confidence: float) -> dict[str, Any]:
    ok = ~np.isnan(samples)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    lo, hi = (np.quantile(samples[ok], [lo_q, hi_q]).tolist() if ok.any() else (float("nan"), float("nan")))
    return {"value": float(point), "low": float(lo), "high": float(hi),
            "undefined": float(1 - ok.mean()) if len(samples) else 0.0}


def _check_args(n_resamples: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")


def _as_matching(gt: Any, detections: Any, device: torch.device) -> Matching:
    return detections if isinstance(detections, Matching) else match_detections(gt, detections, device=device)


def bootstrap_metrics(
    gt: str | os.PathLike | Mapping[str, Any] | None,
    detections: Any,
    *,
    class_stats: ClassStats | None = None,
    tail: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap intervals over images for mAP, mAP50, mAP_tail and per-class AP.

    Args:
        gt: COCO ground truth (dict or path); unused when ``detections`` is a ``Matching``.
        detections: COCO results (any form ``evaluate_coco`` takes) or a ``Matching``.
        class_stats: training-split ClassStats defining the tail (default: derived from ``gt``,
            as ``evaluate_coco`` does); ``tail`` (class names) overrides it.
        n_resamples: bootstrap resamples (≥ 1,000 recommended).
        seed: seed of the resampling.
        confidence: interval coverage (0.95).
        device: tensor device (default CUDA when available).

    Returns:
        ``map``, ``map50``, ``map_tail``, ``map50_tail``: ``{"value", "low", "high", "undefined"}``
        (value on the full set, equal to ``evaluate_coco``'s); ``per_class``: ``{name: {...}}``
        for AP and ``per_class_ap50`` likewise; ``tail_classes``, ``n_resamples``, ``seed``,
        ``confidence``, ``method``; ``samples``: the resampled values (arrays, not for JSON).
    """
    _check_args(n_resamples, confidence)
    dev = _resolve_device(device)
    matching = _as_matching(gt, detections, dev)
    tail_idx = _tail_indices(matching, class_stats, tail)
    full = _weighted_metrics(matching, np.ones((1, matching.num_images), np.int64), tail_idx, dev)
    weights = resample_weights(matching.num_images, n_resamples, seed)
    boot = _weighted_metrics(matching, weights, tail_idx, dev)
    return _summarise(full, boot, matching.class_names, tail_idx, n_resamples, seed, confidence)


def _summarise(full: dict[str, np.ndarray], boot: dict[str, np.ndarray], names: list[str], tail_idx: list[int],
               n_resamples: int, seed: int, confidence: float, method: str = "percentile bootstrap over images"
               ) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: _interval(full[key][0], boot[key], confidence) for key in ("map", "map50", "map_tail", "map50_tail")
    }
    out["per_class"] = {n: _interval(full["per_class_ap"][0, k], boot["per_class_ap"][:, k], confidence)
                        for k, n in enumerate(names)}
    out["per_class_ap50"] = {n: _interval(full["per_class_ap50"][0, k], boot["per_class_ap50"][:, k], confidence)
                             for k, n in enumerate(names)}
    out.update({"tail_classes": [names[k] for k in tail_idx], "n_resamples": n_resamples, "seed": seed,
                "confidence": confidence, "method": method,
                "samples": {key: boot[key] for key in ("map", "map50", "map_tail", "map50_tail", "per_class_ap")}})
    return out


def bootstrap_difference(
    gt: str | os.PathLike | Mapping[str, Any],
    detections_a: Any,
    detections_b: Any,
    *,
    class_stats: ClassStats | None = None,
    tail: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Paired bootstrap of ``A − B`` (mAP, mAP50, mAP_tail, per-class AP) on the same ground truth.

    Both sets are matched once; every resample weights the *same* images for A and B, so
    the interval reflects the difference's own variability (identical sets: exactly 0,
    interval [0, 0]). A resample where a metric is undefined for either set is left out
    of that metric's interval (its share is ``undefined``).

    Returns:
        As :func:`bootstrap_metrics`, the values being ``A − B``; plus ``a`` and ``b`` with
        each set's own full-set values (``map``, ``map50``, ``map_tail``, ``map50_tail``).
    """
    _check_args(n_resamples, confidence)
    dev = _resolve_device(device)
    ma, mb = _as_matching(gt, detections_a, dev), _as_matching(gt, detections_b, dev)
    if ma.class_names != mb.class_names or not np.array_equal(ma.gt_per_image, mb.gt_per_image):
        raise ValueError("bootstrap_difference needs both detection sets matched against the same ground truth")
    tail_idx = _tail_indices(ma, class_stats, tail)
    ones = np.ones((1, ma.num_images), np.int64)
    weights = resample_weights(ma.num_images, n_resamples, seed)
    fa, fb = (_weighted_metrics(m, ones, tail_idx, dev) for m in (ma, mb))
    ba, bb = (_weighted_metrics(m, weights, tail_idx, dev) for m in (ma, mb))
    keys = ("map", "map50", "map_tail", "map50_tail", "per_class_ap", "per_class_ap50")
    out = _summarise({k: fa[k] - fb[k] for k in keys}, {k: ba[k] - bb[k] for k in keys}, ma.class_names, tail_idx,
                     n_resamples, seed, confidence, method="paired percentile bootstrap over images")
    out["a"] = {k: float(fa[k][0]) for k in keys[:4]}
    out["b"] = {k: float(fb[k][0]) for k in keys[:4]}
    return out
