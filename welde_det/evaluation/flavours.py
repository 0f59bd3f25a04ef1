"""Matching primitives shared by the evaluators, and the Ultralytics flavour of mAP.

Two flavours of "mAP@0.5:0.95" are in use for the lumbar set: pycocotools' (``coco_eval``)
and Ultralytics' (``DetectionValidator``), which papers on this data report. They differ in
matching and integration, so the same boxes give figures a point or more apart:

=====================  ==========================================  ======================================
                       pycocotools (``coco_eval``)                  Ultralytics (:func:`ultralytics_map`)
=====================  ==========================================  ======================================
matching unit          (image, class) pair, ≤ 100 dets per pair      image (IoU zeroed across classes)
greedy rule            best IoU ≥ t, last GT on ties; crowd/out-of-  best IoU ≥ t, first GT on ties
                       range GTs ignored, matched only as fallback   (``np.argmax``); crowd GTs dropped
IoU                    float64, ``iou = inter / union``             float32, ``inter / (union + 1e-7)``
precision at recall r  envelope sampled at 101 recall points        envelope interpolated at 101 points,
                       (``searchsorted``), averaged                  trapezoid-integrated (``np.trapezoid``)
classes averaged       classes with GT (−1 excluded)                classes with GT (no GT: not in the mean)
=====================  ==========================================  ======================================

Shared primitives (vectorised over all groups at once, no Python loop over images):

- :func:`candidate_edges`: the (detection, GT) pairs that share a group id (an image, or an
  (image, class) pair) and overlap enough to ever match;
- :func:`greedy_assign`: the sequential greedy matcher of both flavours. Detections are
  processed in "steps" (the k-th candidate detection of every group at step k), each step
  one tensor operation over all groups, thresholds and columns, on CPU or CUDA.

Ultralytics conventions reproduced (``ultralytics`` 8.4.190, ``engine/validator.py``
``match_predictions`` and ``utils/metrics.py`` ``box_iou``, ``ap_per_class``, ``compute_ap``):
detections per image in descending score (stable on ties); each, in turn, takes the unclaimed
same-class GT with the highest float32 IoU (the first on ties, as ``argmax``) if that IoU ≥ t;
``ap_per_class`` sorts all detections by score, keeps classes with at least one GT label, and
integrates ``np.interp`` of the precision envelope at 101 recall points with the trapezoid
rule, with its sentinels (precision 0 at the final recall and at recall 1, so a perfect
class scores 0.995, not 1); a class with GT and no detection has AP 0; classes with
detections but no GT are left out of the mean (and of ``per_class``). Differences from a
``DetectionValidator`` run: no confidence threshold or ``max_det`` cap is applied here (pass its detections, which
already went through NMS with ``conf=0.001, max_det=300``); ``ap_per_class`` sorts scores with
an unstable ``np.argsort``, we sort stably, so exactly tied scores may be ordered differently
(Ultralytics' order of ties is not defined either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "UltralyticsResult", "candidate_edges", "greedy_assign", "group_score_order", "run_rank",
    "run_rank_of", "score_order", "stable_argsort", "stable_lexsort", "subset_order", "ultralytics_map", "ultralytics_match",
]

ULTRA_IOU_THRS = torch.linspace(0.5, 0.95, 10).numpy()  # float32, as DetectionValidator.iouv
_AP_X = np.linspace(0, 1, 101)


def _host_path(device: torch.device) -> bool:
    """Whether the NumPy host implementations run (CPU) rather than the torch ones (any other
    device). One switch, so a test can run the device code path on CPU tensors."""
    return device.type == "cpu"


def stable_argsort(key: np.ndarray) -> np.ndarray:
    """Stable argsort; non-negative integer keys below 2**32 by 16-bit radix passes (NumPy's
    stable sort is a radix sort only for 16-bit integers, timsort otherwise)."""
    if key.dtype.kind in "iub" and len(key) and key.min() >= 0 and key.max() < 2**32:
        key = key.astype(np.int64, copy=False)
        perm = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
        if key.max() >= 2**16:
            perm = perm[np.argsort((key[perm] >> 16).astype(np.uint16), kind="stable")]
        return perm
    return np.argsort(key, kind="stable")


def score_order(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, rank)``: the stable order by descending score, and each score's dense rank (0 for
    the highest, equal scores share one; a stable sort by it orders as a stable sort by ``-score``).

    ``order`` is what every "by score within a group" sort starts from
    (:func:`group_score_order`), so the one float sort serves them all.
    """
    if len(score) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(-score, kind="stable")
    s = score[order]
    rank = np.empty(len(score), np.int64)
    rank[order] = np.cumsum(np.r_[False, s[1:] != s[:-1]])
    return order, rank


