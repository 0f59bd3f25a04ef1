"""TIDE-style errors: the matching replay equals the evaluator's, the baseline is pycocotools' AP50,
ΔAP / counts equal tidecv's where the definitions agree, a hand-made case, and the co-location table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.evaluation.test_coco_exact import make_dataset
from welde_det.evaluation import colocation_table, evaluate_coco, match_detections, tide_errors
from welde_det.evaluation.errors import ERROR_TYPES, _classify


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replayed_matching_is_the_evaluators(seed):
    gt, dets = make_dataset(seed, crowd_p=0.2, many_dets=seed == 2)  # ties, crowds, >100 per pair
    matching = match_detections(gt, dets, device="cpu")
    for t, iou in ((0, 0.5), (5, 0.75)):
        c = _classify(matching, iou, 0.1)
        np.testing.assert_array_equal(c["status"] == 1, matching.matched["tp"][:, t, 0])
        np.testing.assert_array_equal(c["status"] == 0, matching.matched["fp"][:, t, 0])
    res = evaluate_coco(gt, dets, device="cpu")
    tide = tide_errors(None, matching)
    assert tide["map"] == pytest.approx(res["stats"][1], abs=1e-12)
    for k, name in enumerate(res["class_names"]):
        if res["per_class_ap50"][k] >= 0:
            assert tide["per_class"][name]["ap"] == pytest.approx(res["per_class_ap50"][k], abs=1e-12)


def _box(img, cat, box, score=None):
    out = {"image_id": img, "category_id": cat, "bbox": [float(v) for v in box]}
    if score is not None:
        out["score"] = score
    return out


def test_hand_made_errors():
    gt = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
          "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
          "annotations": [{**_box(1, 1, (0, 0, 10, 10)), "id": 1, "area": 100.0, "iscrowd": 0},
                          {**_box(1, 2, (50, 50, 10, 10)), "id": 2, "area": 100.0, "iscrowd": 0},
                          {**_box(2, 1, (0, 0, 10, 10)), "id": 3, "area": 100.0, "iscrowd": 0},
                          {**_box(2, 2, (30, 30, 10, 10)), "id": 4, "area": 100.0, "iscrowd": 0}]}
    dets = [_box(1, 1, (0, 0, 10, 10), 0.9),     # TP  A
            _box(1, 1, (0, 1, 10, 10), 0.8),     # duplicate (A GT taken, IoU 0.82)
            _box(1, 1, (50, 50, 10, 10), 0.7),   # classification: sits on the B GT
            _box(2, 1, (5, 0, 10, 10), 0.6),     # localisation: IoU 1/3 with the A GT
            _box(2, 2, (34, 30, 10, 10), 0.5),   # localisation: IoU 6/14 with the B GT
            _box(2, 1, (33, 33, 10, 10), 0.45),  # both: class A on the B box at IoU 49/151
            _box(3, 2, (0, 0, 10, 10), 0.4),     # background: image without GT
            _box(2, 2, (80, 80, 5, 5), 0.3)]     # background: no overlap
    res = tide_errors(gt, dets, device="cpu")
    assert res["counts"] == {"classification": 1, "localisation": 2, "both": 1, "duplicate": 1, "background": 2,
                             "missed": 0}
    assert res["per_class"]["A"]["counts"]["duplicate"] == 1
    assert res["per_class"]["B"]["counts"]["localisation"] == 1
    # A: GT 2; points (score, tp): .9 T, .8 F, .7 F, .6 F, .45 F -> AP 0.5 (recall reaches 1/2 only)
    assert res["per_class"]["A"]["ap"] == pytest.approx(51 / 101)
    # fixing localisation makes A's .6 a TP: recall 1 at precision 2/4 -> AP = (51*1 + 50*0.5)/101
    assert res["per_class"]["A"]["delta"]["localisation"] == pytest.approx((51 + 25) / 101 - 51 / 101)
    # fixing the classification error moves the .7 detection to B as a TP on B's first GT:
    # B points .7 T, .5 F, .4 F, .3 F with 2 GT -> AP 51/101 (was 0); A loses a FP: .9 T .8 F .6 F .45 F
    assert res["per_class"]["B"]["delta"]["classification"] == pytest.approx(51 / 101)
    assert res["per_class"]["A"]["delta"]["classification"] == pytest.approx(0.0)
    assert res["delta_map"]["classification"] == pytest.approx(51 / 202)
    # removing the duplicate raises A's precision at recall 1/2 from 1 to 1: no gain
    assert res["delta_map"]["duplicate"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="bg_iou"):
        tide_errors(gt, dets, fg_iou=0.1, bg_iou=0.2)


def _tide_case(seed, n_img=30, n_cat=3):
    """Continuous scores and boxes (no ties), no crowds, ≤ 100 detections per image, every class
    with a GT count coprime to 100: the cases where tidecv's definitions coincide with ours."""
    rng = np.random.default_rng(seed)
    images = [{"id": 7 + 2 * i} for i in range(n_img)]
    anns, dets, aid = [], [], 1
    for im in images:
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(15, 60, 2)
            cat = int(rng.integers(1, n_cat + 1))
            boxes = [(cat, [x, y, w, h])]
            if rng.random() < 0.25:  # a second class on the same box, as SS and LDB on one disc
                boxes.append((int(cat % n_cat + 1), [x, y, w, h]))
            for c, b in boxes:
                anns.append({"id": aid, "image_id": im["id"], "category_id": c, "bbox": [float(v) for v in b],
                             "area": float(b[2] * b[3]), "iscrowd": 0})
                aid += 1
    for im in images:
        own = [a for a in anns if a["image_id"] == im["id"]]
        for _ in range(rng.integers(0, 12)):
            kind = rng.random()
            if own and kind < 0.8:
                a = own[rng.integers(0, len(own))]
                jitter = rng.choice([2.0, 8.0, 20.0])
                b = [a["bbox"][0] + rng.normal(0, jitter), a["bbox"][1] + rng.normal(0, jitter),
                     a["bbox"][2] * rng.uniform(0.7, 1.3), a["bbox"][3] * rng.uniform(0.7, 1.3)]
                cat = a["category_id"] if rng.random() < 0.75 else int(rng.integers(1, n_cat + 1))
            else:
                b = [*rng.uniform(0, 350, 2), *rng.uniform(10, 50, 2)]
                cat = int(rng.integers(1, n_cat + 1))
            dets.append({"image_id": im["id"], "category_id": cat, "bbox": [float(v) for v in b],
                         "score": float(rng.random())})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cat + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _tidecv(gt, dets):
    tidecv = pytest.importorskip("tidecv")
    from tidecv.errors.main_errors import (
        BackgroundError,
        BoxError,
        ClassError,
        DuplicateError,
        MissedError,
        OtherError,
    )

    g, p = tidecv.Data("gt"), tidecv.Data("preds")
    for im in gt["images"]:
        g.add_image(im["id"], str(im["id"]))
    for c in gt["categories"]:
        g.add_class(c["id"], c["name"])
    for a in gt["annotations"]:
        g.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
    for d in dets:
        p.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    tide = tidecv.TIDE()
    run = tide.evaluate(g, p, mode=tidecv.TIDE.BOX)
    types = dict(zip(ERROR_TYPES, (ClassError, BoxError, OtherError, DuplicateError, BackgroundError, MissedError)))
    return run, types


