"""Bad-label corpus (#17 item 5): every malformed YOLO line or COCO entry is a typed error naming
``file:line`` (YOLO, relative to the dataset folder) or the file and annotation id (COCO); zero-area
boxes are refused in every path (YOLO reader, COCO reader, converter, Faster R-CNN dataset, YOLO
training view); a dataset without boxes is a ``DataError``. Each case checks that nothing was written.

The corpus is generated in ``tmp_path``: a two-split YOLO folder of tiny images with one good label
line per image, into which one bad line is planted at a known ``file:line``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from welde_det.datasets.coco import (
    MIN_BOX_SIDE,
    CocoFormatError,
    YoloClassIndexError,
    YoloFormatError,
    coco_to_yolo,
    load_coco,
    parse_yolo_label_file,
    validate_coco,
    visible_box_sides,
    yolo_to_coco,
)
from welde_det.datasets.resolve import DataError, require_boxes, resolve_data
from welde_det.datasets.sources.common import ConversionError, UnknownClassError
from welde_det.datasets.sources.yolo_dir import convert_yolo_dir

NAMES = ["A", "B"]
W, H = 40, 20  # image width, height in pixels
GOOD = "0 0.5 0.5 0.25 0.5"
BAD_FILE = "labels/train/img1.txt"  # where the bad line is planted (line 2)


def make_yolo(root: Path, bad_line: str | None = None, *, labels: bool = True) -> Path:
    """A YOLO folder (data.yaml, train/val, 2 images each); ``bad_line`` becomes line 2 of BAD_FILE."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((H, W), 40 * (i + 1), np.uint8)).save(root / "images" / split / f"img{i}.png")
            if labels:
                text = GOOD + "\n"
                if bad_line is not None and split == "train" and i == 1:
                    text += bad_line + "\n"
                (root / "labels" / split / f"img{i}.txt").write_text(text)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [A, B]\n")
    return root


# (planted line, error class, text the message must hold)
BAD_LINES = [
    ("inf 0.5 0.5 0.2 0.2", YoloClassIndexError, "class 'inf'"),
    ("nan 0.5 0.5 0.2 0.2", YoloClassIndexError, "class 'nan'"),
    ("-inf 0.5 0.5 0.2 0.2", YoloClassIndexError, "class '-inf'"),
    ("-1 0.5 0.5 0.2 0.2", YoloClassIndexError, "class '-1'"),
    ("2 0.5 0.5 0.2 0.2", YoloClassIndexError, "class '2' is not an index in 0..1"),
    ("0.5 0.5 0.5 0.2 0.2", YoloClassIndexError, "class '0.5'"),
    ("1e300 0.5 0.5 0.2 0.2", YoloClassIndexError, "class '1e300'"),
    ("0 nan 0.5 0.2 0.2", YoloFormatError, "non-finite cx"),
    ("0 0.5 inf 0.2 0.2", YoloFormatError, "non-finite cy"),
    ("0 0.5 0.5 -inf 0.2", YoloFormatError, "non-finite w"),
    ("0 0.5 0.5 0.2 NaN", YoloFormatError, "non-finite h"),
    ("0 1.5 0.5 0.2 0.2", YoloFormatError, "cx outside [0, 1]"),
    ("0 0.5 -0.01 0.2 0.2", YoloFormatError, "cy outside [0, 1]"),
    ("0 0.5 0.5 1.2 0.2", YoloFormatError, "w outside [0, 1]"),
    ("0 0.5 0.5 0.2", YoloFormatError, "expected 5 fields"),
    ("0 0.5 0.5 0.2 0.2 0.1", YoloFormatError, "expected 5 fields"),
    ("0 0.5 abc 0.2 0.2", YoloFormatError, "non-numeric"),
    ("0 0.5 0.5 0 0.2", YoloFormatError, "zero-area box"),
    ("0 0.5 0.5 0.2 0.0", YoloFormatError, "zero-area box"),
    # 0.0002 of a 40-px side is 0.008 px: below MIN_BOX_SIDE although w > 0
    ("1 0.5 0.5 0.0002 0.2", YoloFormatError, "zero-area box"),
]
IDS = [line.replace(" ", "_") for line, _cls, _text in BAD_LINES]


