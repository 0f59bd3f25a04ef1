"""A vectorised PyTorch COCO bbox evaluator that reproduces pycocotools 2.0.x exactly.

Same inputs, same numbers: all 12 summary stats, the precision (T×R×K×A×M), recall
(T×K×A×M) and scores arrays, including pycocotools' quirks:

- ignore flags come only from ``iscrowd`` (and the area range); a crowd GT can absorb
  several detections and its IoU is intersection / detection area;
- detections are sorted by score with a stable sort, and cut to ``maxDets[-1]`` per
  image *and category* before matching; smaller ``maxDets`` truncate that matching;
- area bounds are inclusive and matching is re-run per area range, with GT area from
  the annotation's ``area`` field and detection area from its box (``w*h``);
- the greedy matcher prefers non-ignored GTs, takes the highest IoU ≥ t (the last such
  GT on ties), and matches a detection to an ignored GT only when no regular one fits;
- thresholds are ``np.linspace`` grids, precision is made monotone from the right and
  sampled with ``searchsorted(side="left")``; categories without GT stay −1.

Arrays (as in ``cocoeval.py``): ``precision`` [T×R×K×A×M], ``recall`` [T×K×A×M],
``scores`` [T×R×K×A×M], with T IoU thresholds, R recall thresholds, K categories, A area
ranges (all, small, medium, large) and M max-detection settings (1, 10, 100).

How it is fast (one CPU thread, ``bench/bench_eval.py --repeats 3 --only spine``, 448k
spine-like detections, pycocotools 29-32 s on the shared 2-core VM, three runs): 21.1-23.8x
with the full result (confusion matrix and Ultralytics flavour), 23-26x from an (N, 7)
array, 33-34x with ``extras=False``, in 206 MB against pycocotools' 566 MB; COCO-sized (500k
detections, 80 classes): 43x. Where the time goes (user CPU of a fresh process, 1.13 s in
all): converting the results list 0.20 s, COCO matching 0.27 s (of which the greedy steps
over all images, classes, thresholds and areas most), the shared candidate-pair search
0.07 s, accumulate 0.14 s, Ultralytics flavour 0.17 s, confusion matrix 0.13 s, score order
0.07 s, ground truth 0.04 s; system time (first touches of ~60k pages) 0.1-0.2 s.
There is no Python loop over images or classes:

- detections are converted in one C-level pass (``itemgetter`` + ``np.fromiter``), or taken
  as arrays; one float sort gives a dense score rank, every later ordering is a radix sort;
- matching works on candidate edges only: the (detection, GT) pairs of an (image, category)
  pair whose IoU (float64, pycocotools' bbIou operation for operation) is ≥ 0.5, generated
  and measured chunk by chunk (on CPU the IoU is finished only for pairs that overlap in x);
  the greedy matcher
  (:func:`~welde_det.evaluation.flavours.greedy_assign`) then takes one tensor step per
  candidate rank (the k-th candidate detection of every pair at step k) over all pairs,
  thresholds and area ranges at once, on ``device`` (CUDA when available);
- accumulation finds the recall thresholds on integer TP counts and evaluates precision
  only where a TP count is first reached (precision falls between TPs), so the float work
  is per TP instead of per detection × threshold × area.

The same result also carries the Ultralytics flavour of the figures
(:mod:`welde_det.evaluation.flavours`) and a confusion matrix, from the same arrays.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np
import torch

import welde_det.evaluation.flavours as _flavours
from welde_det.classes import ClassStats
from welde_det.evaluation.flavours import (
    candidate_edges,
    greedy_assign,
    group_score_order,
    run_rank,
    run_rank_of,
    score_order,
    stable_argsort,
    stable_lexsort,
    subset_order,
    ultralytics_map,
)
from welde_det.utils.fileio import load_json

__all__ = ["CocoEvaluator", "DetectionArrays", "evaluate_coco", "summary_lines"]

logger = logging.getLogger(__name__)

IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RNG = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LBL = ("all", "small", "medium", "large")
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
_PAIR_CHUNK = 16384


@dataclass
class DetectionArrays:
    """Detections as flat arrays (the fast path; lists of COCO dicts are converted to this).

    Shape:
        image_id (N,), category_id (N,), bbox (N, 4) as [x, y, w, h], score (N,).
    """

    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray

    @classmethod
    def from_any(cls, detections: Any) -> DetectionArrays:
        """From a COCO results list/path, a dict of arrays/tensors, an (N, 7) array/tensor
        (:meth:`from_array`), or a DetectionArrays."""
        if isinstance(detections, DetectionArrays):
            return detections
        if isinstance(detections, (np.ndarray, torch.Tensor)):
            return cls.from_array(detections)
        if isinstance(detections, (str, os.PathLike)):
            detections = load_json(detections)
        if isinstance(detections, Mapping):
            def arr(key, dtype):
                v = detections[key]
                if isinstance(v, torch.Tensor):
                    v = v.detach().cpu().numpy()
                return np.asarray(v, dtype=dtype)

            try:
                return cls(arr("image_id", np.int64), arr("category_id", np.int64),
                           arr("bbox", np.float64).reshape(-1, 4), arr("score", np.float64))
            except KeyError as exc:
                raise ValueError(f"detections dict is missing {exc.args[0]!r}; need image_id, category_id, bbox, score") from None
        if not isinstance(detections, Sequence):
            raise ValueError(f"detections must be a results list, a path or a dict of arrays, got {type(detections).__name__}")
        n = len(detections)
        if n == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
        if not isinstance(detections[0], Mapping):
            return cls.from_array(detections)
        # one C-level pass per field group (itemgetter + chain), no per-detection Python code
        try:
            head = np.fromiter(chain.from_iterable(map(itemgetter("image_id", "category_id", "score"), detections)),
                               np.float64, 3 * n).reshape(n, 3)
            boxes = list(map(itemgetter("bbox"), detections))
            lengths = set(map(len, boxes))
        except KeyError as exc:
            raise ValueError(f"a detection lacks {exc.args[0]!r}; COCO results need image_id, category_id, bbox, score") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed detection ({exc}); COCO results are dicts with numeric image_id, "
                             "category_id, score and a bbox [x, y, w, h]") from None
        if lengths != {4}:
            bad = next(i for i, b in enumerate(boxes) if len(b) != 4)
            raise ValueError(f"malformed detection bbox {boxes[bad]!r} (detection {bad}); bbox must be [x, y, w, h]")
        try:
            box = np.fromiter(chain.from_iterable(boxes), np.float64, 4 * n).reshape(n, 4)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed detection bbox ({exc}); bbox must be 4 numbers [x, y, w, h]") from None
        return cls(_int_ids(head[:, 0], "image_id"), _int_ids(head[:, 1], "category_id"), box, head[:, 2].copy())

    @classmethod
    def from_array(cls, array: Any) -> DetectionArrays:
        """From an (N, 7) array or tensor of rows [image_id, x, y, w, h, score, category_id].

        Example:
            >>> DetectionArrays.from_array([[1, 0.0, 0.0, 10.0, 10.0, 0.9, 3]]).category_id
            array([3])
        """
        if isinstance(array, torch.Tensor):
            array = array.detach().to("cpu", torch.float64).numpy()
        try:
            a = np.asarray(array, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"detections as an array must be numeric (N, 7) rows ({exc})") from None
        if a.ndim != 2 or a.shape[1] != 7:
            raise ValueError(f"detections as an array must have shape (N, 7) [image_id, x, y, w, h, score, "
                             f"category_id], got {a.shape}")
        return cls(_int_ids(a[:, 0], "image_id"), _int_ids(a[:, 6], "category_id"),
                   np.ascontiguousarray(a[:, 1:5]), a[:, 5].copy())

    def concat(self, other: DetectionArrays) -> DetectionArrays:
        """Both sets, this one first (result order matters for ties, as in pycocotools)."""
        return DetectionArrays(np.concatenate([self.image_id, other.image_id]),
                               np.concatenate([self.category_id, other.category_id]),
                               np.concatenate([self.bbox, other.bbox]), np.concatenate([self.score, other.score]))


def _int_ids(values: np.ndarray, name: str) -> np.ndarray:
    """Float-carried ids back to int64, refusing non-integer values."""
    ids = values.astype(np.int64)
    if not np.array_equal(ids, values):
        bad = int(np.nonzero(ids != values)[0][0])
        raise ValueError(f"detection {bad} has {name} {values[bad]!r}; ids must be integers")
    return ids


def _load_gt(gt: Any) -> tuple[dict, str]:
    if isinstance(gt, (str, os.PathLike)):
        return load_json(gt), str(gt)
    if isinstance(gt, Mapping):
        return dict(gt), "<ground-truth dict>"
    raise ValueError(f"ground truth must be a COCO dict or a path, got {type(gt).__name__}")


class _GroundTruth:
    """GT arrays in pycocotools' order: images and categories sorted by id, annotations in file order."""

    def __init__(self, gt: Mapping[str, Any], source: str) -> None:
        for key in ("images", "annotations", "categories"):
            if key not in gt:
                raise ValueError(f"{source}: COCO ground truth has no {key!r} list")
        self.img_ids = np.array(sorted({int(i["id"]) for i in gt["images"]}), dtype=np.int64)
        cats = sorted(gt["categories"], key=lambda c: int(c["id"]))
        self.cat_ids = np.array([int(c["id"]) for c in cats], dtype=np.int64)
        self.cat_names = [str(c.get("name", c["id"])) for c in cats]
        anns = gt["annotations"]
        n = len(anns)
        # one C-level pass per field (itemgetter + np.fromiter), as for the detections
        try:
            ids = list(map(_get_id, anns))
            head = np.fromiter(chain.from_iterable(map(itemgetter("image_id", "category_id"), anns)), np.float64, 2 * n
                               ).reshape(n, 2)
        except KeyError as exc:
            raise ValueError(f"{source}: an annotation lacks {exc.args[0]!r}") from None
        if len(set(ids)) != n:
            seen: set = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"{source}: duplicate annotation id {dup}; pycocotools would silently keep only one")
        img_all, cat_all = head[:, 0].astype(np.int64), head[:, 1].astype(np.int64)
        # pycocotools' getAnnIds drops annotations of unknown images or categories too
        known = np.isin(img_all, self.img_ids) & np.isin(cat_all, self.cat_ids)
        kept = [anns[i] for i in np.flatnonzero(known)] if not known.all() else anns
        no_area = next((a for a in kept if "area" not in a), None)
        if no_area is not None:
            raise ValueError(
                f"{source}: annotation {no_area.get('id')} has no 'area' (pycocotools needs it for the area ranges); "
                "set it, e.g. area = w*h of the bbox, or the segmentation area"
            )
        no_box = next((a for a in kept if "bbox" not in a), None)
        if no_box is not None:
            raise ValueError(f"{source}: annotation {no_box.get('id')} has no 'bbox'")
        m = len(kept)
        self.image_id = img_all[known]
        self.category_id = cat_all[known]
        boxes = list(map(itemgetter("bbox"), kept))
        if set(map(len, boxes)) - {4}:
            bad = next(i for i, b in enumerate(boxes) if len(b) != 4)
            raise ValueError(f"{source}: annotation {kept[bad].get('id')} has bbox {boxes[bad]!r}; need [x, y, w, h]")
        self.bbox = np.fromiter(chain.from_iterable(boxes), np.float64, 4 * m).reshape(m, 4)
        self.area = np.fromiter(map(itemgetter("area"), kept), np.float64, m)
        self.crowd = np.fromiter(map(_get_crowd, kept), bool, m)
        self.ann_id = np.array([0 if i is None else i for i in ids], dtype=np.int64)[known] if n else np.zeros(0, np.int64)
        if len(self.bbox) and not np.isfinite(self.bbox).all():
            raise ValueError(f"{source}: a ground-truth bbox is not finite")