# recall points where np.linspace(0, 1, 101) and tidecv's k / 100 differ in the last bit
_LINSPACE_OFF = [i for i in range(101) if np.linspace(0, 1, 101)[i] != i / 100]


def _hits_off_point(n: int) -> bool:
    """Whether some recall k/n (k = 1..n) equals one of those points (then the two APs may differ)."""
    return n > 0 and any(i * n % 100 == 0 for i in _LINSPACE_OFF)


@pytest.mark.parametrize("seed", range(6))
def test_matches_tidecv_where_definitions_agree(seed):
    for sub in range(100):  # the first case of this seed whose positive counts avoid those points
        gt, dets = _tide_case(1000 * seed + sub)
        n_gt = np.bincount([a["category_id"] for a in gt["annotations"]], minlength=4)[1:]
        missed = [v["counts"]["missed"] for v in tide_errors(gt, dets, device="cpu")["per_class"].values()]
        if (n_gt > 0).all() and not any(_hits_off_point(int(n)) or _hits_off_point(int(n - m))
                                         for n, m in zip(n_gt, missed)):
            break
    else:
        raise AssertionError("no usable case")
    run, types = _tidecv(gt, dets)
    ours = tide_errors(gt, dets, device="cpu")
    assert ours["map"] == pytest.approx(run.ap / 100, abs=1e-9)
    for name, err in types.items():
        assert ours["counts"][name] == len(run.error_dict[err]), name
        fixed = run.fix_errors(lambda e, err=err: isinstance(e, err))
        assert ours["delta_map"][name] == pytest.approx(fixed.get_mAP() / 100 - run.ap / 100, abs=1e-9), name
        for c in gt["categories"]:
            ref = (fixed.objs[c["id"]].get_ap() - run.ap_data.objs[c["id"]].get_ap()) / 100
            assert ours["per_class"][c["name"]]["delta"][name] == pytest.approx(ref, abs=1e-9), (name, c["name"])
    assert sum(ours["counts"][t] for t in ERROR_TYPES[:5]) > 10  # the case exercises the error types
    assert ours["counts"]["classification"] > 0 and ours["counts"]["localisation"] > 0


