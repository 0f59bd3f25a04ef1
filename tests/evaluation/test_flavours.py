"""The Ultralytics flavour against Ultralytics' own functions (``box_iou``,
``DetectionValidator.match_predictions``, ``ap_per_class``), image by image as its validator
does, on random cases: images without GT, classes without detections, detections of classes
without GT, crowd boxes (dropped), duplicates around one GT.

Scores are distinct (Ultralytics sorts them with an unstable ``np.argsort``), boxes are
random floats (so no two IoUs tie exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics")
from ultralytics.models.yolo.detect.val import DetectionValidator
from ultralytics.utils.metrics import ap_per_class, box_iou

from welde_det.evaluation import evaluate_coco
from welde_det.evaluation.flavours import (
    candidate_edges,
    stable_lexsort,
    ultralytics_map,
    ultralytics_match,
)


def make_case(seed, *, n_img=15, n_cls=5, crowd_p=0.1):
    """COCO dict + results list; class n_cls-1 never has GT, class 0 never has detections."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 + 7 * i, "width": 200, "height": 200} for i in range(n_img)]
    cats = [{"id": 3 + 2 * c, "name": f"c{c}"} for c in range(n_cls)]
    anns, dets, aid = [], [], 1
    for k, img in enumerate(images):
        n_gt = 0 if k % 4 == 3 else rng.integers(1, 9)  # every 4th image has no GT
        own = []
        for _ in range(n_gt):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 60, 2)
            cat = cats[rng.integers(0, n_cls - 1)]["id"]
            crowd = int(rng.random() < crowd_p)
            anns.append({"id": aid, "image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})
            own.append((x, y, w, h, cat))
            aid += 1
        for _ in range(rng.integers(0, 25)):
            if own and rng.random() < 0.7:
                x, y, w, h, cat = own[rng.integers(0, len(own))]
                b = [x + rng.normal(0, 3), y + rng.normal(0, 3), abs(w + rng.normal(0, 3)) + 1,
                     abs(h + rng.normal(0, 3)) + 1]
                if rng.random() < 0.2:
                    cat = cats[rng.integers(1, n_cls)]["id"]
            else:
                b = [*rng.uniform(0, 150, 2), *rng.uniform(5, 60, 2)]
                cat = cats[rng.integers(1, n_cls)]["id"]
            if cat == cats[0]["id"]:
                cat = cats[1]["id"]  # class 0: GT but never a detection
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": [float(v) for v in b],
                         "score": float(rng.random())})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def reference(gt, dets):
    """Ultralytics' DetectionValidator path: per image box_iou + match_predictions, then ap_per_class."""
    validator = DetectionValidator.__new__(DetectionValidator)
    validator.iouv = torch.linspace(0.5, 0.95, 10)
    cat_index = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}

    def xyxy(b):
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]

    tps, confs, pcls, tcls, per_det = [], [], [], [], {}
    for img in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        idx = [i for i, d in enumerate(dets) if d["image_id"] == img["id"]]
        idx.sort(key=lambda i: -dets[i]["score"])  # NMS output order: by confidence
        g_cls = torch.tensor([cat_index[a["category_id"]] for a in g], dtype=torch.float32)
        p_cls = torch.tensor([cat_index[dets[i]["category_id"]] for i in idx], dtype=torch.float32)
        if len(g) and len(idx):
            iou = box_iou(torch.tensor([xyxy(a["bbox"]) for a in g], dtype=torch.float64),
                          torch.tensor([xyxy(dets[i]["bbox"]) for i in idx], dtype=torch.float64))
            tp = validator.match_predictions(p_cls, g_cls, iou).numpy()
        else:
            tp = np.zeros((len(idx), 10), bool)
        for i, row in zip(idx, tp):
            per_det[i] = row
        tps.append(tp)
        confs.append(np.array([dets[i]["score"] for i in idx]))
        pcls.append(p_cls.numpy())
        tcls.append(g_cls.numpy())
    out = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))
    ap, classes = out[5], out[6]
    tp_all = np.array([per_det[i] for i in range(len(dets))]).reshape(len(dets), 10)
    return ap, classes, tp_all


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_matches_ultralytics_functions(seed):
    gt, dets = make_case(seed)
    ap, classes, tp_ref = reference(gt, dets)
    res = evaluate_coco(gt, dets, device="cpu")
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    u = res["ultralytics"]
    assert list(u["per_class"]) == [names[c] for c in classes]
    np.testing.assert_allclose(list(u["per_class"].values()), ap.mean(1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(list(u["per_class_ap50"].values()), ap[:, 0], rtol=0, atol=1e-12)
    assert u["map"] == pytest.approx(ap.mean(), abs=1e-12)
    assert u["map50"] == pytest.approx(ap[:, 0].mean(), abs=1e-12)
    # detection by detection, every threshold
    cat_index = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    img_index = {im["id"]: k for k, im in enumerate(gt["images"])}
    a = gt["annotations"]
    ours = ultralytics_map(
        np.array([img_index[x["image_id"]] for x in a]), np.array([cat_index[x["category_id"]] for x in a]),
        np.array([x["bbox"] for x in a]), np.array([bool(x["iscrowd"]) for x in a]),
        np.array([img_index[d["image_id"]] for d in dets]), np.array([cat_index[d["category_id"]] for d in dets]),
        np.array([d["bbox"] for d in dets]), np.array([d["score"] for d in dets]))
    np.testing.assert_array_equal(ours.tp, tp_ref)
    # the case covers what it claims
    assert 0 in classes and names[0] not in {names[cat_index[d["category_id"]]] for d in dets}
    assert len(names) - 1 not in classes and any(cat_index[d["category_id"]] == len(names) - 1 for d in dets)
    assert any(x["iscrowd"] for x in a) or seed > 2


def test_crowd_boxes_are_dropped():
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100,
                           "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}]
    u = evaluate_coco(gt, dets, device="cpu")["ultralytics"]
    # one GT (the crowd box is gone): precision 0 then 1/2, reaching recall 1. Ultralytics'
    # sentinels put precision 0 at recall 1 itself, so the interpolated envelope is 0.5 on
    # [0, 0.99] and falls to 0 at 1: 0.5 * 0.99 + (0.5 + 0) / 2 * 0.01 = 0.4975 (at every IoU)
    assert u["map50"] == pytest.approx(0.4975, abs=1e-12)
    assert u["per_class"] == {"a": pytest.approx(0.4975, abs=1e-12)}
    # pycocotools keeps the crowd box as an ignored region: the first detection is ignored
    res = evaluate_coco(gt, dets, device="cpu")
    assert res["stats"][1] == pytest.approx(1.0, abs=1e-12)


def test_greedy_takes_highest_iou_unclaimed_in_score_order():
    # GT A [0,0,10,10], GT B [2,0,10,10]; det 1 (0.9) overlaps B better, det 2 (0.8) is on A
    gt_xyxy = np.array([[0.0, 0, 10, 10], [2.0, 0, 12, 10]])
    d_xyxy = np.array([[1.9, 0, 11.9, 10], [0.0, 0, 10, 10], [2.0, 0, 12, 10]])
    tp = ultralytics_match(np.array([0, 0]), np.array([0, 0]), gt_xyxy,
                           np.array([0, 0, 0]), np.array([0, 0, 0]), d_xyxy, np.array([0.9, 0.8, 0.7]))
    assert tp[:, 0].tolist() == [True, True, False]  # det 3 finds both GTs taken at IoU 0.5
    # at IoU 0.95: det 1 has IoU 0.98 with B -> TP; det 2 exact on A -> TP; det 3 nothing left
    assert tp[:, 9].tolist() == [True, True, False]


def test_no_gt_and_no_detections():
    r = ultralytics_map(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 4)), np.zeros(0, bool),
                        np.array([0]), np.array([1]), np.array([[0.0, 0, 5, 5]]), np.array([0.5]))
    assert r.map == 0.0 and r.map50 == 0.0 and r.ap.shape == (0, 10)
    assert not r.tp.any()


