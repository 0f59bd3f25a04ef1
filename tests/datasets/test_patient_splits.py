"""Patient-level stratified splits: no patient in two splits, class shares near the fractions."""

from __future__ import annotations

import numpy as np
import pytest

from welde_det.classes import LUMBAR_CLASSES, LUMBAR_COUNTS
from welde_det.datasets.coco import make_annotation, make_categories, make_image_entry
from welde_det.datasets.splits import (
    SplitError,
    assign_groups,
    split_coco,
    split_image_ids,
    split_summary,
)

#: Stated tolerance: every split's share of every class with >= 40 boxes is within 0.02 of
#: its fraction (a random patient split misses this by far for the rare classes; the greedy
#: pass alone missed the most common class by up to 0.06 on these sets).
TOLERANCE = 0.02


def _lumbar_like(seed: int, patients: int = 400) -> dict:
    rng = np.random.default_rng(seed)
    p = np.asarray(LUMBAR_COUNTS, float) / sum(LUMBAR_COUNTS)
    images, anns = [], []
    for pat in range(patients):
        for _ in range(int(rng.integers(1, 4))):
            iid = len(images) + 1
            images.append(make_image_entry(iid, f"{iid}.png", width=8, height=8, patient_id=f"p{pat:04d}"))
            for c in rng.choice(6, size=int(rng.integers(0, 7)), p=p):
                anns.append(make_annotation(len(anns) + 1, iid, int(c) + 1, [0, 0, 1, 1]))
    return {"images": images, "annotations": anns, "categories": make_categories(LUMBAR_CLASSES)}


@pytest.mark.parametrize("seed", [0, 1, 2, 6, 8, 9])
def test_no_patient_mixing_and_class_shares_within_tolerance(seed):
    coco = _lumbar_like(seed)
    parts = split_coco(coco, seed=seed)
    patients = {s: {img["patient_id"] for img in d["images"]} for s, d in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(d["images"]) for d in parts.values()) == len(coco["images"])
    assert sum(len(d["annotations"]) for d in parts.values()) == len(coco["annotations"])
    summary = split_summary(parts)
    total = {c: sum(summary["boxes"][s][c] for s in parts) for c in LUMBAR_CLASSES}
    for split, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        for c in LUMBAR_CLASSES:
            if total[c] >= 40:
                assert abs(summary["share"][split][c] - frac) <= TOLERANCE, (split, c, summary["share"][split][c])
        assert abs(summary["images"][split] / len(coco["images"]) - frac) <= 0.05


def test_beats_random_patient_split_on_rare_classes():
    coco = _lumbar_like(5)
    ours = split_summary(split_coco(coco, seed=0))["share"]
    rng = np.random.default_rng(0)
    pats = sorted({img["patient_id"] for img in coco["images"]})
    worst_random = []
    for _ in range(20):
        perm = rng.permutation(pats)
        cut = int(0.7 * len(pats)), int(0.85 * len(pats))
        where = {p: ("train" if i < cut[0] else "val" if i < cut[1] else "test") for i, p in enumerate(perm)}
        parts = {s: {"images": [], "annotations": [], "categories": coco["categories"]} for s in ("train", "val", "test")}
        split_of = {img["id"]: where[img["patient_id"]] for img in coco["images"]}
        for a in coco["annotations"]:
            parts[split_of[a["image_id"]]]["annotations"].append(a)
        share = split_summary(parts)["share"]
        worst_random.append(max(abs(share["val"][c] - 0.15) for c in ("TDB", "Spondylolisthesis")))
    ours_worst = max(abs(ours["val"][c] - 0.15) for c in ("TDB", "Spondylolisthesis"))
    assert ours_worst < np.median(worst_random)


def test_seeded_and_deterministic():
    coco = _lumbar_like(3, patients=100)
    assert split_image_ids(coco, seed=4) == split_image_ids(coco, seed=4)
    assert split_image_ids(coco, seed=4) != split_image_ids(coco, seed=5)


def test_assign_groups_hand_example():
    # four groups, one class; 50/50 split must put 2 boxes on each side
    counts = np.array([[2], [1], [1], [0]])
    sizes = np.array([1, 1, 1, 1])
    out = assign_groups(counts, sizes, [0.5, 0.5], seed=0)
    per_split = [counts[out == s, 0].sum() for s in (0, 1)]
    assert per_split == [2, 2]
    assert sorted(np.bincount(out, minlength=2)) == [2, 2]


def test_zero_fraction_and_mapping():
    coco = _lumbar_like(0, patients=50)
    ids = split_image_ids(coco, {"train": 0.8, "val": 0.2, "test": 0.0})
    assert ids["test"] == [] and ids["train"] and ids["val"]


def test_bad_input():
    coco = _lumbar_like(0, patients=5)
    with pytest.raises(SplitError, match="sum to"):
        split_image_ids(coco, (0.7, 0.2, 0.2))
    with pytest.raises(SplitError, match=">= 0"):
        split_image_ids(coco, (1.2, -0.2))
    del coco["images"][2]["patient_id"]
    with pytest.raises(SplitError, match=r"image id 3 .* has no 'patient_id'"):
        split_image_ids(coco)
    assert sum(len(v) for v in split_image_ids(coco, group_key=None).values()) == len(coco["images"])


def test_refinement_only_lowers_the_share_error():
    coco = _lumbar_like(0)
    cats = sorted(c["id"] for c in coco["categories"])
    pats = sorted({img["patient_id"] for img in coco["images"]})
    pindex = {p: i for i, p in enumerate(pats)}
    of_image = {img["id"]: pindex[img["patient_id"]] for img in coco["images"]}
    counts = np.zeros((len(pats), len(cats)))
    sizes = np.zeros(len(pats))
    for img in coco["images"]:
        sizes[of_image[img["id"]]] += 1
    for a in coco["annotations"]:
        counts[of_image[a["image_id"]], a["category_id"] - 1] += 1
    frac = np.array([0.7, 0.15, 0.15])

    def error(assigned):
        got = np.stack([np.concatenate([counts[assigned == s].sum(0), [sizes[assigned == s].sum()]])
                        for s in range(3)])
        tot = np.concatenate([counts.sum(0), [sizes.sum()]])
        big = tot >= 40  # the classes the tolerance is stated for, and the images
        dev = np.abs(got / tot - frac[:, None])[:, big].max()
        return float((((got - frac[:, None] * tot) / tot) ** 2).sum()), float(dev)

    greedy = error(assign_groups(counts, sizes, frac, seed=0, refine=False))
    refined = error(assign_groups(counts, sizes, frac, seed=0))
    assert refined[0] < greedy[0] and refined[1] <= 0.02 < greedy[1]