_get_id = methodcaller("get", "id")
_get_crowd = methodcaller("get", "iscrowd", 0)


def _check_dets(d: DetectionArrays, gt: _GroundTruth) -> tuple[DetectionArrays, int]:
    if len(d.score) == 0:
        return d, 0
    if not np.isfinite(d.bbox).all() or not np.isfinite(d.score).all():
        bad = int(np.nonzero(~(np.isfinite(d.bbox).all(1) & np.isfinite(d.score)))[0][0])
        raise ValueError(f"detection {bad} has a NaN or infinite bbox/score: {d.bbox[bad].tolist()}, {d.score[bad]}")
    if (d.bbox[:, 2:] < 0).any():
        bad = int(np.nonzero((d.bbox[:, 2:] < 0).any(1))[0][0])
        raise ValueError(f"detection {bad} has a negative width or height: bbox {d.bbox[bad].tolist()} (need [x, y, w, h])")
    unknown = ~np.isin(d.image_id, gt.img_ids)
    if unknown.any():
        ids = np.unique(d.image_id[unknown])[:10].tolist()
        raise ValueError(f"detections for image ids {ids} that are not in the ground truth "
                         "(pycocotools: 'Results do not correspond to current coco set')")
    known_cat = np.isin(d.category_id, gt.cat_ids)
    dropped = int((~known_cat).sum())
    if dropped:
        cats = np.unique(d.category_id[~known_cat])[:10].tolist()
        logger.warning("%d detections have category ids %s not in the ground truth; ignored, as pycocotools does",
                       dropped, cats)
        d = DetectionArrays(d.image_id[known_cat], d.category_id[known_cat], d.bbox[known_cat], d.score[known_cat])
    return d, dropped