def test_helpers():
    iou_of = {(0, 1): 0.7, (0, 2): 0.2, (1, 0): 0.5, (2, 1): 0.9, (2, 2): 0.6}
    seen = []

    def iou_fn(ed, eg):
        seen.extend(zip(ed.tolist(), eg.tolist()))
        return torch.tensor([iou_of[p] for p in zip(ed.tolist(), eg.tolist())], dtype=torch.float64)

    e_det, e_gt, iou = candidate_edges(np.array([5, 7, 5, 9]), np.array([7, 5, 5, 1]), iou_fn, 0.5,
                                       torch.device("cpu"))
    assert seen == [(0, 1), (0, 2), (1, 0), (2, 1), (2, 2)]  # every pair sharing a group, no other
    assert list(zip(e_det.tolist(), e_gt.tolist(), iou.tolist())) == [(0, 1, 0.7), (1, 0, 0.5), (2, 1, 0.9),
                                                                      (2, 2, 0.6)]
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 70000, 500), rng.random(500).round(1), rng.integers(0, 3, 500)]
    np.testing.assert_array_equal(stable_lexsort(keys), np.lexsort(keys))


def test_many_pairs_span_several_chunks():
    """> 64k candidate pairs: generated and measured in several chunks, same result."""
    rng = np.random.default_rng(7)
    anns = [{"id": i + 1, "image_id": 1 + i % 2, "category_id": 1, "bbox": [*rng.uniform(0, 100, 2), 40.0, 40.0],
             "area": 1600.0, "iscrowd": 0} for i in range(600)]
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}], "annotations": anns}
    dets = [{"image_id": 1 + i % 2, "category_id": 1, "bbox": [*rng.uniform(0, 100, 2), 40.0, 40.0],
             "score": float(rng.random())} for i in range(500)]
    ap, _classes, tp_ref = reference(gt, dets)  # 2 images x 300 GT x 250 dets = 150k pairs
    u = evaluate_coco(gt, dets, device="cpu")["ultralytics"]
    assert u["map"] == pytest.approx(ap.mean(), abs=1e-12)
    ours = ultralytics_map(np.array([a["image_id"] for a in anns]), np.zeros(600, int),
                           np.array([a["bbox"] for a in anns]), np.zeros(600, bool),
                           np.array([d["image_id"] for d in dets]), np.zeros(500, int),
                           np.array([d["bbox"] for d in dets]), np.array([d["score"] for d in dets]))
    np.testing.assert_array_equal(ours.tp, tp_ref)