@pytest.mark.parametrize(("line", "cls", "text"), BAD_LINES, ids=IDS)
def test_yolo_reader_names_file_and_line(tmp_path, line, cls, text):
    root = make_yolo(tmp_path / "ds", line)
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with pytest.raises(cls) as info:
        yolo_to_coco(root, "train")
    msg = str(info.value)
    assert msg.startswith(f"{BAD_FILE}:2: "), msg  # relative to the dataset folder, line 2
    assert text in msg
    assert "\n" not in msg
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(("line", "cls", "text"), BAD_LINES, ids=IDS)
def test_training_resolve_refuses_and_writes_nothing(tmp_path, line, cls, text):
    root = make_yolo(tmp_path / "ds", line)
    work = tmp_path / "run" / "data"
    with pytest.raises(DataError) as info:
        resolve_data(root, work)
    msg = str(info.value)
    assert f"{BAD_FILE}:2: " in msg and text in msg and str(root) in msg, msg
    assert isinstance(info.value.__cause__, cls)
    assert not work.exists()  # no gt/*.json written before the error


@pytest.mark.parametrize(("line", "cls", "text"), BAD_LINES[::3] + BAD_LINES[-3:], ids=IDS[::3] + IDS[-3:])
def test_convert_refuses_and_writes_nothing(tmp_path, line, cls, text):
    root = make_yolo(tmp_path / "ds", line)
    out = tmp_path / "out"
    want = UnknownClassError if cls is YoloClassIndexError else ConversionError
    with pytest.raises(want) as info:
        convert_yolo_dir(root, out, key="k")
    msg = str(info.value)
    assert f"{BAD_FILE}:2: " in msg and text in msg, msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging folder left either


def test_good_lines_and_tolerance_pass(tmp_path):
    root = make_yolo(tmp_path / "ds", "1.0 1.0000005 0 0.5 0.2")  # '1.0' is class 1; 5e-7 over 1 is rounding
    coco = yolo_to_coco(root, "train")
    assert [a["category_id"] for a in coco["annotations"]] == [1, 1, 2]
    rows = parse_yolo_label_file(root / BAD_FILE, 2, image_size=(W, H))
    assert rows[1][0] == 1
    # a box half outside the image is kept (its visible part has an area); the readers do not clip
    assert visible_box_sides([-5, 2, 10, 4], W, H) == (5.0, 4.0)


def test_parse_without_image_size_refuses_zero_sides(tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("0 0.5 0.5 0.0 0.3\n")
    with pytest.raises(YoloFormatError, match=r"a\.txt:1: zero-area box \(w 0, h 0\.3"):
        parse_yolo_label_file(label, 1)
    with pytest.raises(YoloClassIndexError, match=r"^sub/a\.txt:1: class '0'"):
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub/a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
        parse_yolo_label_file(tmp_path / "sub/a.txt", 0, root=tmp_path)


# ----------------------------------------------------------------------------- COCO
def coco_dict() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 8], "area": 80, "iscrowd": 0},
                        {"id": 11, "image_id": 2, "category_id": 2, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
    }


def _planted(change) -> dict:
    coco = coco_dict()
    change(coco["annotations"][1])
    return coco


BAD_COCO = [
    ("nan_x", lambda a: a["bbox"].__setitem__(0, float("nan")), "four finite numbers"),
    ("inf_w", lambda a: a["bbox"].__setitem__(2, float("inf")), "four finite numbers"),
    ("neg_h", lambda a: a["bbox"].__setitem__(3, -2.0), "must be >= 0"),
    ("zero_w", lambda a: a["bbox"].__setitem__(2, 0.0), "zero-area box"),
    ("tiny_h", lambda a: a["bbox"].__setitem__(3, MIN_BOX_SIDE / 2), "zero-area box"),
    ("outside", lambda a: a.update(bbox=[W + 3, 1, 4, 4]), "zero-area box"),
    ("unknown_cat", lambda a: a.update(category_id=7), "category_id 7 is not among the categories [1, 2]"),
    ("unknown_img", lambda a: a.update(image_id=99), "image_id 99 is not among the images"),
    ("list_img", lambda a: a.update(image_id=[1]), "image_id [1] is not among the images"),
    ("float_cat", lambda a: a.update(category_id=1.0), "category_id 1.0 is not among"),
    ("nan_area", lambda a: a.update(area=float("nan")), "'area' must be a finite number"),
]


