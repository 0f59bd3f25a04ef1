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

Everything runs in float64 on ``device`` (CUDA when available); the greedy matching loops
over detection rank only (≤ 100 steps), each step a tensor operation over all
(image, category) pairs, thresholds and area ranges at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from welde_det.classes import ClassStats
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
        """From a COCO results list/path, a dict of arrays/tensors, or a DetectionArrays."""
        if isinstance(detections, DetectionArrays):
            return detections
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
        try:
            img = np.fromiter((d["image_id"] for d in detections), np.int64, n)
            cat = np.fromiter((d["category_id"] for d in detections), np.int64, n)
            score = np.fromiter((d["score"] for d in detections), np.float64, n)
            box = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4)
        except KeyError as exc:
            raise ValueError(f"a detection lacks {exc.args[0]!r}; COCO results need image_id, category_id, bbox, score") from None
        except ValueError as exc:
            raise ValueError(f"malformed detection bbox or score ({exc}); bbox must be [x, y, w, h]") from None
        return cls(img, cat, box, score)

    def concat(self, other: DetectionArrays) -> DetectionArrays:
        """Both sets, this one first (result order matters for ties, as in pycocotools)."""
        return DetectionArrays(np.concatenate([self.image_id, other.image_id]),
                               np.concatenate([self.category_id, other.category_id]),
                               np.concatenate([self.bbox, other.bbox]), np.concatenate([self.score, other.score]))


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
        seen_ids: set = set()
        img, cat, box, area, crowd, ids = [], [], [], [], [], []
        img_set, cat_set = set(self.img_ids.tolist()), set(self.cat_ids.tolist())
        for a in anns:
            aid = a.get("id")
            if aid in seen_ids:
                raise ValueError(f"{source}: duplicate annotation id {aid}; pycocotools would silently keep only one")
            seen_ids.add(aid)
            if int(a["image_id"]) not in img_set or int(a["category_id"]) not in cat_set:
                continue  # pycocotools' getAnnIds drops these too
            if "area" not in a:
                raise ValueError(
                    f"{source}: annotation {aid} has no 'area' (pycocotools needs it for the area ranges); "
                    "set it, e.g. area = w*h of the bbox, or the segmentation area"
                )
            if "bbox" not in a:
                raise ValueError(f"{source}: annotation {aid} has no 'bbox'")
            img.append(int(a["image_id"]))
            cat.append(int(a["category_id"]))
            box.append(a["bbox"])
            area.append(float(a["area"]))
            crowd.append(bool(a.get("iscrowd", 0)))
            ids.append(int(aid) if aid is not None else 0)
        self.image_id = np.array(img, dtype=np.int64)
        self.category_id = np.array(cat, dtype=np.int64)
        self.bbox = np.array(box, dtype=np.float64).reshape(-1, 4)
        self.area = np.array(area, dtype=np.float64)
        self.crowd = np.array(crowd, dtype=bool)
        self.ann_id = np.array(ids, dtype=np.int64)
        if len(self.bbox) and not np.isfinite(self.bbox).all():
            raise ValueError(f"{source}: a ground-truth bbox is not finite")


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


def _stable_order(keys: list[np.ndarray]) -> np.ndarray:
    """np.lexsort with the last key primary (stable)."""
    return np.lexsort(keys)


def _bbox_iou(d: torch.Tensor, g: torch.Tensor, crowd: torch.Tensor) -> torch.Tensor:
    """pycocotools' bbIou, operation for operation (float64). d (n, 4), g (n, G, 4) -> (n, G)."""
    dx, dy, dw, dh = d[:, 0:1], d[:, 1:2], d[:, 2:3], d[:, 3:4]
    gx, gy, gw, gh = g[..., 0], g[..., 1], g[..., 2], g[..., 3]
    w = torch.minimum(dw + dx, gw + gx) - torch.maximum(dx, gx)
    h = torch.minimum(dh + dy, gh + gy) - torch.maximum(dy, gy)
    inter = w * h
    da = dw * dh
    ga = gw * gh
    union = torch.where(crowd, da.expand_as(ga), (da + ga) - inter)
    iou = inter / union
    return torch.where((w <= 0) | (h <= 0), torch.zeros_like(iou), iou)