def group_score_order(group: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``stable_lexsort([rank, group])`` from the score ``order`` of :func:`score_order`:
    by group, then by descending score, ties in index order — one radix sort instead of three."""
    return order[stable_argsort(group[order])]


def subset_order(order: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The score ``order`` of the rows ``keep`` (bool mask), as indices into the kept rows."""
    pos = np.cumsum(keep) - 1
    return pos[order[keep[order]]]


def stable_lexsort(keys: list[np.ndarray]) -> np.ndarray:
    """Same result as ``np.lexsort(keys)`` (last key primary, stable), faster on integer keys."""
    perm = np.arange(len(keys[0]))
    for key in keys:
        perm = perm[stable_argsort(key[perm])]
    return perm


def candidate_edges(
    d_group: np.ndarray, g_group: np.ndarray, iou_fn: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    min_iou: float, device: torch.device,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The (detection, GT) pairs that share a group id and whose IoU is ≥ ``min_iou``.

    Pairs are generated and measured in chunks of about 64k on CPU, so the index arrays and
    IoU temporaries stay in cache (several times faster than one pass over millions of pairs).

    Args:
        d_group: (N,) int group id of each detection (an image, or an (image, class) pair).
        g_group: (G,) int group id of each GT.
        iou_fn: ``(e_det, e_gt) -> (E,)`` IoU tensor of the given pairs on ``device``.
        min_iou: the smallest IoU kept (> 0).
        device: where ``iou_fn`` computes.

    Returns:
        ``(e_det, e_gt, iou)``: detection-major in detection order, GTs ascending within a
        detection; iou on ``device``.
    """
    parts_d, parts_g, parts_i = [], [], []
    if len(d_group) and len(g_group):
        groups, g_idx = np.unique(g_group, return_inverse=True)
        g_order = stable_argsort(g_idx)
        g_cnt = np.bincount(g_idx, minlength=len(groups))
        g_start = np.cumsum(g_cnt) - g_cnt
        pos = np.minimum(np.searchsorted(groups, d_group), len(groups) - 1)
        n_e = np.where(groups[pos] == d_group, g_cnt[pos], 0)
        ends = np.cumsum(n_e)
        chunk = 1 << 16 if _host_path(device) else 1 << 24
        d0 = 0
        while d0 < len(d_group):
            before = ends[d0 - 1] if d0 else 0
            d1 = max(int(np.searchsorted(ends, before + chunk, side="right")), d0 + 1)
            ne = n_e[d0:d1]
            n = int(ne.sum())
            if n:
                e_det = np.repeat(np.arange(d0, d1), ne)
                first = np.repeat(np.cumsum(ne) - ne - g_start[pos[d0:d1]], ne)
                e_gt = g_order[np.arange(n) - first]
                iou = iou_fn(e_det, e_gt)
                keep = iou >= min_iou
                keep_np = keep.cpu().numpy()
                parts_d.append(e_det[keep_np])
                parts_g.append(e_gt[keep_np])
                parts_i.append(iou[keep])
            d0 = d1
    if not parts_d:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), torch.zeros(0, dtype=torch.float64, device=device)
    return np.concatenate(parts_d), np.concatenate(parts_g), torch.cat(parts_i)


def greedy_assign(
    step: np.ndarray,
    det: np.ndarray,
    gt: np.ndarray,
    thr_ok: torch.Tensor,
    n_gt: int,
    *,
    preferred: torch.Tensor | None = None,
    sticky: torch.Tensor | None = None,
    payload: torch.Tensor | None = None,
    n_rows: int | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Sequential greedy matching, vectorised over groups, thresholds and columns.

    Each detection, in step order, takes among its eligible edges (``thr_ok``, GT not yet
    taken at that threshold and column, or ``sticky``) the one ranked highest: first any
    ``preferred`` edge, then the last in edge order. Detections of one step belong to
    different groups (GTs are never shared between groups), so a step is one operation.

    Args:
        step: (E,) int, non-decreasing: the step of each edge's detection.
        det: (E,) int detection id, contiguous within a step; edges of a detection are in
            ascending priority.
        gt: (E,) int GT index in ``[0, n_gt)``.
        thr_ok: (E, T) bool, the edge's IoU passes threshold t (on the compute device).
        n_gt: number of GTs.
        preferred: (E, A) bool or None (A = 1): per column, edges that outrank all others
            (pycocotools: a regular GT beats an ignored one).
        sticky: (E,) bool or None: the GT is never used up (pycocotools' crowd boxes).
        payload: (E, A) uint8 or None: return this value of the chosen edge instead of its
            index (0 where none), which keeps the (D, T, A) output small.

        n_rows: with it, ``choice`` has one row per detection id in ``[0, n_rows)`` (rows of
            detections without edges hold the "none" value), written in place step by step:
            no (D, T, A) array to scatter afterwards.

    Returns:
        ``(dets, choice)``: (D,) the distinct detection ids in edge order, and (D, T, A)
        int64 chosen edge index, −1 where none (or the uint8 ``payload`` of it); with
        ``n_rows``, ``choice`` is (n_rows, T, A) indexed by detection id.
    """
    device = thr_ok.device
    n_e, n_t = thr_ok.shape
    n_a = 1 if preferred is None else preferred.shape[1]
    out_dtype, none_out = (torch.int64, -1) if payload is None else (torch.uint8, 0)
    if n_e == 0:
        return np.zeros(0, np.int64), torch.full((0, n_t, n_a), none_out, dtype=out_dtype, device=device)
    new_det = np.r_[True, (np.diff(det) != 0) | (np.diff(step) != 0)]
    seq = np.cumsum(new_det) - 1  # detection sequence number over all steps
    dets = det[new_det]
    bounds = np.searchsorted(step, np.arange(int(step[-1]) + 2))
    local = torch.as_tensor(seq - seq[np.minimum(bounds[step], n_e - 1)], device=device)
    # (T, A) flattened to C columns (c = t * A + a). Keys and flat indices are built per step
    # from the step's edges only (no (E, C) array is ever held: memory, not arithmetic, is what
    # costs here). Edges n_e .. big - 1 are sentinels (payload 0, a dummy GT row n_gt), with
    # ``big`` a power of two: "no edge" (key -1) maps to big - 1 by one bitwise and, so no step
    # needs a mask or a division.
    n_c = n_t * n_a
    big = 1 << int(n_e).bit_length()  # > n_e
    key_dtype = torch.int32 if 2 * big < 2**31 else torch.int64  # keys < 2 * big
    gt_ext = torch.as_tensor(np.r_[gt, np.full(big - n_e, n_gt)].astype(np.int64), device=device) * n_c
    cols = torch.arange(n_c, device=device)
    none = torch.tensor(-1, dtype=key_dtype, device=device)
    bonus = None if preferred is None else preferred.to(key_dtype) * big  # (E, A)
    if payload is not None:
        payload_ext = torch.cat([payload, torch.zeros((big - n_e, n_a), dtype=payload.dtype, device=device)]).view(-1)
        pay_col = torch.arange(n_a, device=device).repeat(n_t)  # area of each column
    used = torch.zeros((n_gt + 1) * n_c, dtype=torch.bool, device=device)
    choice = torch.full((len(dets) if n_rows is None else n_rows, n_c), none_out, dtype=out_dtype, device=device)
    dets_t = None if n_rows is None else torch.as_tensor(dets, device=device)
    for s in range(len(bounds) - 1):
        s0, s1 = int(bounds[s]), int(bounds[s + 1])
        if s0 == s1:
            continue
        flat_s = gt_ext[s0:s1, None] + cols  # (e, C) flat index of (GT of the edge, column)
        ok = torch.take(used, flat_s).logical_not_()
        if sticky is not None:
            ok |= sticky[s0:s1, None]
        ok.view(s1 - s0, n_t, n_a).logical_and_(thr_ok[s0:s1, :, None])
        key = torch.arange(s0, s1, device=device, dtype=key_dtype)[:, None].expand(s1 - s0, n_c)
        if bonus is not None:
            key = (key.view(s1 - s0, n_t, n_a) + bonus[s0:s1, None, :]).view(s1 - s0, n_c)
        key = torch.where(ok, key, none)
        d0, d1 = int(seq[s0]), int(seq[s1 - 1]) + 1
        best = torch.full((d1 - d0, n_c), -1, dtype=key_dtype, device=device)
        best.scatter_reduce_(0, local[s0:s1, None].expand(-1, n_c), key, "amax")
        edge = best.bitwise_and_(big - 1).long()  # -1 (nothing eligible) -> the sentinel big - 1
        value = edge if payload is None else torch.take(payload_ext, edge * n_a + pay_col)
        if dets_t is None:
            choice[d0:d1] = value
        else:
            choice.index_copy_(0, dets_t[d0:d1], value)
        used.index_fill_(0, (gt_ext.index_select(0, edge.view(-1)).view(edge.shape) + cols).view(-1), True)
    if payload is None:
        choice[choice == big - 1] = -1
    choice = choice.view(len(choice), n_t, n_a)
    return dets, choice


def run_rank_of(e_det: np.ndarray, group_of_det: np.ndarray) -> np.ndarray:
    """Per edge, the rank of its detection among the detections with edges of its group.

    ``group_of_det`` is grouped (detections of a group contiguous, in priority order); the
    edges may come in any order.
    """
    has = np.zeros(len(group_of_det), bool)
    has[e_det] = True
    dets = np.flatnonzero(has)
    step_of = np.zeros(len(group_of_det), np.int64)
    step_of[dets] = run_rank(group_of_det.take(dets))
    return step_of.take(e_det)


def run_rank(group_sorted: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal ids (input grouped by id)."""
    n = len(group_sorted)
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.r_[True, group_sorted[1:] != group_sorted[:-1]]
    return np.arange(n) - np.maximum.accumulate(np.where(start, np.arange(n), 0))


def _box_iou32(d_xyxy: torch.Tensor, g_xyxy: torch.Tensor) -> torch.Tensor:
    """Ultralytics' ``box_iou`` edge by edge, operation for operation (float32, eps 1e-7).

    Shape:
        d_xyxy, g_xyxy: (4, E) rows x1, y1, x2, y2 -> (E,).
    """
    gx1, gy1, gx2, gy2 = g_xyxy.float()
    dx1, dy1, dx2, dy2 = d_xyxy.float()
    w = (torch.minimum(gx2, dx2) - torch.maximum(gx1, dx1)).clamp_(0)
    h = (torch.minimum(gy2, dy2) - torch.maximum(gy1, dy1)).clamp_(0)
    inter = w * h
    return inter / ((gx2 - gx1) * (gy2 - gy1) + (dx2 - dx1) * (dy2 - dy1) - inter + 1e-7)


def _box_iou32_cpu(d_xyxy: np.ndarray, g_xyxy: np.ndarray, det_of: np.ndarray | None = None
                   ) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
    """``(e_det, e_gt) -> IoU``: :func:`_box_iou32` in NumPy, the same float32 operations, done
    only for the edges whose boxes overlap in x (the others have IoU 0).

    Shape:
        d_xyxy, g_xyxy: (4, N) and (4, G) rows x1, y1, x2, y2; ``det_of`` (optional): the
        row of ``d_xyxy`` of each detection id the edges use (ids are then positions in it).
    """
    d, g = d_xyxy.astype(np.float32, copy=False), g_xyxy.astype(np.float32, copy=False)

    def iou(e_det: np.ndarray, e_gt: np.ndarray) -> torch.Tensor:
        if det_of is not None:
            e_det = det_of.take(e_det)
        w = np.minimum(g[2].take(e_gt), d[2].take(e_det))
        w -= np.maximum(g[0].take(e_gt), d[0].take(e_det))
        out = np.zeros(len(e_det), np.float32)
        s = np.flatnonzero(w > 0)
        ed, eg, w = e_det[s], e_gt[s], w[s]
        gx1, gy1, gx2, gy2 = (r.take(eg) for r in g)
        dx1, dy1, dx2, dy2 = (r.take(ed) for r in d)
        h = np.maximum(np.minimum(gy2, dy2) - np.maximum(gy1, dy1), np.float32(0))
        inter = w * h
        out[s] = inter / ((gx2 - gx1) * (gy2 - gy1) + (dx2 - dx1) * (dy2 - dy1) - inter + np.float32(1e-7))
        return torch.from_numpy(out)

    return iou


def ultralytics_match(
    g_img: np.ndarray, g_cls: np.ndarray, g_xyxy: np.ndarray,
    d_img: np.ndarray, d_cls: np.ndarray, d_xyxy: np.ndarray, d_score: np.ndarray,
    *, device: torch.device | str = "cpu", by_score: tuple[np.ndarray, np.ndarray] | None = None,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Ultralytics' ``match_predictions`` for every image at once.

    Args:
        g_img, g_cls: (G,) int image and class of each GT (crowd boxes already dropped).
        g_xyxy: (G, 4) GT boxes [x1, y1, x2, y2].
        d_img, d_cls, d_score: (N,) image, class and score of each detection.
        d_xyxy: (N, 4) detection boxes [x1, y1, x2, y2].
        device: where the matching runs.
        by_score: :func:`score_order` of ``d_score`` if already known.
        candidates: ``(e_det, e_gt)`` input-order pairs that include every same-class pair
            with IoU ≥ 0.5 (e.g. all intersecting ones), or None to find them here.

    Returns:
        (N, 10) bool ``tp``: detection i is correct at IoU threshold 0.50 + 0.05 j.
    """
    device = torch.device(device)
    n = len(d_img)
    tp = np.zeros((n, len(ULTRA_IOU_THRS)), bool)
    if n == 0 or len(g_img) == 0:
        return tp
    # per image, by descending score, stable; a group is an (image, class) pair since the
    # IoU of a cross-class pair is zeroed (never >= 0.5)
    n_cls = int(max(g_cls.max(), d_cls.max())) + 1
    order = group_score_order(d_img, (by_score or score_order(d_score))[0])
    d_pair = (d_img.astype(np.int64) * n_cls + d_cls)[order]
    g_pair = g_img.astype(np.int64) * n_cls + g_cls
    # boxes stay in input order, as float32 rows (one copy); edges index them through ``order``
    d_t = np.empty((4, n), np.float32)
    np.copyto(d_t, np.asarray(d_xyxy).T, casting="same_kind")
    g_t = np.ascontiguousarray(g_xyxy.T)
    thr = torch.as_tensor(ULTRA_IOU_THRS, device=device)
    iou_fn = (_box_iou32_cpu(d_t, g_t, order) if _host_path(device) else
              lambda ed, eg: _box_iou32(torch.as_tensor(np.take(d_t, order.take(ed), axis=1), device=device),
                                        torch.as_tensor(np.take(g_t, eg, axis=1), device=device)))
    if candidates is None:
        e_det, e_gt, iou = candidate_edges(d_pair, g_pair, iou_fn, float(ULTRA_IOU_THRS[0]), device)  # e_det: `order`
    else:
        pos_of = np.empty(n, np.int64)
        pos_of[order] = np.arange(n)
        e_det, e_gt = pos_of.take(candidates[0]), np.asarray(candidates[1], np.int64)
        iou = iou_fn(e_det, e_gt)
        keep = iou >= float(ULTRA_IOU_THRS[0])
        e_det, e_gt, iou = e_det[keep.cpu().numpy()], e_gt[keep.cpu().numpy()], iou[keep]
    if len(e_det) == 0:
        return tp
    # a detection's step = its rank among the candidate detections of its image (the images'
    # detection order is the class pairs' order, and pairs never share GTs)
    step = run_rank_of(e_det, d_img[order])
    # argmax over GTs takes the highest IoU, the first GT on ties: ascending (IoU, -GT) order
    iou_np = iou.cpu().numpy()
    srt = stable_lexsort([len(g_img) - e_gt, iou_np, e_det, step])
    step, e_det, e_gt = step[srt], e_det[srt], e_gt[srt]
    thr_ok = iou[torch.as_tensor(srt, device=device)][:, None] >= thr[None, :]
    dets, choice = greedy_assign(step, e_det, e_gt, thr_ok, len(g_img))
    tp[order[dets]] = (choice[:, :, 0] >= 0).cpu().numpy()
    return tp


@dataclass(frozen=True)
class UltralyticsResult:
    """Ultralytics-style AP.

    Attributes:
        classes: (C,) class indices with at least one GT, ascending (``ap_per_class``'s
            ``unique_classes``).
        ap: (C, 10) AP per class at IoU 0.50:0.05:0.95.
        tp: (N, 10) bool correctness of each detection (input order).
    """

    classes: np.ndarray
    ap: np.ndarray
    tp: np.ndarray

    @property
    def map(self) -> float:
        """mAP@0.5:0.95 over classes with GT (0.0 when there are none, as Ultralytics)."""
        return float(self.ap.mean()) if self.ap.size else 0.0

    @property
    def map50(self) -> float:
        """mAP@0.5 over classes with GT."""
        return float(self.ap[:, 0].mean()) if self.ap.size else 0.0


def ap_from_tp(tp: np.ndarray, score: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
               by_score: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ultralytics' ``ap_per_class`` AP part: per class with GT, AP at each IoU threshold
    (its ``compute_ap``, 8.4: the padded precision envelope, 101-point ``np.interp``, trapezoid).

    Args:
        tp: (N, T) bool; score, pred_cls: (N,); target_cls: (G,) class of every GT;
        by_score: :func:`score_order` of ``score`` if already known.

    Returns:
        ``(classes, ap)``: (C,) classes with GT ascending, (C, T) AP.
    """
    classes, n_gt = np.unique(target_cls, return_counts=True)
    ap = np.zeros((len(classes), tp.shape[1]))
    by_cls = group_score_order(pred_cls, (by_score or score_order(score))[0])
    bounds = np.searchsorted(pred_cls[by_cls], np.r_[classes, classes + 1] if len(classes) else [])
    for ci in range(len(classes)):
        rows = by_cls[bounds[ci]:bounds[len(classes) + ci]]
        if len(rows) == 0:
            continue
        n = len(rows)
        tpc = np.take(tp, rows, axis=0).T.cumsum(1, dtype=np.int32)  # (T, n), rows contiguous
        # compute_ap's padded curves for all thresholds at once (row j = threshold j), the same
        # values as its per-threshold concatenations; the envelope is one accumulate
        mrec = np.empty((tpc.shape[0], n + 3))
        mrec[:, 0], mrec[:, -1] = 0.0, 1.0
        np.divide(tpc, n_gt[ci] + 1e-16, out=mrec[:, 1:n + 1])
        mrec[:, n + 1] = mrec[:, n]
        mpre = np.empty_like(mrec)
        mpre[:, 0], mpre[:, n + 1:] = 1.0, 0.0
        np.divide(tpc, np.arange(1, n + 1, dtype=np.float64), out=mpre[:, 1:n + 1])  # tpc + fpc: the same integers
        mpre = np.maximum.accumulate(mpre[:, ::-1], axis=1)[:, ::-1]
        for j in range(tpc.shape[0]):
            ap[ci, j] = float(np.trapezoid(np.interp(_AP_X, mrec[j], np.ascontiguousarray(mpre[j])), _AP_X))
    return classes, ap


def ultralytics_map(
    g_img: np.ndarray, g_cls: np.ndarray, g_xywh: np.ndarray, g_crowd: np.ndarray,
    d_img: np.ndarray, d_cls: np.ndarray, d_xywh: np.ndarray, d_score: np.ndarray,
    *, device: torch.device | str = "cpu", by_score: tuple[np.ndarray, np.ndarray] | None = None,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
) -> UltralyticsResult:
    """The figures Ultralytics' ``DetectionValidator`` reports for the same boxes.

    Args:
        g_img, g_cls: (G,) int image and class index of each GT; g_crowd (G,) bool (dropped).
        g_xywh: (G, 4) GT boxes [x, y, w, h] (COCO).
        d_img, d_cls, d_score: (N,) image, class index and score of each detection.
        d_xywh: (N, 4) detection boxes [x, y, w, h].
        device: where the matching runs.
        by_score: :func:`score_order` of ``d_score`` if already known.
        candidates: ``(e_det, e_gt)`` pairs (indices into these arrays, crowd GTs included)
            that include every same-class pair with IoU ≥ 0.5, or None to find them.

    Returns:
        :class:`UltralyticsResult` (``map``, ``map50``, per-class ``ap``).

    Example:
        >>> r = ultralytics_map(np.array([0]), np.array([0]), np.array([[0., 0, 10, 10]]), np.array([False]),
        ...                     np.array([0]), np.array([0]), np.array([[0., 0, 10, 10]]), np.array([0.9]))
        >>> round(r.map, 6)
        1.0
    """
    keep = ~np.asarray(g_crowd, bool)
    g_img, g_cls, g_xywh = g_img[keep], g_cls[keep], np.asarray(g_xywh, np.float64)[keep]
    if candidates is not None:  # crowd GTs dropped, the others renumbered
        e_det, e_gt = candidates
        on = keep[e_gt]
        candidates = (e_det[on], (np.cumsum(keep) - 1)[e_gt[on]])
    d_xywh = np.asarray(d_xywh, np.float64)
    to_xyxy = lambda b: np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)  # noqa: E731
    by_score = by_score or score_order(d_score)
    tp = ultralytics_match(g_img, g_cls, to_xyxy(g_xywh), d_img, d_cls, to_xyxy(d_xywh), d_score, device=device,
                           by_score=by_score, candidates=candidates)
    classes, ap = ap_from_tp(tp, d_score, d_cls, g_cls, by_score)
    return UltralyticsResult(classes=classes, ap=ap, tp=tp)
