"""``tools/evaluate.py --weights`` equals ``tools/infer.py`` + ``tools/evaluate.py --dets`` exactly (YOLO and
Faster R-CNN), on real lumbar6 slices (a YOLO folder with names with spaces); skipped without ../shared.

Both tools' outputs name images by pseudonym or index only; their ``--keep-names`` mappings (``names.csv``)
tie them back to the same input files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets.test_resolve import sources  # noqa: F401  (the fixture)
from welde_det.engine.run import run_training

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "MPLBACKEND": "Agg", "YOLO_OFFLINE": "1",
       "WELDE_DEID_KEY": "evaluate-weights-test"}


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.parametrize("config", ["yolo_ce", "rcnn_ce"])
def test_evaluate_weights_equals_infer_plus_dets(sources, tmp_path, config):  # noqa: F811
    data = sources["grey"]
    run = run_training(ROOT / "configs" / f"{config}.yaml", [
        f"data.source={data}", "epochs=1", "imgsz=64", "batch=4", "workers=0", "class_floor=1", "data.channels=1",
        f"output={tmp_path / 'runs'}"])
    weights = run / "weights" / "model.pt"
    ev = tmp_path / "eval"
    out = _cli("evaluate.py", "--weights", str(weights), "--data", str(data), "--split", "val", "--out", str(ev),
               "--conf", "0.001", "--keep-names")
    assert out.stdout.strip().splitlines()[-1] == str(ev)
    dets = json.loads((ev / "detections.json").read_text())
    gt = json.loads((ev / "ground_truth.json").read_text())
    # the ground truth it used: images by index in id order (no user file name), the dataset's own class names
    assert [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])][1] == "Normal IVD"
    images = sorted(gt["images"], key=lambda im: im["id"])
    assert [im["file_name"] for im in images] == [f"{i:06d}.png" for i in range(1, len(images) + 1)]
    user_names = sorted(p.name for p in (data / "val" / "images").iterdir())
    assert any(" " in n for n in user_names)
    for name in ("ground_truth.json", "detections.json", "report.json", "report.md", "per_image.csv"):
        text = (ev / name).read_text()
        assert not [n for n in user_names if Path(n).stem in text], name
    # --keep-names: index name -> the image inside the data folder (the only output naming the user's files)
    with (ev / "names.csv").open(newline="") as fh:
        input_of_index = {row["name"]: row["input"] for row in csv.DictReader(fh)}
    assert sorted(input_of_index) == [im["file_name"] for im in images]
    assert sorted(Path(v).name for v in input_of_index.values()) == user_names
    assert all((data / v).is_file() and v.startswith("val/images/") for v in input_of_index.values())
    id_of = {Path(input_of_index[im["file_name"]]).name: im["id"] for im in gt["images"]}
    # the same images through tools/infer.py, turned into COCO results by hand
    _cli("infer.py", "--weights", str(weights), "--source", str(data / "val" / "images"), "--out",
         str(tmp_path / "inf"), "--conf", "0.001", "--device", "cpu", "--keep-names")
    # outputs are named by pseudonyms; --keep-names maps them back to the inputs
    with (tmp_path / "inf" / "names.csv").open(newline="") as fh:
        input_of = {row["name"]: row["input"] for row in csv.DictReader(fh)}
    cat_of = {c["name"]: c["id"] for c in gt["categories"]}
    names = json.loads(next((tmp_path / "inf").glob("*.json")).read_text())["class_names"]
    by_hand = []
    for rec_path in sorted((tmp_path / "inf").glob("*.json")):
        rec = json.loads(rec_path.read_text())
        image_id = id_of[Path(input_of[rec["source"]]).name]
        for d in rec["detections"]:
            x1, y1, x2, y2 = d["bbox_xyxy"]
            by_hand.append({"image_id": image_id, "category_id": cat_of[gt_name(gt, names, d["class_index"])],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    key = lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"])  # noqa: E731
    assert sorted(by_hand, key=key) == sorted(dets, key=key)
    assert len(dets) > 0
    (tmp_path / "by_hand.json").write_text(json.dumps(by_hand))
    rep2 = tmp_path / "rep2"
    _cli("evaluate.py", "--gt", str(ev / "ground_truth.json"), "--dets", str(tmp_path / "by_hand.json"), "--out",
         str(rep2), "--class-stats", str(run / "class_stats.json"))
    a, b = (json.loads((d / "report.json").read_text()) for d in (ev, rep2))
    assert a["stats"] == b["stats"] and a["map_tail"] == b["map_tail"]
    assert "selected on the last epoch" in (ev / "report.md").read_text().lower()


def gt_name(gt: dict, names: list[str], index: int) -> str:
    """The dataset's category name of the detector's class ``index`` (same order, checked by the loader)."""
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    assert [c["name"] for c in cats] == names
    return cats[index]["name"]
