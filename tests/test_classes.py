"""ClassStats: counting, the tail rule, serialisation, bad input."""

from __future__ import annotations

import json
import math

import pytest

from welde_det.classes import LUMBAR_CLASSES, LUMBAR_COUNTS, ClassStats


def _coco(counts, crowd=None):
    cats = [{"id": 10 + i, "name": f"c{i}"} for i in range(len(counts))]
    anns, images, aid = [], [], 1
    for c, n in enumerate(counts):
        for j in range(n):
            img = j % 3  # each class spread over at most 3 images
            anns.append({"id": aid, "image_id": img, "category_id": 10 + c, "bbox": [0, 0, 1, 1],
                         "area": 1.0, "iscrowd": 0})
            aid += 1
    for c in crowd or []:
        anns.append({"id": aid, "image_id": 0, "category_id": 10 + c, "bbox": [0, 0, 1, 1],
                     "area": 1.0, "iscrowd": 1})
        aid += 1
    images = [{"id": i, "width": 10, "height": 10, "file_name": f"{i}.png"} for i in range(3)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_public_lumbar_set_order_tail_and_ratio():
    # the published data.yaml order: 0 DDD, 1 Normal IVD, 2 SS, 3 Spondylolisthesis, 4 LDB, 5 TDB
    assert LUMBAR_CLASSES == ("DDD", "Normal_IVD", "SS", "Spondylolisthesis", "LDB", "TDB")
    assert LUMBAR_COUNTS == (633, 4131, 1921, 122, 2033, 151)
    stats = ClassStats.from_counts(LUMBAR_CLASSES, LUMBAR_COUNTS)
    assert stats.tail_names == ("DDD", "Spondylolisthesis", "TDB")
    assert stats.tail == (0, 3, 5)
    assert stats.imbalance_ratio == pytest.approx(4131 / 122)
    assert stats.frequencies[1] == pytest.approx(4131 / 8991)
    assert "ceil(C/2)=3" in stats.tail_rule


def test_tail_ties_broken_by_class_index():
    stats = ClassStats.from_counts(["a", "b", "c", "d", "e"], [5, 5, 5, 9, 9])
    # ceil(5/2) = 3 classes; five-count classes a, b, c
    assert stats.tail == (0, 1, 2)
    stats = ClassStats.from_counts(["a", "b", "c", "d"], [7, 3, 3, 3])
    assert stats.tail == (1, 2)


def test_tail_explicit_and_threshold():
    stats = ClassStats.from_counts(["a", "b", "c"], [100, 10, 1], tail=["a"])
    assert stats.tail == (0,) and stats.tail_rule == "explicit list"
    stats = ClassStats.from_counts(["a", "b", "c"], [100, 10, 1], tail_threshold=11)
    assert stats.tail == (1, 2)
    assert "fewer than 11" in stats.tail_rule
    with pytest.raises(ValueError, match="not one of"):
        ClassStats.from_counts(["a", "b"], [1, 2], tail=["z"])
    with pytest.raises(ValueError, match="either"):
        ClassStats.from_counts(["a", "b"], [1, 2], tail=["a"], tail_threshold=3)


def test_from_coco_counts_instances_images_and_skips_crowd():
    stats = ClassStats.from_coco(_coco([5, 1, 2], crowd=[1, 1]))
    assert stats.names == ("c0", "c1", "c2")
    assert stats.instance_counts == (5, 1, 2)
    assert stats.image_counts == (3, 1, 2)
    assert stats.category_ids == (10, 11, 12)
    assert stats.tail == (1, 2)


def test_from_coco_file_and_unknown_category(tmp_path):
    data = _coco([2, 3])
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    assert ClassStats.from_coco(path).instance_counts == (2, 3)
    data["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="category_id 99"):
        ClassStats.from_coco(data)


def test_from_yolo(tmp_path):
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n2 0.1 0.1 0.1 0.1\n")
    (tmp_path / "b.txt").write_text("1 0.5 0.5 0.1 0.1\n\n")
    stats = ClassStats.from_yolo(tmp_path, ["x", "y", "z"])
    assert stats.instance_counts == (1, 1, 2)
    assert stats.image_counts == (1, 1, 1)
    (tmp_path / "c.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"c\.txt:1: class id 7"):
        ClassStats.from_yolo(tmp_path, ["x", "y", "z"])


def test_zero_count_names_the_class_unless_floor():
    with pytest.raises(ValueError, match="'b'"):
        ClassStats.from_counts(["a", "b"], [10, 0])
    stats = ClassStats.from_counts(["a", "b"], [10, 0], floor=1)
    assert stats.instance_counts == (10, 0)
    assert stats.effective_counts == (10, 1)
    assert stats.imbalance_ratio == 10


@pytest.mark.parametrize(
    ("names", "counts", "match"),
    [
        (["a", "b"], [1], "2 classes"),
        (["a", "b"], [1, -1], "negative"),
        (["a", "a"], [1, 1], "duplicate"),
        ([], [], "at least one"),
    ],
)
def test_bad_input(names, counts, match):
    with pytest.raises(ValueError, match=match):
        ClassStats.from_counts(names, counts)


def test_json_round_trip_keeps_rule(tmp_path):
    stats = ClassStats.from_counts(LUMBAR_CLASSES, LUMBAR_COUNTS, floor=2)
    path = stats.save(tmp_path / "stats.json")
    again = ClassStats.load(path)
    assert again == stats
    assert again.tail_rule == stats.tail_rule
    assert json.loads(path.read_text())["tail_names"] == ["DDD", "Spondylolisthesis", "TDB"]
    assert not math.isinf(again.imbalance_ratio)


def test_summary_marks_tail():
    text = ClassStats.from_counts(["a", "b"], [9, 1]).summary()
    assert "tail = ['b']" in text


def test_image_counts_are_measured_or_none():
    # counts alone: image counts are unknown, not a copy of the instance counts
    stats = ClassStats.from_counts(["a", "b"], [9, 2])
    assert stats.image_counts is None
    assert stats.to_dict()["image_counts"] is None
    assert ClassStats.from_dict(stats.to_dict()).image_counts is None
    assert "not measured" in stats.summary()
    # measured: class 0 has 4 boxes on 2 images, class 1 one box on 1 image, image 3 is background
    coco = {"images": [{"id": i, "width": 8, "height": 8, "file_name": f"{i}.png"} for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": k, "image_id": img, "category_id": cat, "bbox": [0, 0, 1, 1], "area": 1.0}
                            for k, (img, cat) in enumerate([(1, 1), (1, 1), (1, 1), (2, 1), (2, 2)], 1)]}
    stats = ClassStats.from_coco(coco)
    assert stats.instance_counts == (4, 1) and stats.image_counts == (2, 1)
    assert "not measured" not in stats.summary()
    with pytest.raises(ValueError, match="'a': 5 images hold its 4 instances"):
        ClassStats(["a", "b"], [4, 1], [5, 1])
    with pytest.raises(ValueError, match="'b': 1 images hold its 0 instances"):
        ClassStats(["a", "b"], [4, 0], [2, 1], floor=1)


def test_zero_training_instances_error_by_default(tmp_path):
    coco = _coco([3, 0, 2])
    with pytest.raises(ValueError, match=r"<COCO dict>: class\(es\) \['c1'\] have zero training instances"):
        ClassStats.from_coco(coco)
    stats = ClassStats.from_coco(coco, floor=1)
    assert stats.instance_counts == (3, 0, 2) and stats.effective_counts == (3, 1, 2)
    assert stats.image_counts == (3, 0, 2) and stats.floor == 1
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"class\(es\) \['y'\] have zero training instances"):
        ClassStats.from_yolo(tmp_path, ["x", "y"])
    assert ClassStats.from_yolo(tmp_path, ["x", "y"], floor=1).effective_counts == (1, 1)