def _bbox_iou(d: torch.Tensor, g: torch.Tensor, crowd: torch.Tensor) -> torch.Tensor:
    """pycocotools' bbIou, operation for operation (float64), edge by edge.

    Shape:
        d, g: (4, E) boxes as rows x, y, w, h; crowd: (E,) -> (E,).
    """
    dx, dy, dw, dh = d
    gx, gy, gw, gh = g
    w = torch.minimum(dw + dx, gw + gx) - torch.maximum(dx, gx)
    h = torch.minimum(dh + dy, gh + gy) - torch.maximum(dy, gy)
    inter = w * h
    da = dw * dh
    union = torch.where(crowd, da, (da + gw * gh) - inter)
    iou = inter / union
    return torch.where((w <= 0) | (h <= 0), torch.zeros((), dtype=iou.dtype, device=iou.device), iou)


def _edge_ious(d_box: np.ndarray, g_box: np.ndarray, crowd: np.ndarray | None, device: torch.device
               ) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
    """``(e_det, e_gt) -> IoU`` of those edges, boxes (N, 4) and (G, 4) [x, y, w, h]."""
    d_t, g_t = np.ascontiguousarray(d_box.T), np.ascontiguousarray(g_box.T)

    def iou(e_det: np.ndarray, e_gt: np.ndarray) -> torch.Tensor:
        c = (torch.zeros(len(e_det), dtype=torch.bool, device=device) if crowd is None
             else torch.as_tensor(np.take(crowd, e_gt), device=device))
        return _bbox_iou(torch.as_tensor(np.take(d_t, e_det, axis=1), device=device),
                         torch.as_tensor(np.take(g_t, e_gt, axis=1), device=device), c)

    return iou


def _box_rows(box: np.ndarray) -> np.ndarray:
    """(6, N) rows x, y, w, h, w + x, h + y of (N, 4) [x, y, w, h] boxes (bbIou's operands)."""
    r = np.empty((6, len(box)))
    r[:4] = box.T
    np.add(r[2], r[0], out=r[4])
    np.add(r[3], r[1], out=r[5])
    return r


def _edge_ious_cpu(d: np.ndarray, g_box: np.ndarray, crowd: np.ndarray | None, det_of: np.ndarray | None = None
                   ) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
    """:func:`_edge_ious` on CPU: the same float64 operations, done only for the edges whose
    boxes overlap in x (the others have IoU 0, as in bbIou).

    ``d``: the detections' :func:`_box_rows`, shared by every caller of one evaluation;
    ``det_of``: the column of ``d`` of each detection id the edges use (None: the same).
    """
    g = _box_rows(g_box)

    def iou(e_det: np.ndarray, e_gt: np.ndarray) -> torch.Tensor:
        if det_of is not None:
            e_det = det_of.take(e_det)
        w = np.minimum(d[4].take(e_det), g[4].take(e_gt))
        w -= np.maximum(d[0].take(e_det), g[0].take(e_gt))
        out = np.zeros(len(e_det))
        s = np.flatnonzero(w > 0)
        ed, eg, w = e_det[s], e_gt[s], w[s]
        h = np.minimum(d[5].take(ed), g[5].take(eg)) - np.maximum(d[1].take(ed), g[1].take(eg))
        inter = w * h
        da = d[2].take(ed) * d[3].take(ed)
        union = (da + g[2].take(eg) * g[3].take(eg)) - inter
        if crowd is not None:
            union = np.where(crowd.take(eg), da, union)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[s] = np.where(h > 0, inter / union, 0.0)
        return torch.from_numpy(out)

    return iou


