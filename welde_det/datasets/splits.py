"""Patient-level stratified train/val/test splits of a COCO dataset.

A patient (or any grouping key) is never split across train/val/test: all images of a
patient land in one split. Within that constraint the class proportions of every split
follow the requested fractions as closely as possible, rare classes first, using a
grouped form of iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML 2011):

1. every group (patient) gets a label vector: its number of boxes of each class, and a
   size: its number of images;
2. each split ``s`` wants ``fraction_s * total_c`` boxes of class ``c`` and
   ``fraction_s * total_images`` images;
3. repeatedly take the class with the fewest boxes still unassigned, and give each
   unassigned group carrying it (largest count first, seeded random tie-break) to the
   split that still wants the most of that class (ties: the split that still wants the
   most images, then a seeded random choice); update the wants;
4. groups without boxes (background-only patients) go to the split that still wants the
   most images;
5. (``refine=True``, the default) a local search then moves single groups between splits
   while that lowers the squared error of every class's share and of the image share
   (``sum_s,c ((n_sc - f_s n_c) / n_c)^2``): the greedy pass places the most common class
   last, when few groups are left, and could miss its fractions by several points.

The default fractions are 70/15/15, the ratio of the LMF papers.

Example:
    >>> parts = split_coco(coco, (0.7, 0.15, 0.15), seed=0)  # doctest: +SKIP
    >>> sorted(parts)  # doctest: +SKIP
    ['test', 'train', 'val']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from welde_det.errors import UserError

__all__ = [
    "DEFAULT_FRACTIONS",
    "SplitError",
    "assign_groups",
    "split_coco",
    "split_image_ids",
    "split_summary",
    "subset_coco",
]

logger = logging.getLogger(__name__)

#: Default train/val/test fractions (70/15/15, the LMF papers' ratio).
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.70, "val": 0.15, "test": 0.15}


class SplitError(UserError):
    """Bad split fractions, or images that lack the grouping key."""


def _normalise_fractions(fractions: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    if isinstance(fractions, Mapping):
        named = {str(k): float(v) for k, v in fractions.items()}
    else:
        values = [float(v) for v in fractions]
        default_names = list(DEFAULT_FRACTIONS)
        if not 1 <= len(values) <= len(default_names):
            raise SplitError(
                f"give 1 to {len(default_names)} fractions for {default_names} (or a mapping), got {values}"
            )
        named = dict(zip(default_names, values))
    if not named:
        raise SplitError("no split fractions given")
    for name, frac in named.items():
        if not math.isfinite(frac) or frac < 0:
            raise SplitError(f"split {name!r} has fraction {frac}; fractions must be finite and >= 0")
    total = sum(named.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitError(f"split fractions {named} sum to {total:.6g}, not 1")
    return named


def assign_groups(
    counts: np.ndarray,
    sizes: np.ndarray,
    fractions: Sequence[float],
    *,
    seed: int = 0,
    refine: bool = True,
) -> np.ndarray:
    """Assign groups to splits by grouped iterative stratification.

    Args:
        counts: per-group instance counts per class.
        sizes: per-group size (number of images), used to balance split sizes.
        fractions: wanted fraction of every class and of the images per split (sum 1).
        seed: seed of the random tie-breaks; the result is a pure function of the inputs.
        refine: improve the greedy assignment by single-group moves (module docstring, 5).

    Returns:
        Split index of every group.

    Shape:
        counts: ``(G, C)``; sizes: ``(G,)``; returns ``(G,)`` int64 in ``0..S-1``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    frac = np.asarray(fractions, dtype=np.float64)
    if counts.ndim != 2 or sizes.shape != (counts.shape[0],):
        raise SplitError(f"counts must be (G, C) and sizes (G,), got {counts.shape} and {sizes.shape}")
    num_groups = counts.shape[0]
    rng = np.random.default_rng(seed)
    want_class = frac[:, None] * counts.sum(0)[None, :]  # (S, C)
    want_size = frac * sizes.sum()  # (S,)
    assigned = np.full(num_groups, -1, dtype=np.int64)
    # Random order first, then stable sorts: ties between groups fall in seeded order.
    order_noise = rng.permutation(num_groups)

    def place(group: int, split_scores: np.ndarray) -> None:
        candidates = np.flatnonzero(frac > 0)
        best = candidates[split_scores[candidates] == split_scores[candidates].max()]
        if len(best) > 1:
            sizes_left = want_size[best]
            best = best[sizes_left == sizes_left.max()]
        choice = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        assigned[group] = choice
        want_class[choice] -= counts[group]
        want_size[choice] -= sizes[group]

    remaining = counts.copy()
    while True:
        left = remaining[assigned < 0].sum(0)
        active = np.flatnonzero(left > 0)
        if len(active) == 0:
            break
        cls = int(active[np.argmin(left[active])])
        groups = np.flatnonzero((assigned < 0) & (counts[:, cls] > 0))
        groups = groups[np.argsort(order_noise[groups], kind="stable")]
        groups = groups[np.argsort(-counts[groups, cls], kind="stable")]
        for g in groups:
            place(int(g), want_class[:, cls].copy())
    for g in np.flatnonzero(assigned < 0)[np.argsort(order_noise[assigned < 0], kind="stable")]:
        place(int(g), want_size.copy())
    if refine:
        _refine(assigned, counts, sizes, frac, order_noise)
    return assigned


