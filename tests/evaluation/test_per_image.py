"""Per-image TP / FP / FN: equal to pycocotools' per-image evaluation, the CSV, the worst slices."""

from __future__ import annotations

import contextlib
import copy
import csv
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.evaluation.test_coco_exact import make_dataset
from welde_det.evaluation import (
    match_detections,
    per_image_counts,
    worst_slices,
    write_per_image_csv,
)


def _pycoco_per_image(gt, dets, t, thr):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
    out = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        keep = (np.asarray(e["dtScores"]) >= thr) & ~e["dtIgnore"][t].astype(bool)
        matched = e["dtMatches"][t] > 0
        tp = int((keep & matched).sum())
        out[e["image_id"], e["category_id"]] = (tp, int((keep & ~matched).sum()),
                                                int((~e["gtIgnore"].astype(bool)).sum()) - tp)
    return out


@pytest.mark.parametrize(("seed", "iou", "thr"), [(0, 0.5, 0.25), (1, 0.5, 0.0), (2, 0.75, 0.5), (3, 0.5, 0.25)])
def test_equals_pycocotools_per_image(seed, iou, thr):
    gt, dets = make_dataset(seed, crowd_p=0.2, many_dets=seed == 3)
    counts = per_image_counts(match_detections(gt, dets, device="cpu"), iou=iou, score_threshold=thr)
    ref = _pycoco_per_image(gt, dets, round((iou - 0.5) / 0.05), thr)
    cat_ids = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    checked = 0
    for i, img in enumerate(counts["image_ids"]):
        for k, cat in enumerate(cat_ids):
            got = (counts["tp"][i, k], counts["fp"][i, k], counts["fn"][i, k])
            assert got == ref.get((img, cat), (0, 0, 0)), (img, cat)
            checked += (img, cat) in ref
    assert checked > 10 and counts["tp"].sum() > 0 and counts["fp"].sum() > 0 and counts["fn"].sum() > 0


def _small():
    gt = {"images": [{"id": 1, "file_name": "/abs/T1_0001_S8 .png"}, {"id": 2, "file_name": "b.png"},
                     {"id": 3, "file_name": "c.png"}],
          "categories": [{"id": 1, "name": "Normal"}, {"id": 2, "name": "SS"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10], "area": 100},
              {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100},
              {"id": 4, "image_id": 2, "category_id": 1, "bbox": [50, 0, 10, 10], "area": 100},
              {"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},
              {"id": 6, "image_id": 3, "category_id": 1, "bbox": [40, 40, 30, 30], "area": 900, "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9},     # TP
            {"image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10], "score": 0.1},    # TP below threshold
            {"image_id": 2, "category_id": 1, "bbox": [50, 0, 10, 10], "score": 0.8},    # TP
            {"image_id": 2, "category_id": 1, "bbox": [80, 80, 10, 10], "score": 0.7},   # FP
            {"image_id": 3, "category_id": 1, "bbox": [45, 45, 10, 10], "score": 0.9}]   # in the crowd box
    return gt, dets


def test_hand_counts_csv_and_worst_slices(tmp_path):
    gt, dets = _small()
    counts = per_image_counts(match_detections(gt, dets, device="cpu"), score_threshold=0.25)
    assert counts["tp"].tolist() == [[0, 1], [1, 0], [0, 0]]
    assert counts["fp"].tolist() == [[0, 0], [1, 0], [0, 0]]
    assert counts["fn"].tolist() == [[0, 1], [0, 1], [1, 0]]
    assert counts["image_names"][0] == "T1_0001_S8 .png"  # basename only, trailing space kept
    path = write_per_image_csv(tmp_path / "per_image.csv", counts)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 6
    assert rows[1] == {"image_id": "1", "file_name": "T1_0001_S8 .png", "class": "SS", "gt": "2", "tp": "1",
                       "fp": "0", "fn": "1", "iou": "0.50", "score_threshold": "0.25"}
    worst = worst_slices(counts, ["SS"])
    # images 1 and 2 miss one SS box each; image 1 has more SS boxes, so it comes first
    assert [w["image_id"] for w in worst] == [1, 2]
    assert worst[1] == {"image_id": 2, "file_name": "b.png", "missed_tail": 1, "tail_gt": 1, "missed": {"SS": 1},
                        "false_positives": 1}
    assert worst_slices(counts, ["SS"], top=1) == worst[:1]
    assert worst_slices(counts, []) == []
    with pytest.raises(ValueError, match="not among"):
        worst_slices(counts, ["LDB"])
    with pytest.raises(ValueError, match="COCO grid"):
        per_image_counts(match_detections(gt, dets, device="cpu"), iou=0.3)