def _pair_edges(gt: _GroundTruth, det: DetectionArrays, device: torch.device, d_rows: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Every (detection, GT) pair of one (image, category) whose boxes intersect, with
    pycocotools' IoU (float64, crowd rule): ``(e_det, e_gt, iou)``, detections in input order.

    A superset of both flavours' candidates: COCO keeps IoU ≥ 0.5; Ultralytics' float32 IoU
    can reach 0.5 only where the float64 boxes intersect (rounding to float32 is monotone, so
    disjoint intervals stay disjoint), and it recomputes its own IoU on these pairs.
    """
    n_cat = len(gt.cat_ids)
    d_pair = np.searchsorted(gt.img_ids, det.image_id) * n_cat + np.searchsorted(gt.cat_ids, det.category_id)
    g_pair = np.searchsorted(gt.img_ids, gt.image_id) * n_cat + np.searchsorted(gt.cat_ids, gt.category_id)
    iou_fn = (_edge_ious_cpu(_box_rows(det.bbox) if d_rows is None else d_rows, gt.bbox, gt.crowd)
              if _host_path(device) else _edge_ious(det.bbox, gt.bbox, gt.crowd, device))
    return candidate_edges(d_pair, g_pair, iou_fn, _SMALLEST_IOU, device)


_SMALLEST_IOU = float(np.nextafter(0.0, 1.0))  # candidate_edges keeps iou >= this: iou > 0


def _host_path(device: torch.device) -> bool:
    """See :func:`welde_det.evaluation.flavours._host_path` (the one switch)."""
    return _flavours._host_path(device)


def _match(gt: _GroundTruth, det: DetectionArrays, device: torch.device, *,
           by_score: tuple[np.ndarray, np.ndarray] | None = None, d_rows: np.ndarray | None = None,
           edges: tuple[np.ndarray, np.ndarray, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Greedy matching for every (image, category) pair, IoU threshold and area range.

    All pairs at once: the (detection, GT) edges of each pair with IoU ≥ 0.5 are matched by
    :func:`~welde_det.evaluation.flavours.greedy_assign`, one step per candidate rank.

    Returns:
        Per kept detection (rank < maxDets[-1] within its pair), rows ordered by (image,
        category, rank): ``img`` / ``cat`` index (N,), ``rank`` (N,), ``score`` (N,), ``tp`` /
        ``fp`` (N, T, A) bool, ``det`` (N,) row in ``det``, ``score_rank`` (N,) dense rank of
        the score (0 = highest); ``by_score``: :func:`~welde_det.evaluation.flavours.score_order` of
        ``det.score``, if known; ``d_rows``: ``_box_rows(det.bbox)``, if known; ``edges``:
        :func:`_pair_edges` of ``det``, if known (shared with the Ultralytics flavour); per category ``npig`` (K, A) non-ignored GT
        counts and ``has_pair`` (K,); ``n_img``.
    """
    n_img, n_cat = len(gt.img_ids), len(gt.cat_ids)
    T, A = len(IOU_THRS), len(AREA_RNG)
    g_img = np.searchsorted(gt.img_ids, gt.image_id)
    g_cat = np.searchsorted(gt.cat_ids, gt.category_id)
    g_pair = g_img * n_cat + g_cat
    d_pair = np.searchsorted(gt.img_ids, det.image_id) * n_cat + np.searchsorted(gt.cat_ids, det.category_id)
    # detections: stable by -score within pair (pycocotools' mergesort), rank < maxDets[-1]
    by_score = by_score or score_order(det.score)
    srank = by_score[1]
    order = group_score_order(d_pair, by_score[0])
    d_pair_s = d_pair[order]
    rank = run_rank(d_pair_s)
    keep = rank < MAX_DETS[-1]
    order, rank, d_pair_s = order[keep], rank[keep], d_pair_s[keep]
    n = len(order)
    rng = np.array(AREA_RNG)
    d_area = det.bbox[:, 2].take(order) * det.bbox[:, 3].take(order)
    d_out = (d_area[:, None] < rng[:, 0]) | (d_area[:, None] > rng[:, 1])  # (N, A)
    g_ig = gt.crowd[:, None] | (gt.area[:, None] < rng[:, 0]) | (gt.area[:, None] > rng[:, 1])  # (G, A)
    if edges is None:
        if _host_path(device):  # boxes stay in input order; edges index them through ``order``
            iou_fn = _edge_ious_cpu(_box_rows(det.bbox) if d_rows is None else d_rows, gt.bbox, gt.crowd, order)
        else:
            iou_fn = _edge_ious(np.take(det.bbox, order, axis=0), gt.bbox, gt.crowd, device)
        e_det, e_gt, iou = candidate_edges(d_pair_s, g_pair, iou_fn, 0.5, device)
    else:  # input-order pairs with IoU > 0: to kept rows, IoU >= 0.5
        row_of = np.full(len(det.score), -1, np.int64)
        row_of[order] = np.arange(n)
        e_det = row_of.take(edges[0])
        sel = (e_det >= 0) & (edges[2] >= 0.5).cpu().numpy()
        e_det, e_gt, iou = e_det[sel], edges[1][sel], edges[2][torch.as_tensor(sel, device=device)]
    if len(e_det):
        thr = torch.as_tensor(np.minimum(IOU_THRS, 1 - 1e-10), dtype=torch.float64, device=device)
        # step = rank among the pair's candidate detections; within a detection, edges in
        # ascending (IoU, GT index): the last eligible one is pycocotools' choice
        step = run_rank_of(e_det, d_pair_s)
        # (step, detection, IoU, GT): a detection's edges come contiguous with GTs ascending
        # (candidate_edges), so the stable IoU pass keeps GT order on ties without its own key
        srt = stable_lexsort([iou.cpu().numpy(), e_det, step])
        srt_t = torch.as_tensor(srt, device=device)
        step, e_det, e_gt, iou = step[srt], e_det[srt], e_gt[srt], iou[srt_t]
        # outcome code of the chosen GT per column a: bit 0 = its id is not 0 (pycocotools marks
        # matches by GT id, so id 0 looks unmatched), bit 1 = it is ignored in area range a
        payload = (gt.ann_id[e_gt] != 0)[:, None] | (g_ig[e_gt] << 1).astype(np.uint8)
        _, choice = greedy_assign(
            step, e_det, e_gt, iou[:, None] >= thr[None, :], len(gt.crowd),
            preferred=torch.as_tensor(~g_ig[e_gt], device=device),
            sticky=torch.as_tensor(gt.crowd[e_gt], device=device),
            payload=torch.as_tensor(payload.astype(np.uint8), device=device), n_rows=n,
        )
    # tp = code 1; fp = code 0 (unmatched, or matched by id 0) with the detection's area in
    # range; any other code is ignored. Rows without candidate edges have code 0.
    if len(e_det):
        code = choice.cpu().numpy().reshape(n, T, A)
        tp = code == 1
        fp = np.equal(code, 0, out=code.view(bool)) if code.dtype == np.uint8 else code == 0
    else:
        tp = np.zeros((n, T, A), bool)
        fp = np.ones((n, T, A), bool)
    fp &= ~d_out[:, None, :]
    npig = np.zeros((n_cat, A), np.int64)
    np.add.at(npig, g_cat, (~g_ig).astype(np.int64))
    has_pair = np.zeros(n_cat, bool)
    has_pair[g_cat] = True
    has_pair[d_pair_s % n_cat] = True
    return {
        "img": d_pair_s // n_cat,
        "cat": d_pair_s % n_cat,
        "rank": rank,
        "score": det.score[order],
        "tp": tp,
        "fp": fp,
        "det": order,
        "score_rank": srank[order],
        "npig": npig,
        "has_pair": has_pair,
        "n_img": n_img,
    }


def _accumulate(m: dict[str, np.ndarray], n_cat: int, device: torch.device) -> dict[str, np.ndarray]:
    """pycocotools' ``accumulate`` from :func:`_match`'s output (NumPy; ``device`` is unused here).

    Per category and maxDets: detections in pycocotools' order (by score, stable over images
    by id and rank). The recall thresholds are found on integer TP counts (``rc >= r`` ⟺
    ``tp_sum >= v*(r)``, ``v*`` the first count whose ``v / npig`` reaches ``r``, with the same
    float division), and precision is needed only where a TP count is first reached (it falls
    between TPs), so the float work is per TP, not per detection; every value is pycocotools'.
    """
    del device
    T, R, A, M = len(IOU_THRS), len(REC_THRS), len(AREA_RNG), len(MAX_DETS)
    C = T * A
    precision = -np.ones((T, R, n_cat, A, M))
    recall = -np.ones((T, n_cat, A, M))
    scores = -np.ones((T, R, n_cat, A, M))
    eps = np.spacing(1)
    cat, rank, score = m["cat"], m["rank"], m["score"]
    # pycocotools' order is (category, score, image, rank); the rows come in (image, category,
    # rank) order, so a stable sort by (category, score rank) alone gives it (one radix sort)
    srank = m["score_rank"]
    order = stable_argsort(cat.astype(np.int64) * (int(srank.max(initial=0)) + 1) + srank)
    bounds = np.searchsorted(cat[order], np.arange(n_cat + 1))
    tp_rows, fp_rows = m["tp"].reshape(len(cat), C), m["fp"].reshape(len(cat), C)
    fp_cum = np.empty(C * int(np.diff(bounds).max(initial=0)), np.int32)  # one buffer for all cumsums
    rank_s, score_s = rank[order], score[order]
    cols = np.arange(C)
    for k in range(n_cat):
        npig = m["npig"][k]
        if not m["has_pair"][k] or not (npig > 0).any():
            continue
        areas = np.nonzero(npig > 0)[0]
        # v*(r) per area: the first TP count v with v / npig >= r (same float division as rc)
        vstar = np.zeros((A, R), np.int64)
        for a in areas:
            vstar[a] = np.searchsorted(np.arange(npig[a] + 1) / npig[a], REC_THRS, side="left")
        vstar_c = np.tile(vstar, (T, 1))  # (C, R), column c = t * A + a
        k0, k1 = bounds[k], bounds[k + 1]
        rank_k = rank_s[k0:k1]
        # column-major (C, n_k) in sorted order, one category at a time (small temporaries):
        # cumulative sums run along contiguous rows
        tp_k = np.take(tp_rows, order[k0:k1], axis=0).T.copy()
        fp_k = np.take(fp_rows, order[k0:k1], axis=0).T.copy()
        for mi, max_det in enumerate(MAX_DETS):
            sel = rank_k < max_det if len(rank_k) and rank_k.max() >= max_det else slice(None)
            tpk, fpk, sk = tp_k[:, sel], fp_k[:, sel], score_s[k0:k1][sel]
            nd = len(sk)
            if nd == 0:
                recall[:, k, areas, mi] = 0
                precision[:, :, k, areas, mi] = 0
                scores[:, :, k, areas, mi] = 0
                continue
            # precision only at TP rows: between two TPs it can only fall, so the envelope at
            # the row where the TP count reaches v is the suffix max over TP counts >= v
            flat = np.flatnonzero(tpk)  # TP rows, column by column (faster than a 2-D nonzero)
            c_idx = flat // nd
            j_idx = flat - c_idx * nd
            n_tp = np.bincount(c_idx, minlength=C)  # = tp_sum[-1] per column
            v = np.arange(1, len(c_idx) + 1) - np.repeat(np.cumsum(n_tp) - n_tp, n_tp)
            cum = fp_cum[:C * nd].reshape(C, nd)  # cast, then sum in place: no hidden int32 temporary
            np.copyto(cum, fpk, casting="unsafe")
            fp_at = np.cumsum(cum, 1, out=cum)[c_idx, j_idx]
            prec = np.zeros((C, int(n_tp.max()) + 1))
            pos = np.zeros((C, prec.shape[1]), np.int64)
            t0, f0 = tpk[:, 0].astype(np.int64), fpk[:, 0].astype(np.int64)
            prec[:, 0] = t0 / ((f0 + t0) + eps)  # row 0 (recall threshold 0 samples it)
            prec[c_idx, v] = v / ((fp_at + v) + eps)
            pos[c_idx, v] = j_idx
            env = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
            valid = vstar_c <= n_tp[:, None]  # pycocotools: searchsorted index < nd
            vs = np.minimum(vstar_c, n_tp[:, None])
            q = np.where(valid, env[cols[:, None], vs], 0.0).reshape(T, A, R)
            ss = np.where(valid, sk[pos[cols[:, None], vs]], 0.0).reshape(T, A, R)
            rc_last = (n_tp / np.tile(np.maximum(npig, 1), T)).reshape(T, A)
            recall[:, k, areas, mi] = rc_last[:, areas]
            precision[:, :, k, areas, mi] = q[:, areas].transpose(0, 2, 1)
            scores[:, :, k, areas, mi] = ss[:, areas].transpose(0, 2, 1)
    return {"precision": precision, "recall": recall, "scores": scores}


def _summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    def stat(ap: bool, iou: float | None = None, area: str = "all", max_det: int = 100) -> float:
        a = AREA_LBL.index(area)
        mi = MAX_DETS.index(max_det)
        if ap:
            s = precision
            if iou is not None:
                s = s[np.where(iou == IOU_THRS)[0]]
            s = s[:, :, :, a, mi]
        else:
            s = recall
            if iou is not None:
                s = s[np.where(iou == IOU_THRS)[0]]
            s = s[:, :, a, mi]
        valid = s[s > -1]
        return -1.0 if valid.size == 0 else float(np.mean(valid))

    return np.array([
        stat(True), stat(True, 0.5), stat(True, 0.75), stat(True, area="small"), stat(True, area="medium"),
        stat(True, area="large"), stat(False, max_det=1), stat(False, max_det=10), stat(False),
        stat(False, area="small"), stat(False, area="medium"), stat(False, area="large"),
    ])


def summary_lines(stats: Sequence[float]) -> list[str]:
    """The 12 lines pycocotools' ``summarize()`` prints."""
    spec = [
        ("Average Precision", "0.50:0.95", "all", 100), ("Average Precision", "0.50", "all", 100),
        ("Average Precision", "0.75", "all", 100), ("Average Precision", "0.50:0.95", "small", 100),
        ("Average Precision", "0.50:0.95", "medium", 100), ("Average Precision", "0.50:0.95", "large", 100),
        ("Average Recall", "0.50:0.95", "all", 1), ("Average Recall", "0.50:0.95", "all", 10),
        ("Average Recall", "0.50:0.95", "all", 100), ("Average Recall", "0.50:0.95", "small", 100),
        ("Average Recall", "0.50:0.95", "medium", 100), ("Average Recall", "0.50:0.95", "large", 100),
    ]
    out = []
    for (title, iou, area, md), v in zip(spec, stats):
        short = "(AP)" if title.startswith("Average Precision") else "(AR)"
        out.append(f" {title:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={md:>3d} ] = {v:0.3f}")
    return out


def confusion_matrix(gt: _GroundTruth, det: DetectionArrays, *, iou_thr: float = 0.5, score_thr: float = 0.25,
                     device: torch.device | None = None, by_score: tuple[np.ndarray, np.ndarray] | None = None,
                     d_rows: np.ndarray | None = None) -> np.ndarray:
    """(K+1)×(K+1) confusion counts, rows = GT class (last = background), columns = predicted.

    Per image, detections with score ≥ ``score_thr`` are taken in score order and matched to
    the unmatched non-crowd GT (of any class) with the highest IoU ≥ ``iou_thr`` (the last
    such GT on ties). All images at once (:func:`~welde_det.evaluation.flavours.greedy_assign`).
    ``by_score``: :func:`~welde_det.evaluation.flavours.score_order` of ``det.score``, ``d_rows``:
    ``_box_rows(det.bbox)``, if already known.
    """
    device = device or torch.device("cpu")
    k = len(gt.cat_ids)
    cm = np.zeros((k + 1, k + 1), np.int64)
    keep = det.score >= score_thr
    reg = ~gt.crowd
    kept = np.flatnonzero(keep)
    img_kept = det.image_id.take(kept)
    # the kept detections' rows in (image, score) order; boxes are read through them
    rows = kept.take(group_score_order(img_kept, subset_order((by_score or score_order(det.score))[0], keep)))
    d_img = det.image_id.take(rows)
    d_cls = np.searchsorted(gt.cat_ids, det.category_id.take(rows))
    g_img, g_box = gt.image_id[reg], gt.bbox[reg]
    g_cls = np.searchsorted(gt.cat_ids, gt.category_id[reg])
    g_of_det = np.full(len(d_img), k, np.int64)
    taken = np.zeros(len(g_img), bool)
    if _host_path(device):
        iou_fn = _edge_ious_cpu(_box_rows(det.bbox) if d_rows is None else d_rows, g_box, None, rows)
    else:
        iou_fn = _edge_ious(np.take(det.bbox, rows, axis=0), g_box, None, device)
    e_det, e_gt, iou = candidate_edges(d_img, g_img, iou_fn, iou_thr, device)
    if len(e_det):
        new = np.r_[True, e_det[1:] != e_det[:-1]]
        step = np.repeat(run_rank(d_img[e_det[new]]), np.diff(np.r_[np.nonzero(new)[0], len(e_det)]))
        srt = stable_lexsort([iou.cpu().numpy(), e_det, step])  # GTs ascending within a detection already
        step, e_det, e_gt, iou = step[srt], e_det[srt], e_gt[srt], iou[torch.as_tensor(srt, device=device)]
        dets, choice = greedy_assign(step, e_det, e_gt, (iou >= iou_thr)[:, None], len(g_img))
        choice = choice[:, 0, 0].cpu().numpy()
        hit = choice >= 0
        g_hit = e_gt[choice[hit]]
        g_of_det[dets[hit]] = g_cls[g_hit]
        taken[g_hit] = True
    np.add.at(cm, (g_of_det, d_cls), 1)
    np.add.at(cm, (g_cls[~taken], np.full(int((~taken).sum()), k)), 1)
    return cm


_PAGES_LOCK = threading.Lock()
_PAGES_USERS = 0
_PAGES_PREVIOUS = True


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """Ask NumPy not to ``madvise(MADV_HUGEPAGE)`` its arrays while an evaluation runs.

    NumPy advises huge pages for every array of 4 MiB or more. Where transparent huge pages
    are ``madvise`` (common on VMs and clusters), a first touch of such an array may stall in
    memory compaction: measured on the 2-core CI VM, 0.35-1.3 s of system time per spine-sized
    evaluation against 0.16-0.24 s without the hint, for the same arithmetic. The arrays here
    live for one call and are read by gathers, not long scans, so small pages cost nothing
    measurable in user time. The hint is a performance hint only (no value changes); it is
    switched off only while at least one evaluation runs and restored after the last one
    (reference-counted, thread-safe). Without NumPy's private setter this does nothing.
    """
    global _PAGES_USERS, _PAGES_PREVIOUS
    setter = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(setter, "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    with _PAGES_LOCK:
        if _PAGES_USERS == 0:
            _PAGES_PREVIOUS = setter(False)
        _PAGES_USERS += 1
    try:
        yield
    finally:
        with _PAGES_LOCK:
            _PAGES_USERS -= 1
            if _PAGES_USERS == 0:
                setter(_PAGES_PREVIOUS)


def _on_small_pages(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` inside :func:`_small_pages`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _small_pages():
            return fn(*args, **kwargs)

    return wrapper


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@_on_small_pages
def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: Any,
    *,
    class_stats: ClassStats | None = None,
    device: str | torch.device | None = None,
    confusion_iou: float = 0.5,
    confusion_score: float = 0.25,
    extras: bool = True,
) -> dict[str, Any]:
    """Evaluate bbox detections exactly as pycocotools' COCOeval does, plus per-class and tail metrics.

    Args:
        gt: COCO ground-truth dict or JSON path.
        detections: COCO results list or JSON path, a dict of arrays/tensors
            (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``), or an (N, 7)
            array/tensor of rows [image_id, x, y, w, h, score, category_id].
        class_stats: training-split statistics that define the tail set (METHOD.md §1);
            None derives them from this ground truth (the result says so).
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available).
        confusion_iou, confusion_score: thresholds of the confusion matrix.
        extras: also compute ``confusion`` and ``ultralytics`` (about a third of the time);
            False leaves them ``None`` (e.g. per-epoch validation that needs only mAP).

    Returns:
        ``stats`` (12 numbers, pycocotools' order), ``stat_names``, ``precision``
        [T×R×K×A×M], ``recall`` [T×K×A×M], ``scores``, ``class_names``, ``category_ids``,
        ``per_class_ap`` / ``per_class_ap50`` / ``per_class_ar100`` (−1 where a class has no
        GT), ``num_gt``, ``map_tail``, ``map50_tail``, ``tail_classes``, ``tail_rule``,
        ``tail_excluded`` (tail classes without GT here), ``confusion``, ``pr_curves``
        (precision at IoU 0.5 per class over ``rec_thrs``), ``dropped_detections``;
        ``map`` / ``map50`` (= ``stats[0]`` / ``stats[1]``), ``per_class`` ({name: {"ap",
        "ap50", "ar100", "num_gt"}}); ``ultralytics``: the same boxes scored as Ultralytics'
        ``DetectionValidator`` does (:func:`~welde_det.evaluation.flavours.ultralytics_map`):
        ``{"map", "map50", "per_class": {name: AP50-95}, "per_class_ap50": {name: AP50}}``
        over classes with (non-crowd) GT, as Ultralytics averages.

    Raises:
        ValueError: detections for images not in the GT, NaN/negative-size boxes, a GT
            annotation without ``area`` — with the offending value named.
    """
    data, source = _load_gt(gt)
    g = _GroundTruth(data, source)
    dets, dropped = _check_dets(DetectionArrays.from_any(detections), g)
    dev = _resolve_device(device)
    by_score = score_order(dets.score)
    d_rows = _box_rows(dets.bbox) if _host_path(dev) else None  # shared by the matchers
    edges = _pair_edges(g, dets, dev, d_rows) if extras else None  # shared by both flavours
    matched = _match(g, dets, dev, by_score=by_score, d_rows=d_rows, edges=edges)
    acc = _accumulate(matched, len(g.cat_ids), dev)
    stats = _summarize(acc["precision"], acc["recall"])
    p_all = acc["precision"][:, :, :, 0, -1]  # T×R×K at area all, maxDets 100
    per_ap, per_ap50, per_ar = [], [], []
    for k in range(len(g.cat_ids)):
        v = p_all[:, :, k]
        per_ap.append(float(v[v > -1].mean()) if (v > -1).any() else -1.0)
        v50 = p_all[0, :, k]
        per_ap50.append(float(v50[v50 > -1].mean()) if (v50 > -1).any() else -1.0)
        r = acc["recall"][:, k, 0, -1]
        per_ar.append(float(r[r > -1].mean()) if (r > -1).any() else -1.0)
    num_gt = np.bincount(np.searchsorted(g.cat_ids, g.category_id[~g.crowd]), minlength=len(g.cat_ids))
    derived = class_stats is None
    if class_stats is None:
        counts = np.maximum(num_gt, 0).tolist()
        class_stats = ClassStats(g.cat_names, counts, category_ids=g.cat_ids.tolist(), floor=1)
    name_of = dict(zip(class_stats.category_ids, class_stats.names))
    cat_pos = {int(c): i for i, c in enumerate(g.cat_ids.tolist())}
    tail_ids = [class_stats.category_ids[i] for i in class_stats.tail]
    missing = [c for c in tail_ids if c not in cat_pos]
    if missing:
        raise ValueError(f"ClassStats tail categories {missing} are not in the ground truth categories {g.cat_ids.tolist()}")
    tail_with_gt = [c for c in tail_ids if num_gt[cat_pos[c]] > 0]
    excluded = [name_of[c] for c in tail_ids if num_gt[cat_pos[c]] == 0]

    def mean_over(values, ids):
        vals = [values[cat_pos[c]] for c in ids if values[cat_pos[c]] > -1]
        return float(np.mean(vals)) if vals else -1.0

    ultra = confusion = None
    if extras:
        u = ultralytics_map(
            np.searchsorted(g.img_ids, g.image_id), np.searchsorted(g.cat_ids, g.category_id), g.bbox, g.crowd,
            np.searchsorted(g.img_ids, dets.image_id), np.searchsorted(g.cat_ids, dets.category_id), dets.bbox,
            dets.score, device=dev, by_score=by_score, candidates=edges[:2])
        ultra = {
            "map": u.map,
            "map50": u.map50,
            "per_class": {g.cat_names[c]: float(a) for c, a in zip(u.classes, u.ap.mean(1))},
            "per_class_ap50": {g.cat_names[c]: float(a) for c, a in zip(u.classes, u.ap[:, 0])},
        }
        confusion = confusion_matrix(g, dets, iou_thr=confusion_iou, score_thr=confusion_score, device=dev,
                                     by_score=by_score, d_rows=d_rows)
    return {
        "stats": stats.tolist(),
        "stat_names": list(STAT_NAMES),
        "map": float(stats[0]),
        "map50": float(stats[1]),
        "per_class": {name: {"ap": per_ap[k], "ap50": per_ap50[k], "ar100": per_ar[k], "num_gt": int(num_gt[k])}
                      for k, name in enumerate(g.cat_names)},
        "ultralytics": ultra,
        "precision": acc["precision"],
        "recall": acc["recall"],
        "scores": acc["scores"],
        "iou_thrs": IOU_THRS.tolist(),
        "rec_thrs": REC_THRS.tolist(),
        "class_names": g.cat_names,
        "category_ids": g.cat_ids.tolist(),
        "num_gt": num_gt.tolist(),
        "per_class_ap": per_ap,
        "per_class_ap50": per_ap50,
        "per_class_ar100": per_ar,
        "map_tail": mean_over(per_ap, tail_with_gt),
        "map50_tail": mean_over(per_ap50, tail_with_gt),
        "tail_classes": [name_of[c] for c in tail_ids],
        "tail_rule": class_stats.tail_rule + (" (derived from the evaluated ground truth)" if derived else ""),
        "tail_excluded": excluded,
        "class_stats": class_stats.to_dict(),
        "confusion": confusion,
        "confusion_iou": confusion_iou,
        "confusion_score": confusion_score,
        "pr_curves": {name: p_all[0, :, k].tolist() for k, name in enumerate(g.cat_names)},
        "dropped_detections": dropped,
        "num_images": len(g.img_ids),
        "num_detections": len(dets.score),
        "device": str(dev),
    }


class CocoEvaluator:
    """Detectron2-style evaluator: ``reset()``, ``process(detections)`` per batch, ``evaluate()``.

    Args:
        gt: COCO ground truth (dict or path).
        class_stats: training-split ClassStats for the tail set.
        device: evaluation device (default CUDA when available).

    Example:
        >>> ev = CocoEvaluator("val.json")  # doctest: +SKIP
        >>> for batch in loader:
        ...     ev.process(model_outputs_as_coco_results)
        >>> ev.evaluate()["bbox"]["AP"]
    """

    def __init__(self, gt: Any, *, class_stats: ClassStats | None = None, device: str | None = None) -> None:
        self.gt, _ = _load_gt(gt)
        self.class_stats = class_stats
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Forget processed detections."""
        self._parts: list[DetectionArrays] = []

    def process(self, detections: Iterable[Mapping[str, Any]] | Mapping[str, Any] | DetectionArrays | np.ndarray
                | torch.Tensor) -> None:
        """Add a batch of detections (results list, dict of arrays/tensors, (N, 7) array/tensor)."""
        direct = (Mapping, DetectionArrays, np.ndarray, torch.Tensor)
        self._parts.append(DetectionArrays.from_any(detections if not isinstance(detections, Iterable)
                                                    or isinstance(detections, direct) else list(detections)))

    def evaluate(self) -> dict[str, Any]:
        """Evaluate everything processed; ``{"bbox": {name: value}, ...full result}``."""
        dets = DetectionArrays.from_any([])
        for part in self._parts:
            dets = dets.concat(part)
        res = evaluate_coco(self.gt, dets, class_stats=self.class_stats, device=self.device)
        res["bbox"] = {n: (float("nan") if v < 0 else 100.0 * v) for n, v in zip(STAT_NAMES, res["stats"])}
        return res
