"""FROC: a hand-computed case, agreement with coco-froc-analysis where its definition matches ours,
and the case where it does not."""

from __future__ import annotations

import numpy as np
import pytest

from welde_det.evaluation import froc_analysis
from welde_det.evaluation.froc import sensitivity_at


def _gt(boxes_per_image, n_cat=1):
    images = [{"id": i + 1, "file_name": f"s{i}.png"} for i in range(len(boxes_per_image))]
    anns, aid = [], 1
    for i, boxes in enumerate(boxes_per_image):
        for cat, box in boxes:
            anns.append({"id": aid, "image_id": i + 1, "category_id": cat, "bbox": list(map(float, box)),
                         "area": float(box[2] * box[3]), "iscrowd": 0})
            aid += 1
    return {"images": images, "annotations": anns,
            "categories": [{"id": c + 1, "name": f"c{c + 1}"} for c in range(n_cat)]}


def test_hand_computed_curve():
    # 4 images, 3 lesions of class 1 (images 1, 1, 2); images 3 and 4 have none
    gt = _gt([[(1, (0, 0, 10, 10)), (1, (50, 50, 10, 10))], [(1, (0, 0, 10, 10))], [], []])
    d = lambda img, box, s: {"image_id": img, "category_id": 1, "bbox": list(map(float, box)), "score": s}  # noqa: E731
    dets = [d(1, (0, 0, 10, 10), 0.9),      # TP
            d(3, (0, 0, 10, 10), 0.8),      # FP (no lesion there)
            d(1, (1, 0, 10, 10), 0.7),      # FP: duplicate of the first lesion (IoU 0.82, GT taken)
            d(2, (0, 1, 10, 10), 0.6),      # TP
            d(4, (5, 5, 10, 10), 0.6),      # FP, same score as the TP above (one operating point)
            d(1, (90, 90, 5, 5), 0.1)]      # FP
    res = froc_analysis(gt, dets, rates=(0.125, 0.25, 0.5, 1.0, 2.0))
    c = res["per_class"]["c1"]
    assert c["curve"]["fppi"] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert c["curve"]["sensitivity"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert c["curve"]["score"][1:] == [0.9, 0.8, 0.7, 0.6, 0.1]
    # at 1/8 FP/image only the 0.9 threshold qualifies; 0.75 FP/image is needed for 2/3
    assert c["sensitivity"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert res["mean"]["sensitivity"] == pytest.approx(c["sensitivity"])
    assert res["pooled"]["sensitivity"] == pytest.approx(c["sensitivity"])
    assert c["cpm"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3]))


def test_stricter_iou_and_classes_without_gt():
    gt = _gt([[(1, (0, 0, 10, 10))], [(1, (0, 0, 10, 10))]], n_cat=2)
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [2.0, 0.0, 10.0, 10.0], "score": 0.8},  # IoU 8/12
            {"image_id": 2, "category_id": 2, "bbox": [2.0, 0.0, 10.0, 10.0], "score": 0.8}]
    at50 = froc_analysis(gt, dets, rates=(1.0,))
    at75 = froc_analysis(gt, dets, iou=0.75, rates=(1.0,))
    assert at50["per_class"]["c1"]["sensitivity"] == [1.0]
    assert at75["per_class"]["c1"]["sensitivity"] == [0.5]
    assert np.isnan(at50["per_class"]["c2"]["sensitivity"][0])
    assert at50["mean"]["sensitivity"] == [1.0]  # c2 has no GT: not averaged
    assert at50["per_class"]["c2"]["curve"]["fppi"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="not on the COCO grid"):
        froc_analysis(gt, dets, iou=0.3)
    with pytest.raises(ValueError, match="positive"):
        froc_analysis(gt, dets, rates=(0.0, 1.0))