def _refine(assigned: np.ndarray, counts: np.ndarray, sizes: np.ndarray, frac: np.ndarray,
            order: np.ndarray, max_passes: int = 50) -> None:
    """Move single groups between splits while the squared share error falls (in place)."""
    num_splits = len(frac)
    totals = np.concatenate([counts.sum(0), [sizes.sum()]])  # classes, then images
    scale = np.where(totals > 0, totals, 1.0)
    vec = np.concatenate([counts, sizes[:, None]], axis=1)  # (G, C + 1)
    target = frac[:, None] * totals[None, :]
    current = np.stack([vec[assigned == s].sum(0) for s in range(num_splits)])
    allowed = np.flatnonzero(frac > 0)

    def row_cost(row: np.ndarray, s: int) -> float:
        return float((((row - target[s]) / scale) ** 2).sum())

    visit = np.argsort(order, kind="stable")
    for _ in range(max_passes):
        moved = False
        for g in visit:
            src = int(assigned[g])
            if not vec[g].any():
                continue
            base_src = row_cost(current[src], src)
            best, best_gain = -1, 1e-12
            for dst in allowed:
                if dst == src:
                    continue
                gain = (base_src + row_cost(current[dst], int(dst))
                        - row_cost(current[src] - vec[g], src) - row_cost(current[dst] + vec[g], int(dst)))
                if gain > best_gain:
                    best, best_gain = int(dst), gain
            if best >= 0:
                current[src] -= vec[g]
                current[best] += vec[g]
                assigned[g] = best
                moved = True
        if not moved:
            break


def split_image_ids(
    coco: Mapping[str, Any],
    fractions: Mapping[str, float] | Sequence[float] = (0.70, 0.15, 0.15),
    *,
    seed: int = 0,
    group_key: str | None = "patient_id",
) -> dict[str, list[int]]:
    """Image ids of each split; all images sharing ``group_key`` stay together.

    Args:
        coco: COCO dict (validated by the caller or :func:`welde_det.datasets.load_coco`).
        fractions: ``{"train": .7, "val": .15, "test": .15}`` or a sequence in that order.
        seed: random tie-break seed.
        group_key: image field naming the patient; ``None`` splits images independently
            (only sound when each image is its own patient).

    Returns:
        ``{split: sorted image ids}`` for every named split (possibly empty).

    Raises:
        SplitError: bad fractions, or an image without ``group_key`` (its id is named).
    """
    named = _normalise_fractions(fractions)
    cats = sorted(int(c["id"]) for c in coco["categories"])
    cat_index = {cid: i for i, cid in enumerate(cats)}
    group_of: dict[int, Any] = {}
    for img in coco["images"]:
        if group_key is None:
            group_of[img["id"]] = ("image", img["id"])
        elif img.get(group_key) in (None, ""):
            raise SplitError(
                f"image id {img['id']} ({img.get('file_name')!r}) has no {group_key!r}; "
                "pass group_key=None to split images independently"
            )
        else:
            group_of[img["id"]] = img[group_key]
    keys = sorted(set(group_of.values()), key=str)
    gindex = {k: i for i, k in enumerate(keys)}
    counts = np.zeros((len(keys), len(cats)), dtype=np.int64)
    sizes = np.zeros(len(keys), dtype=np.int64)
    for key in group_of.values():
        sizes[gindex[key]] += 1
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        counts[gindex[group_of[ann["image_id"]]], cat_index[int(ann["category_id"])]] += 1
    split_names = list(named)
    assigned = assign_groups(counts, sizes, [named[s] for s in split_names], seed=seed)
    out: dict[str, list[int]] = {s: [] for s in split_names}
    for img_id, key in group_of.items():
        out[split_names[assigned[gindex[key]]]].append(int(img_id))
    for ids in out.values():
        ids.sort()
    logger.info(
        "split %d groups / %d images: %s",
        len(keys),
        len(group_of),
        ", ".join(f"{s}={len(ids)}" for s, ids in out.items()),
    )
    return out


def subset_coco(coco: Mapping[str, Any], image_ids: Sequence[int]) -> dict[str, Any]:
    """The images in ``image_ids`` with their annotations; categories and info are kept."""
    keep = set(int(i) for i in image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [img for img in coco["images"] if img["id"] in keep]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return out


def split_coco(
    coco: Mapping[str, Any],
    fractions: Mapping[str, float] | Sequence[float] = (0.70, 0.15, 0.15),
    *,
    seed: int = 0,
    group_key: str | None = "patient_id",
) -> dict[str, dict[str, Any]]:
    """Split a COCO dict into per-split COCO dicts (see :func:`split_image_ids`)."""
    ids = split_image_ids(coco, fractions, seed=seed, group_key=group_key)
    return {name: subset_coco(coco, split_ids) for name, split_ids in ids.items()}


def split_summary(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-split image/box counts and each split's share of every class.

    Returns:
        ``{"images": {split: n}, "boxes": {split: {class: n}}, "share": {split: {class: f}}}``
        where ``share`` is the split's fraction of all boxes of that class (NaN if none).
    """
    names: dict[int, str] = {}
    for data in splits.values():
        names.update({int(c["id"]): c["name"] for c in data["categories"]})
    boxes = {s: dict.fromkeys(names.values(), 0) for s in splits}
    for s, data in splits.items():
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                boxes[s][names[int(ann["category_id"])]] += 1
    totals = {n: sum(boxes[s][n] for s in splits) for n in names.values()}
    share = {
        s: {n: (boxes[s][n] / totals[n] if totals[n] else math.nan) for n in names.values()}
        for s in splits
    }
    return {
        "images": {s: len(d["images"]) for s, d in splits.items()},
        "boxes": boxes,
        "share": share,
    }
