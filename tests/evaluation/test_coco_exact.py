"""The evaluator against pycocotools: every stat to 1e-12, precision/recall element-wise.

Random datasets (hypothesis) cover crowd boxes, boxes exactly on the area boundaries,
tied scores, more than 100 detections per image and category, empty images, categories
without GT, integer and float boxes.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from welde_det.evaluation import CocoEvaluator, DetectionArrays, evaluate_coco
from welde_det.evaluation.coco_eval import _GroundTruth, _match, confusion_matrix

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pycoco(gt, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets)) if dets else COCO()
        if not dets:
            res.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            res.createIndex()
        ev = COCOeval(coco, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def make_dataset(seed, *, n_img=12, n_cat=4, max_gt=7, max_det=60, crowd_p=0.1, integer=False, many_dets=False):
    rng = np.random.default_rng(seed)
    images = [{"id": 3 * i + 2, "width": 300, "height": 300} for i in range(n_img)]
    cats = [{"id": 5 * c + 1, "name": f"class{c}"} for c in range(n_cat)]
    empty_cat = cats[-1]["id"]  # never gets GT
    anns, dets, aid = [], [], 1

    def box():
        kind = rng.integers(0, 4)
        x, y = rng.uniform(0, 200, 2)
        if kind == 0:
            w, h = 32.0, 32.0  # area exactly 32^2
        elif kind == 1:
            w, h = 96.0, 96.0  # area exactly 96^2
        else:
            w, h = rng.uniform(1, 140, 2)
        if integer:
            x, y, w, h = (float(int(v)) for v in (x, y, max(w, 1), max(h, 1)))
        return [float(x), float(y), float(w), float(h)]

    for img in images[:-1]:  # last image is empty
        for _ in range(rng.integers(0, max_gt + 1)):
            b = box()
            area = b[2] * b[3] if rng.random() < 0.8 else float(rng.choice([32.0**2, 96.0**2]))
            anns.append({"id": aid, "image_id": img["id"], "category_id": int(cats[rng.integers(0, n_cat - 1)]["id"]),
                         "bbox": b, "area": area, "iscrowd": int(rng.random() < crowd_p)})
            aid += 1
    for img in images:
        n = rng.integers(0, max_det + 1)
        if many_dets and img is images[0]:
            n = 130
        own = [a for a in anns if a["image_id"] == img["id"]]
        for _ in range(n):
            if own and rng.random() < 0.6:
                g = own[rng.integers(0, len(own))]
                b = [v + rng.normal(0, 4) for v in g["bbox"]]
                b[2], b[3] = abs(b[2]) + 0.5, abs(b[3]) + 0.5
                cat = g["category_id"] if rng.random() < 0.8 else int(cats[rng.integers(0, n_cat)]["id"])
            else:
                b, cat = box(), int(cats[rng.integers(0, n_cat)]["id"])
            if many_dets and img is images[0]:
                cat = int(cats[0]["id"])
            score = float(np.round(rng.random(), 1))  # many ties
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": [float(v) for v in b], "score": score})
    assert all(a["category_id"] != empty_cat for a in anns)
    return {"images": images, "annotations": anns, "categories": cats}, dets


def assert_exact(gt, dets, device="cpu"):
    ref = pycoco(gt, dets)
    ours = evaluate_coco(gt, dets, device=device)
    np.testing.assert_allclose(ours["stats"], ref.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["precision"], ref.eval["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["recall"], ref.eval["recall"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["scores"], ref.eval["scores"], rtol=0, atol=1e-12)
    return ours, ref


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), integer=st.booleans(), crowd=st.sampled_from([0.0, 0.15, 0.5]),
       n_cat=st.integers(2, 5))
def test_property_matches_pycocotools(seed, integer, crowd, n_cat):
    gt, dets = make_dataset(seed, integer=integer, crowd_p=crowd, n_cat=n_cat)
    assert_exact(gt, dets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_more_than_100_detections_per_image_and_category(seed):
    gt, dets = make_dataset(seed, many_dets=True)
    assert sum(d["image_id"] == gt["images"][0]["id"] for d in dets) >= 130
    assert_exact(gt, dets)


def test_no_detections_and_no_gt_categories():
    gt, _dets = make_dataset(7)
    ours, ref = assert_exact(gt, [])
    assert ours["stats"] == pytest.approx(list(ref.stats))
    assert (ours["precision"][:, :, -1] == -1).all()  # category without GT stays -1


def test_gt_id_zero_quirk():
    gt, dets = make_dataset(11)
    gt["annotations"][0]["id"] = 0  # pycocotools treats a match to GT id 0 as unmatched
    assert_exact(gt, dets)


def test_input_forms_agree(tmp_path):
    import json

    gt, dets = make_dataset(3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    a = evaluate_coco(tmp_path / "gt.json", tmp_path / "dets.json")
    arrays = {"image_id": torch.tensor([d["image_id"] for d in dets]),
              "category_id": torch.tensor([d["category_id"] for d in dets]),
              "bbox": torch.tensor([d["bbox"] for d in dets], dtype=torch.float64),
              "score": torch.tensor([d["score"] for d in dets], dtype=torch.float64)}
    b = evaluate_coco(gt, arrays)
    assert a["stats"] == b["stats"]
    ev = CocoEvaluator(gt)
    ev.process(dets[: len(dets) // 2])
    ev.process(dets[len(dets) // 2:])
    c = ev.evaluate()
    assert c["stats"] == a["stats"]
    assert c["bbox"]["AP"] == pytest.approx(100 * a["stats"][0])


def test_per_class_and_tail_metrics():
    from welde_det.classes import ClassStats

    gt, dets = make_dataset(5, n_cat=4)
    ours, ref = assert_exact(gt, dets)
    for k in range(4):
        p = ref.eval["precision"][:, :, k, 0, 2]
        expected = p[p > -1].mean() if (p > -1).any() else -1
        assert ours["per_class_ap"][k] == pytest.approx(expected)
        p50 = ref.eval["precision"][0, :, k, 0, 2]
        assert ours["per_class_ap50"][k] == pytest.approx(p50[p50 > -1].mean() if (p50 > -1).any() else -1)
    names = [c["name"] for c in gt["categories"]]
    stats = ClassStats(names, [100, 5, 50, 1], category_ids=[c["id"] for c in gt["categories"]])
    res = evaluate_coco(gt, dets, class_stats=stats)
    assert res["tail_classes"] == ["class1", "class3"]
    assert res["tail_excluded"] == ["class3"]  # no GT for the last category
    assert res["map_tail"] == pytest.approx(res["per_class_ap"][1])
    assert res["map50_tail"] == pytest.approx(res["per_class_ap50"][1])


def test_confusion_matrix_by_hand():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9},   # a predicted as b
            {"image_id": 1, "category_id": 1, "bbox": [80, 80, 5, 5], "score": 0.8},   # background predicted a
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.1}]   # below score threshold
    cm = evaluate_coco(gt, dets, confusion_score=0.25)["confusion"]
    assert cm.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_bad_input():
    gt, dets = make_dataset(2)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(gt, [{**dets[0], "image_id": 99999}])
    with pytest.raises(ValueError, match="negative width"):
        evaluate_coco(gt, [{**dets[0], "bbox": [0, 0, -3, 4]}])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_coco(gt, [{**dets[0], "bbox": [0, float("nan"), 3, 4]}])
    no_area = copy.deepcopy(gt)
    del no_area["annotations"][0]["area"]
    with pytest.raises(ValueError, match="has no 'area'"):
        evaluate_coco(no_area, dets)
    # unknown categories are dropped, as pycocotools drops them
    extra = [*dets, {**dets[0], "category_id": 4242}]
    res = evaluate_coco(gt, extra)
    assert res["dropped_detections"] == 1
    assert res["stats"] == evaluate_coco(gt, dets)["stats"]


def as_rows(dets):
    return np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets], dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 4])
def test_array_input_is_exact(seed):
    gt, dets = make_dataset(seed, many_dets=True)
    ref = evaluate_coco(gt, dets, device="cpu")
    rows = as_rows(dets)
    for arr in (rows, torch.from_numpy(rows), rows.tolist()):
        ours = evaluate_coco(gt, arr, device="cpu")
        assert ours["stats"] == ref["stats"]
        np.testing.assert_array_equal(ours["precision"], ref["precision"])
        np.testing.assert_array_equal(ours["scores"], ref["scores"])
        assert ours["ultralytics"] == ref["ultralytics"]
        np.testing.assert_array_equal(ours["confusion"], ref["confusion"])
    # float32 tensors: exact against pycocotools fed the same float32-rounded values
    rows32 = torch.from_numpy(rows).float()
    dets32 = [{"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]),
               "category_id": int(r[6])} for r in rows32.double().numpy()]
    assert_exact(gt, dets32)
    assert evaluate_coco(gt, rows32, device="cpu")["stats"] == evaluate_coco(gt, dets32, device="cpu")["stats"]
    ev = CocoEvaluator(gt, device="cpu")
    ev.process(torch.from_numpy(rows[: len(rows) // 2]))
    ev.process(rows[len(rows) // 2:])
    assert ev.evaluate()["stats"] == ref["stats"]


def test_array_input_errors():
    with pytest.raises(ValueError, match=r"shape \(N, 7\)"):
        DetectionArrays.from_any(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="ids must be integers"):
        DetectionArrays.from_any(np.array([[1.5, 0, 0, 1, 1, 0.5, 1]]))
    with pytest.raises(ValueError, match="bbox must be"):
        DetectionArrays.from_any([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="lacks 'score'"):
        DetectionArrays.from_any([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="malformed"):
        DetectionArrays.from_any([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}])
    d = DetectionArrays.from_any(torch.tensor([[7, 1.0, 2.0, 3.0, 4.0, 0.25, 9]]))
    assert d.image_id.tolist() == [7] and d.category_id.tolist() == [9]
    assert d.bbox.tolist() == [[1.0, 2.0, 3.0, 4.0]] and d.score.tolist() == [0.25]


def test_match_output_contract():
    """Keys other modules build on: one row per kept detection, linked to the input rows."""
    gt, dets = make_dataset(9, many_dets=True)
    g = _GroundTruth(gt, "gt")
    d = DetectionArrays.from_any(dets)
    m = _match(g, d, torch.device("cpu"))
    n = len(m["score"])
    assert n == sum(min(c, 100) for c in np.unique(d.image_id * 1000 + d.category_id, return_counts=True)[1])
    assert m["tp"].shape == m["fp"].shape == (n, 10, 4)
    assert not (m["tp"] & m["fp"]).any()
    np.testing.assert_array_equal(m["score"], d.score[m["det"]])
    np.testing.assert_array_equal(g.img_ids[m["img"]], d.image_id[m["det"]])
    np.testing.assert_array_equal(g.cat_ids[m["cat"]], d.category_id[m["det"]])
    assert m["rank"].max() == 99


def reference_confusion(gt, dets, iou_thr, score_thr):
    """Plain loops: per image, detections by score, best unmatched non-crowd GT (last on ties)."""
    cats = sorted(c["id"] for c in gt["categories"])
    k = len(cats)
    cm = np.zeros((k + 1, k + 1), np.int64)

    def iou(a, b):
        w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        if w <= 0 or h <= 0:
            return 0.0
        inter = w * h
        return inter / ((a[2] * a[3] + b[2] * b[3]) - inter)

    for img in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        used = [False] * len(g)
        ds = sorted((d for d in dets if d["image_id"] == img["id"] and d["score"] >= score_thr),
                    key=lambda d: -d["score"])
        for d in ds:
            best, m = -1.0, -1
            for j, a in enumerate(g):
                v = iou(d["bbox"], a["bbox"])
                if not used[j] and v >= iou_thr and v >= best:
                    best, m = v, j
            row = k if m < 0 else cats.index(g[m]["category_id"])
            if m >= 0:
                used[m] = True
            cm[row, cats.index(d["category_id"])] += 1
        for j, a in enumerate(g):
            if not used[j]:
                cm[cats.index(a["category_id"]), k] += 1
    return cm


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_confusion_matrix_against_loops(seed):
    gt, dets = make_dataset(seed, crowd_p=0.2)
    rng = np.random.default_rng(seed)  # distinct scores: Python's sort and ours agree only up to ties
    for d, s in zip(dets, rng.permutation(len(dets))):
        d["score"] = (s + 1) / (len(dets) + 1)
    g = _GroundTruth(gt, "gt")
    for iou_thr, score_thr in ((0.5, 0.25), (0.3, 0.0)):
        cm = confusion_matrix(g, DetectionArrays.from_any(dets), iou_thr=iou_thr, score_thr=score_thr)
        np.testing.assert_array_equal(cm, reference_confusion(gt, dets, iou_thr, score_thr))


def test_result_keys():
    gt, dets = make_dataset(6)
    res = evaluate_coco(gt, dets, device="cpu")
    assert res["map"] == res["stats"][0] and res["map50"] == res["stats"][1]
    assert list(res["per_class"]) == res["class_names"]
    for k, name in enumerate(res["class_names"]):
        assert res["per_class"][name] == {"ap": res["per_class_ap"][k], "ap50": res["per_class_ap50"][k],
                                          "ar100": res["per_class_ar100"][k], "num_gt": res["num_gt"][k]}
    lean = evaluate_coco(gt, dets, device="cpu", extras=False)
    assert lean["stats"] == res["stats"] and lean["per_class"] == res["per_class"]
    np.testing.assert_array_equal(lean["precision"], res["precision"])
    assert lean["confusion"] is None and lean["ultralytics"] is None
    assert res["confusion"].shape == (5, 5) and set(res["ultralytics"]) == {"map", "map50", "per_class",
                                                                             "per_class_ap50"}


@pytest.mark.gpu
@needs_cuda
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_property_matches_pycocotools_on_cuda(seed):
    gt, dets = make_dataset(seed, crowd_p=0.2)
    assert_exact(gt, dets, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_equals_cpu_everywhere(seed):
    gt, dets = make_dataset(seed, many_dets=True, crowd_p=0.2)
    cpu = evaluate_coco(gt, dets, device="cpu")
    rows = torch.from_numpy(as_rows(dets)).cuda()
    gpu = evaluate_coco(gt, rows, device="cuda")
    assert gpu["device"].startswith("cuda")
    assert gpu["stats"] == cpu["stats"]
    np.testing.assert_array_equal(gpu["precision"], cpu["precision"])
    np.testing.assert_array_equal(gpu["confusion"], cpu["confusion"])
    assert gpu["ultralytics"] == cpu["ultralytics"]


def test_many_pairs_span_several_chunks():
    """> 64k (detection, GT) pairs in the matcher and the confusion matrix: several chunks."""
    rng = np.random.default_rng(3)
    images = [{"id": i + 1} for i in range(8)]
    anns = [{"id": i + 1, "image_id": 1 + i % 8, "category_id": 1 + i % 2, "bbox": [*rng.uniform(0, 60, 2), 30.0, 30.0],
             "area": 900.0, "iscrowd": int(rng.random() < 0.05)} for i in range(8 * 90)]
    gt = {"images": images, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}
    dets = [{"image_id": 1 + i % 8, "category_id": 1 + (i // 8) % 2, "bbox": [*rng.uniform(0, 60, 2), 30.0, 30.0],
             "score": float(rng.random())} for i in range(8 * 200)]
    assert_exact(gt, dets)
    g = _GroundTruth(gt, "gt")
    cm = confusion_matrix(g, DetectionArrays.from_any(dets), iou_thr=0.5, score_thr=0.0)
    np.testing.assert_array_equal(cm, reference_confusion(gt, dets, 0.5, 0.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_code_path_on_cpu_tensors(seed, monkeypatch):
    """The torch (device) code path — what runs on CUDA — run on CPU tensors by turning off
    the NumPy host switch: the same 12 stats and arrays as pycocotools, the same confusion
    matrix and Ultralytics flavour as the host path. No GPU here, but every line of the
    device branches runs."""
    from welde_det.evaluation import coco_eval, flavours

    gt, dets = make_dataset(seed, many_dets=True, crowd_p=0.2)
    host = evaluate_coco(gt, dets, device="cpu")
    monkeypatch.setattr(flavours, "_host_path", lambda device: False)
    calls = []
    device_iou = coco_eval._edge_ious
    monkeypatch.setattr(coco_eval, "_edge_ious", lambda *a: calls.append(a) or device_iou(*a))
    ours, _ = assert_exact(gt, dets, device="cpu")
    assert len(calls) == 2  # the shared pair search and the confusion matrix took the device path
    np.testing.assert_array_equal(ours["confusion"], host["confusion"])
    assert ours["ultralytics"] == host["ultralytics"]
