"""COCO read/validate/write and the COCO <-> YOLO round trip (boxes kept within half a pixel)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.coco import (
    CocoFormatError,
    YoloFormatError,
    coco_to_yolo,
    load_coco,
    make_annotation,
    make_categories,
    make_image_entry,
    save_coco,
    validate_coco,
    yolo_to_coco,
)


def _random_coco(root: Path, rng: np.random.Generator, n_images: int, prefix: str) -> dict:
    images, anns = [], []
    for i in range(1, n_images + 1):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        name = f"{prefix}/sub{i % 3}/img{i:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(root / name)
        images.append(make_image_entry(i, name, width=w, height=h, pixel_spacing=[0.5, 0.6]))
        for _ in range(int(rng.integers(0, 5))):
            x0, x1 = np.sort(rng.uniform(0, w, 2))
            y0, y1 = np.sort(rng.uniform(0, h, 2))
            anns.append(make_annotation(len(anns) + 1, i, int(rng.integers(1, 7)), [x0, y0, x1 - x0, y1 - y0]))
    return {"info": {}, "images": images, "annotations": anns, "categories": make_categories(LUMBAR_CLASSES)}


def test_builders_fill_area_iscrowd_and_ids():
    cats = make_categories(["a", "b", "c"])
    assert [c["id"] for c in cats] == [1, 2, 3] and [c["name"] for c in cats] == ["a", "b", "c"]
    ann = make_annotation(7, 3, 2, [1, 2, 3.5, 4])
    assert ann["area"] == pytest.approx(14.0) and ann["iscrowd"] == 0 and ann["bbox"] == [1.0, 2.0, 3.5, 4.0]
    img = make_image_entry(3, "x/y.png", width=10, height=20, pixel_spacing=(0.7, 0.8), patient_id="ab12",
                           slice_index=4, slice_axis=0, world_x=-1.5, source="test")
    assert img == {"id": 3, "file_name": "x/y.png", "width": 10, "height": 20, "pixel_spacing": [0.7, 0.8],
                   "patient_id": "ab12", "slice_index": 4, "slice_axis": 0, "world_x": -1.5, "source": "test"}
    with pytest.raises(CocoFormatError, match="duplicate"):
        make_categories(["a", "a"])


def test_round_trip_coco_yolo_coco_within_half_pixel(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    tr = _random_coco(src, rng, 25, "train_imgs")
    va = _random_coco(src, rng, 8, "val_imgs")
    data_yaml = coco_to_yolo({"train": tr, "val": va}, src, tmp_path / "yolo", link_images=False)
    assert data_yaml == (tmp_path / "yolo" / "data.yaml").absolute()
    for split, orig in (("train", tr), ("val", va)):
        back = yolo_to_coco(data_yaml, split)
        by_name = {img["file_name"]: img for img in back["images"]}
        assert sorted(by_name) == sorted(img["file_name"] for img in orig["images"])
        for img in orig["images"]:
            new = by_name[img["file_name"]]
            assert (new["width"], new["height"]) == (img["width"], img["height"])
            want = sorted((a["category_id"], *a["bbox"]) for a in orig["annotations"] if a["image_id"] == img["id"])
            got = sorted((a["category_id"], *a["bbox"]) for a in back["annotations"] if a["image_id"] == new["id"])
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g[0] == w[0]
                assert np.abs(np.subtract(g[1:], w[1:])).max() < 0.5
                # the printed precision is far finer than the half-pixel promise
                assert np.abs(np.subtract(g[1:], w[1:])).max() < 1e-3


def test_yolo_folder_is_what_ultralytics_expects(tmp_path):
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    rng = np.random.default_rng(1)
    tr = _random_coco(tmp_path / "src", rng, 4, "a")
    va = _random_coco(tmp_path / "src", rng, 2, "b")
    data_yaml = coco_to_yolo({"train": tr, "val": va}, tmp_path / "src", tmp_path / "yolo")
    with contextlib.redirect_stdout(io.StringIO()):
        data = check_det_dataset(str(data_yaml), autodownload=False)
    assert data["nc"] == 6 and [data["names"][i] for i in range(6)] == list(LUMBAR_CLASSES)
    images = sorted(Path(data["train"]).rglob("*.png"))
    assert len(images) == 4 and all(p.is_symlink() for p in images)
    for label in img2label_paths([str(p) for p in images]):
        assert Path(label).is_file()
    # Ultralytics' own dataset class reads the same boxes back (normalised xywh, class index)
    from ultralytics.data.dataset import YOLODataset

    with contextlib.redirect_stdout(io.StringIO()):
        ds = YOLODataset(img_path=data["train"], data=data, task="detect", imgsz=64, augment=False)
    by_stem = {Path(lb["im_file"]).stem: lb for lb in ds.labels}
    for img in tr["images"]:
        lb = by_stem[Path(img["file_name"]).stem]
        w, h = img["width"], img["height"]
        want = sorted(
            (a["category_id"] - 1, (a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
             a["bbox"][2] / w, a["bbox"][3] / h)
            for a in tr["annotations"] if a["image_id"] == img["id"]
        )
        got = sorted((int(c), *map(float, b)) for c, b in zip(lb["cls"][:, 0], lb["bboxes"]))
        assert len(got) == len(want)
        for g, wv in zip(got, want):
            assert g[0] == wv[0] and np.allclose(g[1:], wv[1:], atol=1e-6)


def test_yolo_line_values_by_hand(tmp_path):
    Image.fromarray(np.zeros((50, 200), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [make_image_entry(1, "a.png", width=200, height=50)],
            "annotations": [make_annotation(1, 1, 2, [20, 10, 40, 30])],
            "categories": make_categories(["x", "y"])}
    coco_to_yolo(coco, tmp_path, tmp_path / "out", split="val")
    cls, cx, cy, w, h = (tmp_path / "out/labels/val/a.txt").read_text().split()
    assert cls == "1"
    assert [float(v) for v in (cx, cy, w, h)] == pytest.approx([40 / 200, 25 / 50, 40 / 200, 30 / 50])
    # class_names reorders the YOLO indices by name
    coco_to_yolo(coco, tmp_path, tmp_path / "out2", class_names=["y", "x"])
    assert (tmp_path / "out2/labels/train/a.txt").read_text().split()[0] == "0"


def test_pycocotools_loads_what_we_save_and_scores_gt_as_perfect(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(2)
    coco = _random_coco(tmp_path, rng, 12, "i")
    path = save_coco(coco, tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                for a in coco["annotations"] if a["area"] > 0]
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert len(gt.getImgIds()) == 12 and len(gt.getCatIds()) == 6
    assert ev.stats[1] == pytest.approx(1.0)  # AP@0.5 of the ground truth scored against itself
    saved = json.loads(path.read_text())
    assert saved["info"] == {} and saved["licenses"] == []


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.pop("images"), "no 'images'"),
        (lambda c: c["images"].append(dict(c["images"][0])), "duplicate image id"),
        (lambda c: c["annotations"].append(dict(c["annotations"][0])), "duplicate annotation id"),
        (lambda c: c["annotations"][0].update(image_id=99), "image_id 99"),
        (lambda c: c["annotations"][0].update(category_id=9), "category_id 9"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), "four finite numbers"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), "four finite numbers"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, -3, 3]), ">= 0"),
        (lambda c: c["annotations"][0].pop("area"), "'area' is missing"),
        (lambda c: c["images"][0].update(width=0), "'width'"),
        (lambda c: c["images"][0].update(pixel_spacing=[0.5]), "pixel_spacing"),
        (lambda c: c["categories"].append({"id": 1, "name": "z"}), "duplicate category id"),
    ],
)
def test_validation_names_file_and_entry(tmp_path, mutate, match):
    coco = {"images": [make_image_entry(1, "a.png", width=10, height=10)],
            "annotations": [make_annotation(1, 1, 1, [1, 1, 2, 2])],
            "categories": make_categories(["a"])}
    validate_coco(coco)
    mutate(coco)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(CocoFormatError, match=match) as info:
        load_coco(path)
    assert str(path) in str(info.value)
    with pytest.raises(CocoFormatError):
        save_coco(coco, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_malformed_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CocoFormatError, match=r"x\.json"):
        load_coco(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        load_coco(tmp_path / "missing.json")


def test_coco_to_yolo_failure_leaves_nothing(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [make_image_entry(1, "a.png", width=10, height=10),
                       make_image_entry(2, "missing.png", width=10, height=10)],
            "annotations": [make_annotation(1, 1, 1, [1, 1, 2, 2])],
            "categories": make_categories(["a", "b"])}
    with pytest.raises(CocoFormatError, match=r"missing\.png"):
        coco_to_yolo(coco, tmp_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    coco["images"].pop()
    with pytest.raises(CocoFormatError, match="not among class_names"):
        coco_to_yolo(coco, tmp_path, tmp_path / "out", class_names=["a"])
    with pytest.raises(CocoFormatError, match="split name"):
        coco_to_yolo({"training": coco}, tmp_path, tmp_path / "out")
    coco_to_yolo(coco, tmp_path, tmp_path / "out")
    with pytest.raises(FileExistsError):
        coco_to_yolo(coco, tmp_path, tmp_path / "out")
    coco_to_yolo(coco, tmp_path, tmp_path / "out", overwrite=True, split="val")
    assert (tmp_path / "out/labels/val/a.txt").is_file() and not (tmp_path / "out/labels/train").exists()


def test_yolo_to_coco_bad_labels(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(root / "images/a.png")
    (root / "labels/a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(YoloFormatError, match=r"a\.txt:2: class '7'"):
        yolo_to_coco(root, class_names=LUMBAR_CLASSES[:2])
    (root / "labels/a.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(YoloFormatError, match=r"a\.txt:1: expected 5 fields"):
        yolo_to_coco(root, class_names=LUMBAR_CLASSES)
    (root / "labels/a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    with pytest.raises(YoloFormatError, match="pass class_names"):
        yolo_to_coco(root)
    coco = yolo_to_coco(root, class_names=LUMBAR_CLASSES)
    assert coco["annotations"][0]["bbox"] == pytest.approx([8.0, 3.0, 4.0, 4.0])
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(YoloFormatError, match="no images"):
        yolo_to_coco(empty, class_names=["a"])