def _match(gt: _GroundTruth, det: DetectionArrays, device: torch.device) -> dict[str, np.ndarray]:
    """Greedy matching for every (image, category) pair, IoU threshold and area range.

    Returns per kept detection (rank < maxDets[-1] within its pair): image/category index,
    rank, score, and tp/fp flags of shape (N, T, A).
    """
    img_index = {v: i for i, v in enumerate(gt.img_ids.tolist())}
    cat_index = {v: i for i, v in enumerate(gt.cat_ids.tolist())}
    n_img, n_cat = len(gt.img_ids), len(gt.cat_ids)
    g_pair = np.array([img_index[i] for i in gt.image_id.tolist()], dtype=np.int64) * n_cat + np.array(
        [cat_index[c] for c in gt.category_id.tolist()], dtype=np.int64)
    d_img = np.searchsorted(gt.img_ids, det.image_id)
    d_cat = np.searchsorted(gt.cat_ids, det.category_id)
    d_pair = d_img * n_cat + d_cat
    # detections: stable by -score within pair, keep rank < maxDets[-1]
    order = _stable_order([-det.score, d_pair])
    d_pair_s = d_pair[order]
    starts = np.r_[0, np.nonzero(np.diff(d_pair_s))[0] + 1] if len(order) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    keep = rank < MAX_DETS[-1]
    order, rank, d_pair_s = order[keep], rank[keep], d_pair_s[keep]
    # pairs: union of pairs with GT or detections
    pairs = np.union1d(np.unique(g_pair), np.unique(d_pair_s))
    n_pairs = len(pairs)
    pair_of_det = np.searchsorted(pairs, d_pair_s)
    pair_of_gt = np.searchsorted(pairs, g_pair)
    n_det_pair = np.bincount(pair_of_det, minlength=n_pairs)
    n_gt_pair = np.bincount(pair_of_gt, minlength=n_pairs)
    # GT slot within its pair, in file order (pycocotools' order)
    g_order = np.argsort(pair_of_gt, kind="stable")
    g_starts = np.r_[0, np.cumsum(n_gt_pair)[:-1]]
    g_slot = np.empty(len(g_order), np.int64)
    g_slot[g_order] = np.arange(len(g_order)) - np.repeat(g_starts, n_gt_pair)
    # process pairs with most detections first, in chunks
    by_dets = np.argsort(-n_det_pair, kind="stable")
    T, A = len(IOU_THRS), len(AREA_RNG)
    thr = torch.as_tensor(np.minimum(IOU_THRS, 1 - 1e-10), dtype=torch.float64, device=device)
    rng = torch.as_tensor(np.array(AREA_RNG), dtype=torch.float64, device=device)
    tp_out = np.zeros((len(order), T, A), dtype=bool)
    fp_out = np.zeros((len(order), T, A), dtype=bool)
    det_pos = np.empty(len(order), np.int64)  # position of each kept detection in its pair block
    det_pos[:] = rank
    det_row_of = np.full((n_pairs, MAX_DETS[-1]), -1, dtype=np.int64)
    det_row_of[pair_of_det, rank] = np.arange(len(order))
    for c0 in range(0, n_pairs, _PAIR_CHUNK):
        chunk = by_dets[c0:c0 + _PAIR_CHUNK]
        n = len(chunk)
        dmax = int(n_det_pair[chunk].max()) if n else 0
        if dmax == 0:
            continue
        gmax = max(1, int(n_gt_pair[chunk].max()))
        local = np.full(n_pairs, -1, np.int64)
        local[chunk] = np.arange(n)
        # padded GT tensors (n, G)
        sel = local[pair_of_gt] >= 0
        gb = np.zeros((n, gmax, 4))
        ga = np.zeros((n, gmax))
        gc = np.zeros((n, gmax), bool)
        gv = np.zeros((n, gmax), bool)
        gid = np.zeros((n, gmax), np.int64)
        rows, slots = local[pair_of_gt[sel]], g_slot[sel]
        gb[rows, slots] = gt.bbox[sel]
        ga[rows, slots] = gt.area[sel]
        gc[rows, slots] = gt.crowd[sel]
        gv[rows, slots] = True
        gid[rows, slots] = gt.ann_id[sel]
        g_box = torch.as_tensor(gb, device=device)
        g_area = torch.as_tensor(ga, device=device)
        g_crowd = torch.as_tensor(gc, device=device)
        g_valid = torch.as_tensor(gv, device=device)
        g_id = torch.as_tensor(gid, device=device)
        # ignore per area range: crowd, or GT area outside [lo, hi] (inclusive bounds)
        out_rng = (g_area[:, None, :] < rng[None, :, 0, None]) | (g_area[:, None, :] > rng[None, :, 1, None])
        g_ig = g_crowd[:, None, :] | out_rng  # (n, A, G)
        # regular GTs outrank ignored ones: key = rank + G for regular, rank for ignored
        g_bonus = torch.where(g_ig, 0, gmax).to(torch.int16)[:, None, :, :]  # (n, 1, A, G)
        gtm = torch.zeros((n, T, A, gmax), dtype=torch.bool, device=device)
        det_rows = det_row_of[chunk, :dmax]  # (n, dmax) global kept-det index or -1
        valid_rows = det_rows >= 0
        db = np.zeros((n, dmax, 4))
        db[valid_rows] = det.bbox[order[det_rows[valid_rows]]]
        det_box = torch.as_tensor(db, device=device)
        tp_chunk = torch.zeros((n, dmax, T, A), dtype=torch.bool, device=device)
        fp_chunk = torch.zeros((n, dmax, T, A), dtype=torch.bool, device=device)
        ar = torch.arange(gmax, device=device, dtype=torch.int16)
        n_active = [int((n_det_pair[chunk] > d).sum()) for d in range(dmax)]  # chunk sorted: prefixes
        for d in range(dmax):
            active = n_active[d]
            boxes = det_box[:active, d]
            iou = _bbox_iou(boxes, g_box[:active], g_crowd[:active])  # (a, G)
            iou = torch.where(g_valid[:active], iou, torch.full_like(iou, -1.0))
            # rank of each GT by (IoU, index): the last GT among equal IoUs ranks highest
            srt = torch.sort(iou, dim=-1, stable=True).indices
            rnk = torch.empty((active, gmax), dtype=torch.int16, device=device)
            rnk.scatter_(-1, srt, ar.expand(active, -1))
            free = ~(gtm[:active] & ~g_crowd[:active, None, None, :])
            elig = (iou[:, None, None, :] >= thr[None, :, None, None]) & free & g_valid[:active, None, None, :]
            keyed = torch.where(elig, rnk[:, None, None, :] + g_bonus[:active], torch.full((), -1, dtype=torch.int16,
                                                                                           device=device))
            best, m = keyed.max(-1)  # (a, T, A)
            found = best >= 0
            matched_ig = found & (best < gmax)
            gtm[:active] |= torch.zeros_like(gtm[:active]).scatter_(-1, m[..., None], found[..., None])
            matched_id = torch.gather(g_id[:active, None, None, :].expand(-1, T, A, -1), -1, m[..., None])[..., 0]
            dtm = found & (matched_id != 0)  # pycocotools marks matches by GT id (id 0 looks unmatched)
            dt_ig = found & matched_ig
            d_area = boxes[:, 2] * boxes[:, 3]
            d_out = (d_area[:, None] < rng[None, :, 0]) | (d_area[:, None] > rng[None, :, 1])  # (a, A)
            dt_ig = dt_ig | (~dtm & d_out[:, None, :])
            tp_chunk[:active, d] = dtm & ~dt_ig
            fp_chunk[:active, d] = ~dtm & ~dt_ig
        vr = torch.as_tensor(valid_rows, device=device)
        tp_out[det_rows[valid_rows]] = tp_chunk[vr].cpu().numpy()
        fp_out[det_rows[valid_rows]] = fp_chunk[vr].cpu().numpy()
        del gtm
    g_ig_all = gt.crowd[:, None] | (gt.area[:, None] < np.array(AREA_RNG)[None, :, 0]) | (
        gt.area[:, None] > np.array(AREA_RNG)[None, :, 1])
    g_cat = np.searchsorted(gt.cat_ids, gt.category_id)
    npig = np.zeros((n_cat, A), np.int64)
    np.add.at(npig, g_cat, (~g_ig_all).astype(np.int64))
    has_pair = np.zeros(n_cat, bool)
    has_pair[pairs % n_cat if n_pairs else []] = True
    return {
        "img": (pairs[pair_of_det] // n_cat) if n_pairs else np.zeros(0, np.int64),
        "cat": (pairs[pair_of_det] % n_cat) if n_pairs else np.zeros(0, np.int64),
        "rank": det_pos,
        "score": det.score[order],
        "tp": tp_out,
        "fp": fp_out,
        "npig": npig,
        "has_pair": has_pair,
        "n_img": n_img,
    }


def _accumulate(m: dict[str, np.ndarray], n_cat: int, device: torch.device) -> dict[str, np.ndarray]:
    T, R, A, M = len(IOU_THRS), len(REC_THRS), len(AREA_RNG), len(MAX_DETS)
    precision = -np.ones((T, R, n_cat, A, M))
    recall = -np.ones((T, n_cat, A, M))
    scores = -np.ones((T, R, n_cat, A, M))
    rec_thrs = torch.as_tensor(REC_THRS, dtype=torch.float64, device=device).expand(T * A, R).contiguous()
    eps = np.spacing(1)
    # E order in pycocotools: images by id, then rank; then a stable sort by -score
    base = np.lexsort([m["rank"], m["img"], m["cat"]])
    cat_sorted = m["cat"][base]
    bounds = np.searchsorted(cat_sorted, np.arange(n_cat + 1))
    tp_all = torch.as_tensor(m["tp"], device=device)
    fp_all = torch.as_tensor(m["fp"], device=device)
    for k in range(n_cat):
        npig = m["npig"][k]
        if not m["has_pair"][k] or not (npig > 0).any():
            continue
        idx_k = base[bounds[k]:bounds[k + 1]]
        areas = np.nonzero(npig > 0)[0]
        npig_t = torch.as_tensor(np.maximum(npig, 1), dtype=torch.float64, device=device)[None, :, None]
        for mi, max_det in enumerate(MAX_DETS):
            sel = idx_k[m["rank"][idx_k] < max_det]
            srt = sel[np.argsort(-m["score"][sel], kind="mergesort")]
            nd = len(srt)
            if nd == 0:
                recall[:, k, areas, mi] = 0
                precision[:, :, k, areas, mi] = 0
                scores[:, :, k, areas, mi] = 0
                continue
            srt_t = torch.as_tensor(srt, device=device)
            tp_sum = torch.cumsum(tp_all[srt_t].permute(1, 2, 0).to(torch.float64), -1)  # (T, A, nd)
            fp_sum = torch.cumsum(fp_all[srt_t].permute(1, 2, 0).to(torch.float64), -1)
            rc = tp_sum / npig_t
            pr = tp_sum / (fp_sum + tp_sum + eps)
            pr = torch.flip(torch.cummax(torch.flip(pr, [-1]), -1).values, [-1])
            inds = torch.searchsorted(rc.reshape(T * A, nd).contiguous(), rec_thrs, side="left")
            valid = inds < nd
            safe = inds.clamp(max=nd - 1)
            # pycocotools stops filling at the first index past the end: later entries stay 0
            stop = torch.cumprod(valid.to(torch.int64), 1).bool()
            q = torch.where(stop, torch.gather(pr.reshape(T * A, nd), 1, safe), torch.zeros((), dtype=torch.float64,
                                                                                          device=device))
            q = q.reshape(T, A, R).cpu().numpy()
            ss = np.where(stop.cpu().numpy(), m["score"][srt][safe.cpu().numpy()], 0.0).reshape(T, A, R)
            rc_last = rc[:, :, -1].cpu().numpy()
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
                     device: torch.device | None = None) -> np.ndarray:
    """(K+1)×(K+1) confusion counts, rows = GT class (last = background), columns = predicted.

    Per image, detections with score ≥ ``score_thr`` are taken in score order and matched to
    the unmatched non-crowd GT (of any class) with the highest IoU ≥ ``iou_thr`` (the last
    such GT on ties). Vectorised over images, looping over detection rank.
    """
    device = device or torch.device("cpu")
    k = len(gt.cat_ids)
    cm = np.zeros((k + 1, k + 1), np.int64)
    keep = det.score >= score_thr
    reg = ~gt.crowd
    d_img, d_box, d_score = det.image_id[keep], det.bbox[keep], det.score[keep]
    d_cls = np.searchsorted(gt.cat_ids, det.category_id[keep])
    g_img, g_box = gt.image_id[reg], gt.bbox[reg]
    g_cls = np.searchsorted(gt.cat_ids, gt.category_id[reg])
    imgs = np.union1d(np.unique(d_img), np.unique(g_img))
    if len(imgs) == 0:
        return cm
    di = np.searchsorted(imgs, d_img)
    gi = np.searchsorted(imgs, g_img)
    d_order = np.lexsort([-d_score, di])
    d_cnt = np.bincount(di, minlength=len(imgs))
    d_rank = np.arange(len(d_order)) - np.repeat(np.r_[0, np.cumsum(d_cnt)[:-1]], d_cnt)
    g_order = np.argsort(gi, kind="stable")
    g_cnt = np.bincount(gi, minlength=len(imgs))
    g_slot = np.arange(len(g_order)) - np.repeat(np.r_[0, np.cumsum(g_cnt)[:-1]], g_cnt)
    n, gmax, dmax = len(imgs), max(1, int(g_cnt.max())), int(d_cnt.max()) if len(d_cnt) else 0
    gb = np.zeros((n, gmax, 4))
    gb[gi[g_order], g_slot] = g_box[g_order]
    gv = np.zeros((n, gmax), bool)
    gv[gi[g_order], g_slot] = True
    gc = np.full((n, gmax), k, np.int64)
    gc[gi[g_order], g_slot] = g_cls[g_order]
    db = np.zeros((n, max(dmax, 1), 4))
    db[di[d_order], d_rank] = d_box[d_order]
    dc = np.full((n, max(dmax, 1)), -1, np.int64)
    dc[di[d_order], d_rank] = d_cls[d_order]
    g_box_t = torch.as_tensor(gb, device=device)
    used = ~torch.as_tensor(gv, device=device)  # padding counts as used
    no_crowd = torch.zeros((n, gmax), dtype=torch.bool, device=device)
    pairs = []
    img_by_count = np.argsort(-d_cnt, kind="stable")
    g_box_t, used, no_crowd = g_box_t[img_by_count], used[img_by_count], no_crowd[img_by_count]
    db, dc, gc_sorted = db[img_by_count], dc[img_by_count], gc[img_by_count]
    idx = torch.arange(gmax, device=device)
    for d in range(dmax):
        a = int((d_cnt[img_by_count] > d).sum())
        iou = _bbox_iou(torch.as_tensor(db[:a, d], device=device), g_box_t[:a], no_crowd[:a])
        cand = torch.where(~used[:a] & (iou >= iou_thr), iou, torch.full_like(iou, -1.0))
        best_val = cand.max(-1, keepdim=True).values
        last = torch.where(cand == best_val, idx, torch.full_like(idx, -1)).max(-1).values
        hit = best_val[:, 0] >= 0
        used[:a] |= (idx[None, :] == last[:, None]) & hit[:, None]
        rows = np.arange(a)
        g_of = np.where(hit.cpu().numpy(), gc_sorted[rows, last.clamp(min=0).cpu().numpy()], k)
        pairs.append((g_of, dc[:a, d]))
    if pairs:
        g_all = np.concatenate([p[0] for p in pairs])
        d_all = np.concatenate([p[1] for p in pairs])
        np.add.at(cm, (g_all, d_all), 1)
    unmatched = (~used).cpu().numpy()
    np.add.at(cm, (gc_sorted[unmatched], np.full(int(unmatched.sum()), k)), 1)
    return cm


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: Any,
    *,
    class_stats: ClassStats | None = None,
    device: str | torch.device | None = None,
    confusion_iou: float = 0.5,
    confusion_score: float = 0.25,
) -> dict[str, Any]:
    """Evaluate bbox detections exactly as pycocotools' COCOeval does, plus per-class and tail metrics.

    Args:
        gt: COCO ground-truth dict or JSON path.
        detections: COCO results list or JSON path, or a dict of arrays/tensors
            (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``).
        class_stats: training-split statistics that define the tail set (METHOD.md §1);
            None derives them from this ground truth (the result says so).
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available).
        confusion_iou, confusion_score: thresholds of the confusion matrix.

    Returns:
        ``stats`` (12 numbers, pycocotools' order), ``stat_names``, ``precision``
        [T×R×K×A×M], ``recall`` [T×K×A×M], ``scores``, ``class_names``, ``category_ids``,
        ``per_class_ap`` / ``per_class_ap50`` / ``per_class_ar100`` (−1 where a class has no
        GT), ``num_gt``, ``map_tail``, ``map50_tail``, ``tail_classes``, ``tail_rule``,
        ``tail_excluded`` (tail classes without GT here), ``confusion``, ``pr_curves``
        (precision at IoU 0.5 per class over ``rec_thrs``), ``dropped_detections``.

    Raises:
        ValueError: detections for images not in the GT, NaN/negative-size boxes, a GT
            annotation without ``area`` — with the offending value named.
    """
    data, source = _load_gt(gt)
    g = _GroundTruth(data, source)
    dets, dropped = _check_dets(DetectionArrays.from_any(detections), g)
    dev = _resolve_device(device)
    matched = _match(g, dets, dev)
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

    return {
        "stats": stats.tolist(),
        "stat_names": list(STAT_NAMES),
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
        "confusion": confusion_matrix(g, dets, iou_thr=confusion_iou, score_thr=confusion_score, device=dev),
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

    def process(self, detections: Iterable[Mapping[str, Any]] | Mapping[str, Any] | DetectionArrays) -> None:
        """Add a batch of detections (results list, dict of arrays/tensors)."""
        self._parts.append(DetectionArrays.from_any(detections if not isinstance(detections, Iterable)
                                                    or isinstance(detections, (Mapping, DetectionArrays))
                                                    else list(detections)))

    def evaluate(self) -> dict[str, Any]:
        """Evaluate everything processed; ``{"bbox": {name: value}, ...full result}``."""
        dets = DetectionArrays.from_any([])
        for part in self._parts:
            dets = dets.concat(part)
        res = evaluate_coco(self.gt, dets, class_stats=self.class_stats, device=self.device)
        res["bbox"] = {n: (float("nan") if v < 0 else 100.0 * v) for n, v in zip(STAT_NAMES, res["stats"])}
        return res