@pytest.mark.parametrize("seed", range(4))
def test_shared_candidates_change_nothing(seed):
    """evaluate_coco hands the Ultralytics flavour the COCO matcher's intersecting pairs
    (float64) instead of letting it search its own (float32 IoU >= 0.5): the same tp, on
    boxes built to sit at IoU 0.5 within float32 rounding, at large coordinates, and crowd."""
    from welde_det.evaluation.coco_eval import DetectionArrays, _GroundTruth, _pair_edges

    gt, dets = make_case(seed, crowd_p=0.2)
    rng = np.random.default_rng(100 + seed)
    for d in dets[::3]:  # half-overlapping copies: IoU exactly around 0.5 (1/3 of union)
        x, y, w, h = d["bbox"]
        dets.append({**d, "bbox": [x + w / 3.0, y, w, h], "score": float(rng.random())})
    for a in gt["annotations"][::4]:  # far from the origin: float32 coordinates round coarsely
        a["bbox"] = [a["bbox"][0] + 1e5, *a["bbox"][1:]]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5,
                     "bbox": [a["bbox"][0] + 1e-3, a["bbox"][1], a["bbox"][2] * 0.5 + 2e-3, a["bbox"][3]]})
    g = _GroundTruth(gt, "gt")
    d = DetectionArrays.from_any(dets)
    e_det, e_gt, _ = _pair_edges(g, d, torch.device("cpu"), None)
    args = (np.searchsorted(g.img_ids, g.image_id), np.searchsorted(g.cat_ids, g.category_id), g.bbox, g.crowd,
            np.searchsorted(g.img_ids, d.image_id), np.searchsorted(g.cat_ids, d.category_id), d.bbox, d.score)
    alone = ultralytics_map(*args)
    shared = ultralytics_map(*args, candidates=(e_det, e_gt))
    assert alone.tp.any() and alone.tp[:, 0].sum() > alone.tp[:, -1].sum()
    np.testing.assert_array_equal(shared.tp, alone.tp)
    np.testing.assert_array_equal(shared.ap, alone.ap)