@pytest.mark.parametrize(("change", "text"), [c[1:] for c in BAD_COCO], ids=[c[0] for c in BAD_COCO])
def test_coco_reader_names_file_and_annotation_id(tmp_path, change, text):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_planted(change)))  # json writes NaN/Infinity, which Python's reader accepts
    with pytest.raises(CocoFormatError) as info:
        load_coco(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: annotations[1] (id 11)"), msg
    assert text in msg, msg
    out = tmp_path / "yolo"
    with pytest.raises(CocoFormatError, match=r"annotations\[1\] \(id 11\)"):
        coco_to_yolo(path, tmp_path, out)  # the YOLO training view reads through the same check
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.json"]


def test_zero_area_is_refused_by_the_rcnn_dataset_before_training(tmp_path):
    from welde_det.classes import ClassStats
    from welde_det.engine.backends.rcnn import CocoDetectionDataset

    coco = _planted(lambda a: a["bbox"].__setitem__(2, 0.0))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    stats = ClassStats.from_counts(NAMES, [1, 1])
    with pytest.raises(CocoFormatError, match=rf"{re.escape(str(path))}: annotations\[1\] \(id 11\): zero-area box"):
        CocoDetectionDataset(path, tmp_path, stats)
    # and a valid file gives boxes torchvision accepts (x1 > x0, y1 > y0) for every target
    path.write_text(json.dumps(coco_dict()))
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / name)
    ds = CocoDetectionDataset(path, tmp_path, stats)
    for i in range(len(ds)):
        boxes = ds[i][1]["boxes"]
        assert len(boxes) and bool((boxes[:, 2:] > boxes[:, :2]).all())


def test_validate_coco_accepts_boxes_partly_outside(tmp_path):
    coco = _planted(lambda a: a.update(bbox=[-2, -2, 4, 4]))
    assert validate_coco(coco) is coco


# ----------------------------------------------------------------------------- no boxes
def test_yolo_folder_without_labels_is_an_error_for_training(tmp_path):
    root = make_yolo(tmp_path / "ds", labels=False)
    work = tmp_path / "run" / "data"
    with pytest.raises(DataError, match=r"data\.yaml: the training split has no boxes \(2 image\(s\), 0 boxes\)"):
        resolve_data(root, work)
    assert not work.exists()


def test_yolo_folder_with_empty_label_files_is_an_error_for_convert(tmp_path):
    root = make_yolo(tmp_path / "ds")
    for label in root.rglob("*.txt"):
        label.write_text("\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"^{re.escape(str(root))}: the YOLO folder has no boxes \(4 image\(s\), 0 boxes\)"):
        convert_yolo_dir(root, out, key="k")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_coco_folder_whose_train_split_has_no_boxes(tmp_path):
    base = tmp_path / "coco"
    (base / "annotations").mkdir(parents=True)
    (base / "images").mkdir()
    coco = coco_dict()
    coco["annotations"] = []
    for img in coco["images"]:
        Image.fromarray(np.zeros((H, W), np.uint8)).save(base / "images" / img["file_name"])
    (base / "annotations/train.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"train\.json: the training split has no boxes \(2 image\(s\), 0 boxes\)"):
        resolve_data(base, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_require_boxes_counts_non_crowd_boxes():
    coco = coco_dict()
    require_boxes(coco, "x")
    for a in coco["annotations"]:
        a["iscrowd"] = 1
    with pytest.raises(DataError, match=r"^x: the training split has no boxes \(2 image\(s\), 0 boxes\)"):
        require_boxes(coco, "x")
    with pytest.raises(DataError, match=r"^src: the YOLO folder has no boxes;"):
        require_boxes(0, "src", what="the YOLO folder")


def test_carving_a_selection_split_must_leave_boxes_for_training():
    from welde_det.datasets.resolve import carve_split

    coco = coco_dict()
    coco["images"].append({"id": 3, "file_name": "c.png", "width": W, "height": H})
    for img, patient in zip(coco["images"], ("p1", "p2", "p3")):
        img["patient_id"] = patient
    coco["annotations"] = coco["annotations"][:1]  # only patient p1 has a box
    with pytest.raises(DataError, match=r"^<COCO dict>: the training part left after carving 0\.6 for selection "
                                        r"has no boxes \(\d image\(s\), 0 boxes\)"):
        carve_split(coco, 0.6, seed=0)


def test_label_file_with_byte_order_mark_and_crlf(tmp_path):
    label = tmp_path / "a.txt"
    label.write_bytes(b"\xef\xbb\xbf1 0.5 0.5 0.2 0.2\r\n0 0.25 0.25 0.1 0.1\r\n")
    assert parse_yolo_label_file(label, 2, image_size=(W, H)) == [(1, 0.5, 0.5, 0.2, 0.2), (0, 0.25, 0.25, 0.1, 0.1)]
    label.write_bytes(b"\xff\xfe0\x00")
    with pytest.raises(YoloFormatError, match=r"a\.txt: not a UTF-8 text label file"):
        parse_yolo_label_file(label, 2)