def test_colocation_table():
    gt = {"images": [{"id": 1}, {"id": 2}],
          "categories": [{"id": 1, "name": "SS"}, {"id": 2, "name": "LDB"}, {"id": 3, "name": "DDD"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100},  # identical
              {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 2, 10, 10], "area": 100},  # IoU .67 with both
              {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100},
              {"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 5, 10, 10], "area": 100},  # IoU 1/3: no
              {"id": 6, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1}]}
    t = colocation_table(gt)
    assert t["matrix"] == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert t["identical"] == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert t["pairs"][0] == {"classes": ["SS", "LDB"], "count": 1, "identical": 1}
    assert len(t["pairs"]) == 3
    assert colocation_table(gt, iou=0.3)["matrix"][0][1] == 2


LUMBAR6 = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "lumbar6"


def _yolo_split_as_coco(split: str, size: int = 384) -> dict:
    names = ["DDD", "Normal IVD", "SS", "Spondylolisthesis", "LDB", "TDB"]  # data.yaml order
    images, anns = [], []
    for i, png in enumerate(sorted((LUMBAR6 / split / "images").glob("*.png"))):
        images.append({"id": i + 1, "file_name": png.name})
        label = LUMBAR6 / split / "labels" / f"{png.stem}.txt"
        for line in label.read_text().splitlines() if label.is_file() else []:
            c, cx, cy, w, h = (float(v) for v in line.split()[:5])
            box = [(cx - w / 2) * size, (cy - h / 2) * size, w * size, h * size]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}


@pytest.mark.skipif(not LUMBAR6.is_dir(), reason="needs ../shared/datasets/lumbar6")
def test_colocation_on_lumbar6_val():
    # SS and LDB are labelled on the same disc level, but their boxes overlap at IoU 0.1-0.5, never >= 0.5;
    # DDD and LDB share a box (IoU >= 0.5) on 24 val discs
    gt = _yolo_split_as_coco("val")
    assert len(gt["images"]) == 207 and len(gt["annotations"]) == 1812
    at50 = {tuple(p["classes"]): p["count"] for p in colocation_table(gt)["pairs"]}
    at10 = {tuple(p["classes"]): p["count"] for p in colocation_table(gt, iou=0.1)["pairs"]}
    assert at50 == {("DDD", "LDB"): 24, ("Spondylolisthesis", "LDB"): 8, ("DDD", "TDB"): 2,
                    ("DDD", "Spondylolisthesis"): 1}
    assert ("SS", "LDB") not in at50 and at10[("SS", "LDB")] == 334
