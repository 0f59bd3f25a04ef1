"""Box-table converter: CSV/JSON rows of boxes per volume and slice -> COCO."""

from __future__ import annotations

import json

import numpy as np
import pytest

from welde_det.datasets.coco import load_coco
from welde_det.datasets.sources.boxes_csv import convert_boxes_table, read_box_table
from welde_det.datasets.sources.common import (
    ConversionError,
    MissingColumnsError,
    UnknownClassError,
)

nib = pytest.importorskip("nibabel")
KEY = "boxes-test-key"





def _volumes(folder):
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([3.0, 0.7, 0.9, 1.0])
    for name in ("p1_scan.nii.gz", "p2_scan.nii.gz"):
        arr = np.random.default_rng(len(name)).normal(50, 5, (5, 30, 40)).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, affine), str(folder / name))
    return folder


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in r) for r in rows]) + "\n")
    return path


def test_csv_boxes_to_coco(tmp_path, pycocotools_check):
    _volumes(tmp_path / "vols")
    table = _write_csv(tmp_path / "vols" / "boxes.csv", ["volume", "slice", "patient", "class", "x", "y", "w", "h"], [
        ["p1_scan.nii.gz", "", "Alice Smith", "LDB", 3, 4, 10, 6],
        ["p1_scan.nii.gz", "mid", "Alice Smith", "DDD", 12.5, 20, 5, 5],
        ["p1_scan.nii.gz", 1, "Alice Smith", "LDB", 0, 0, 30, 40],
        ["p2_scan.nii.gz", "", "Bob Jones", "LDB", 1, 1, 2, 2],
    ])
    res = convert_boxes_table(table, tmp_path / "out", key=KEY, class_names=["DDD", "LDB"], fractions=None)
    coco = load_coco(res.coco)
    assert [c["name"] for c in coco["categories"]] == ["DDD", "LDB"]
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 4
    by_slice = {(img["patient_id"], img["slice_index"]): img for img in coco["images"]}
    assert sorted(k[1] for k in by_slice) == [1, 2, 2]
    for img in coco["images"]:
        assert (img["width"], img["height"]) == (30, 40) and img["pixel_spacing"] == pytest.approx([0.9, 0.7])
        assert img["slice_axis"] == 0
    mid_p1 = next(img for (p, s), img in by_slice.items() if s == 2 and
                  sum(a["image_id"] == img["id"] for a in coco["annotations"]) == 2)
    got = sorted((a["category_id"], a["bbox"]) for a in coco["annotations"] if a["image_id"] == mid_p1["id"])
    assert got == [(1, [12.5, 20.0, 5.0, 5.0]), (2, [3.0, 4.0, 10.0, 6.0])]
    text = "".join(p.read_text() for p in res.out_dir.rglob("*.json")).lower()
    assert "alice" not in text and "bob" not in text and "p1_scan" not in text
    pycocotools_check(res.coco)


def test_json_table_with_corners(tmp_path):
    _volumes(tmp_path / "vols")
    table = tmp_path / "boxes.json"
    table.write_text(json.dumps({"boxes": [
        {"volume": "p2_scan.nii.gz", "class": "SS", "x0": 2, "y0": 3, "x1": 12, "y1": 8},
    ]}))
    res = convert_boxes_table(table, tmp_path / "out", key=KEY, root=tmp_path / "vols", fractions=None, yolo=True)
    coco = load_coco(res.coco)
    assert coco["annotations"][0]["bbox"] == [2.0, 3.0, 10.0, 5.0]
    assert coco["annotations"][0]["area"] == 50.0
    line = next((res.out_dir / "yolo" / "labels" / "train").rglob("*.txt")).read_text().split()
    assert [float(v) for v in line[1:]] == pytest.approx([7 / 30, 5.5 / 40, 10 / 30, 5 / 40])


def test_bad_tables(tmp_path):
    t = _write_csv(tmp_path / "a.csv", ["volume", "class", "x", "y"], [["v.nii.gz", "LDB", 1, 2]])
    with pytest.raises(MissingColumnsError, match=r"a\.csv: missing column\(s\) \['w', 'h'\]"):
        read_box_table(t)
    t = _write_csv(tmp_path / "b.csv", ["volume", "class", "x", "y", "w", "h"],
                   [["v.nii.gz", "LDB", 1, 2, 3, 4], ["v.nii.gz", "Fracture", 1, 2, 3, 4]])
    with pytest.raises(UnknownClassError, match=r"b\.csv:3: class 'Fracture' is not one of"):
        read_box_table(t, ["LDB"])
    t = _write_csv(tmp_path / "c.csv", ["volume", "class", "x", "y", "w", "h"], [["v.nii.gz", "LDB", 1, 2, -3, 4]])
    with pytest.raises(ConversionError, match=r"c\.csv:2: box .* width and height > 0\.01 px"):
        read_box_table(t)
    # zero-area boxes are refused like everywhere else (#17)
    t = _write_csv(tmp_path / "z.csv", ["volume", "class", "x", "y", "w", "h"], [["v.nii.gz", "LDB", 1, 2, 0, 4]])
    with pytest.raises(ConversionError, match=r"z\.csv:2: box .* \(zero-area boxes are refused\)"):
        read_box_table(t)
    t = _write_csv(tmp_path / "d.csv", ["volume", "class", "x", "y", "w", "h"], [])
    with pytest.raises(ConversionError, match="no rows"):
        read_box_table(t)


def test_box_outside_slice_leaves_nothing(tmp_path):
    _volumes(tmp_path / "vols")
    t = _write_csv(tmp_path / "vols" / "t.csv", ["volume", "class", "x", "y", "w", "h"],
                   [["p1_scan.nii.gz", "LDB", 1, 2, 3, 4], ["p2_scan.nii.gz", "LDB", 25, 2, 10, 4]])
    with pytest.raises(ConversionError, match=r"t\.csv:3: box .* outside the 30x40 slice"):
        convert_boxes_table(t, tmp_path / "out", key=KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vols"]
    t = _write_csv(tmp_path / "vols" / "e.csv", ["volume", "class", "x", "y", "w", "h"], [["missing.nii.gz", "LDB", 1, 2, 3, 4]])
    with pytest.raises(ConversionError, match=r"e\.csv:2: volume .*missing\.nii\.gz not found"):
        convert_boxes_table(t, tmp_path / "out", key=KEY)
    assert not (tmp_path / "out").exists()


def test_2d_image_rows_keep_the_image_as_drawn(tmp_path):
    from PIL import Image

    img = np.full((40, 30), 20, np.uint8)
    img[2:5, 1:4] = 200  # top-left block: the box below must land on it in the written PNG
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "Jane_Roe.png")
    t = _write_csv(tmp_path / "in" / "t.csv", ["volume", "class", "x", "y", "w", "h"],
                   [["Jane_Roe.png", "LDB", 1, 2, 3, 3]])
    res = convert_boxes_table(t, tmp_path / "out", key=KEY, fractions=None)
    coco = load_coco(res.coco)
    entry = coco["images"][0]
    out = np.asarray(Image.open(res.out_dir / "images" / entry["file_name"]))
    x, y, w, h = (int(v) for v in coco["annotations"][0]["bbox"])
    assert out.shape == (40, 30) and (out[y : y + h, x : x + w] == out.max()).all()
    assert (out == out.max()).sum() == 9
    assert "jane" not in entry["file_name"].lower()