def test_sensitivity_at_takes_the_best_point_within_the_rate():
    fppi = np.array([0.0, 0.1, 0.3, 0.9, 2.5])
    sens = np.array([0.0, 0.2, 0.5, 0.6, 0.9])
    assert sensitivity_at(fppi, sens, [0.05, 0.1, 0.5, 1, 8]).tolist() == [0.0, 0.2, 0.5, 0.6, 0.9]


def _froc_case(seed, n_img=25, n_cat=3):
    """Lesions on a grid (never overlapping); hits are jittered copies (IoU > 0.7); false positives lie
    far from every lesion and, in an image and class with lesions, only where all of them are hit and
    below the hits' scores — the cases where coco-froc-analysis counts lesion localisations correctly."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 + i, "file_name": f"{i}.png"} for i in range(n_img)]
    anns, dets, aid = [], [], 1
    for im in images:
        for cat in range(1, n_cat + 1):
            n_gt = rng.integers(0, 3)
            boxes = [(40.0 * (2 * j + cat), 40.0 * cat, 30.0, 30.0) for j in range(n_gt)]
            for b in boxes:
                anns.append({"id": aid, "image_id": im["id"], "category_id": cat, "bbox": list(b), "area": 900.0,
                             "iscrowd": 0})
                aid += 1
            hit_all = n_gt == 0 or rng.random() < 0.5
            hits = boxes if hit_all else [b for b in boxes if rng.random() < 0.5]
            hit_scores = rng.uniform(0.45, 1.0, len(hits))
            for b, s in zip(hits, hit_scores):
                jit = rng.uniform(-2, 2, 4)
                dets.append({"image_id": im["id"], "category_id": cat, "score": float(s),
                             "bbox": [b[0] + jit[0], b[1] + jit[1], 30 + jit[2], 30 + jit[3]]})
            if hit_all:
                top = hit_scores.min() if len(hits) else 1.0
                for _ in range(rng.poisson(1.0)):
                    dets.append({"image_id": im["id"], "category_id": cat, "score": float(rng.uniform(0, top)),
                                 "bbox": [float(rng.uniform(600, 900)), float(rng.uniform(600, 900)), 20.0, 25.0]})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cat + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_coco_froc_analysis(seed):
    froc_curve = pytest.importorskip("coco_froc_analysis.froc.froc_curve")
    gt, dets = _froc_case(seed)
    ours = froc_analysis(gt, dets)
    np.random.seed(0)  # its assignment cost has a random term
    for s in np.linspace(0.0, 1.0, 20, endpoint=False):
        ref = froc_curve.froc_point(gt, [dict(d) for d in dets], float(s), True, 0.5)
        for cat in gt["categories"]:
            curve = ours["per_class"][cat["name"]]["curve"]
            i = int(np.sum(np.asarray(curve["score"]) > s)) - 1  # its rule: score > s
            r = ref[cat["id"]]
            assert curve["tp"][i] == r["LL"], (s, cat)
            assert curve["fp"][i] == r["NL"], (s, cat)
            assert curve["sensitivity"][i] == pytest.approx(r["LL"] / r["n_lesions"], abs=1e-15)
            assert curve["fppi"][i] == pytest.approx(r["NL"] / r["n_images"], abs=1e-15)


def test_where_coco_froc_analysis_differs():
    # one lesion and one detection 100 px away: not a localisation at any IoU; coco-froc-analysis
    # 0.2.15 counts min(#GT, #detections) = 1 localisation (its IoU only sets the assignment cost)
    froc_curve = pytest.importorskip("coco_froc_analysis.froc.froc_curve")
    gt = _gt([[(1, (0, 0, 10, 10))]])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [100.0, 100.0, 10.0, 10.0], "score": 0.9}]
    ours = froc_analysis(gt, dets)["per_class"]["c1"]["curve"]
    assert ours["tp"] == [0, 0] and ours["fp"] == [0, 1]
    ref = froc_curve.froc_point(gt, dets, 0.5, True, 0.5)[1]
    assert (ref["LL"], ref["NL"]) == (1, 0)
