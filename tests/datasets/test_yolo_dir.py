"""YOLO-folder converter (the public six-class lumbar layout) and the convert tool/engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.coco import YoloFormatError, load_coco
from welde_det.datasets.sources.common import ConversionError, UnknownClassError
from welde_det.datasets.sources.yolo_dir import convert_yolo_dir
from welde_det.engine.convert import resolve_key, run_convert

KEY = "yolo-dir-key"
NAMES = list(LUMBAR_CLASSES)



REPO = Path(__file__).resolve().parents[2]


def _lumbar_folder(root: Path, n: int = 8, *, splits: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        split = ("train" if i < n - 2 else "val") if splits else None
        img_dir = root / "images" / split if split else root / "images"
        lbl_dir = root / "labels" / split if split else root / "labels"
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        grey = rng.integers(0, 255, (64, 48), dtype=np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1)).save(img_dir / f"Smith_John_{i // 2:03d}_{i}.png")
        cls = i % 6
        (lbl_dir / f"Smith_John_{i // 2:03d}_{i}.txt").write_text(f"{cls} 0.5 0.25 0.5 0.125\n2 0.1 0.1 0.2 0.2\n")
    return root


def test_lumbar_folder_to_coco(tmp_path, pycocotools_check):
    src = _lumbar_folder(tmp_path / "lumbar")
    res = convert_yolo_dir(src, tmp_path / "out", key=KEY, patient_pattern=r"_(?P<patient>\d{3})_",
                           pixel_spacing=[0.6, 0.6], yolo=True, class_names=NAMES)
    coco = load_coco(res.coco)
    assert [c["name"] for c in coco["categories"]] == list(LUMBAR_CLASSES)
    assert len(coco["images"]) == 8 and len(coco["annotations"]) == 16
    assert len({img["patient_id"] for img in coco["images"]}) == 4
    ann = next(a for a in coco["annotations"] if a["category_id"] != 3)
    assert ann["bbox"] == pytest.approx([12.0, 12.0, 24.0, 8.0])  # 0.5,0.25,0.5,0.125 of 48x64
    img = coco["images"][0]
    assert (img["width"], img["height"]) == (48, 64) and img["pixel_spacing"] == [0.6, 0.6]
    png = Image.open(res.out_dir / "images" / img["file_name"])
    assert png.mode == "L"  # 3-channel grey reduced to one channel
    assert not any("smith" in str(p).lower() or "john" in str(p).lower() for p in res.out_dir.rglob("*"))
    assert "smith" not in res.coco.read_text().lower()
    patients = {s: {i["patient_id"] for i in load_coco(p)["images"]} for s, p in res.splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    data_yaml = res.data_yaml.read_text()
    assert f"path: {res.out_dir / 'yolo'}" in data_yaml
    assert (res.out_dir / "yolo" / "images" / "train").is_dir()
    pycocotools_check(res.coco, *res.splits.values())


def test_keep_source_splits(tmp_path):
    src = _lumbar_folder(tmp_path / "lumbar", splits=True)
    res = convert_yolo_dir(src, tmp_path / "out", key=KEY, keep_source_splits=True, yolo=True, class_names=NAMES)
    assert sorted(res.splits) == ["train", "val"]
    assert len(load_coco(res.splits["val"])["images"]) == 2
    report = json.loads(res.report.read_text())
    assert "not guaranteed" in report["patient_grouping"]


def test_unknown_class_and_corrupt_image(tmp_path):
    src = _lumbar_folder(tmp_path / "lumbar", n=3)
    (src / "labels" / "Smith_John_000_1.txt").write_text("0 0.5 0.5 0.1 0.1\n6 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UnknownClassError, match=r"Smith_John_000_1\.txt:2: class '6' is not an index in 0\.\.5"):
        convert_yolo_dir(src, tmp_path / "out", key=KEY, class_names=NAMES)
    # no data.yaml and no class names: an error, never a guessed class order
    with pytest.raises(ConversionError, match="does not name its classes"):
        convert_yolo_dir(src, tmp_path / "out", key=KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lumbar"]
    (src / "labels" / "Smith_John_000_1.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (src / "images" / "Smith_John_001_2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ConversionError, match=r"Smith_John_001_2\.png: cannot read the image"):
        convert_yolo_dir(src, tmp_path / "out", key=KEY, workers=2, class_names=NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lumbar"]
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(ConversionError, match="no images"):
        convert_yolo_dir(empty, tmp_path / "out", key=KEY, class_names=NAMES)
    with pytest.raises(ConversionError, match="no such"):
        convert_yolo_dir(tmp_path / "nowhere", tmp_path / "out", key=KEY)
    assert issubclass(YoloFormatError, ValueError)


def test_key_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("WELDE_DEID_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(ValueError, match="no de-identification key"):
        resolve_key(create=False)
    created = resolve_key()  # first run: a random key in the user's config folder
    assert (tmp_path / "config" / "welde_det" / "deid.key").read_bytes().strip() == created
    assert resolve_key() == created
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "k").write_text("secret")
    with pytest.raises(ValueError, match="inside the dataset"):
        resolve_key(key_file=tmp_path / "out" / "k", out_dir=tmp_path / "out")
    (tmp_path / "k").write_text("secret\n")
    assert resolve_key(key_file=tmp_path / "k", out_dir=tmp_path / "out") == b"secret"
    monkeypatch.setenv("WELDE_DEID_KEY", "envkey")
    assert resolve_key() == b"envkey"
    src = _lumbar_folder(tmp_path / "lumbar", n=2)
    res = run_convert("yolo", src, tmp_path / "ds", fractions=None, class_names=NAMES)
    assert res.num_images == 2 and res.splits == {}
    with pytest.raises(ValueError, match="unknown converter"):
        run_convert("dicomweb", src, tmp_path / "x")


def test_tool_end_to_end(tmp_path):
    src = _lumbar_folder(tmp_path / "lumbar", n=6)
    (tmp_path / "key").write_text("tool-key")
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "yolo", str(src), str(tmp_path / "ds"),
           "--key-file", str(tmp_path / "key"), "--yolo", "--split", "0.5,0.5", "--workers", "2",
           "--class-names", ",".join(NAMES)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={"PATH": "", "WELDE_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "ds").absolute())
    assert (tmp_path / "ds" / "yolo" / "data.yaml").is_file()
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "to-yolo", str(tmp_path / "y2"),
           "--images", str(tmp_path / "ds" / "images"), "--train", str(tmp_path / "ds" / "splits" / "train.json"),
           "--val", str(tmp_path / "ds" / "splits" / "val.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "y2" / "data.yaml").absolute())
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), "yolo", str(src), str(tmp_path / "z")],
                         capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "", "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert bad.returncode == 2 and "does not name its classes" in bad.stderr and not (tmp_path / "z").exists()
