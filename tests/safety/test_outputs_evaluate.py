"""``tools/evaluate.py --weights W --data <raw YOLO folder>``: identifiers planted in the data's file and
folder names never reach the evaluation folder (no byte, no name), no absolute path does, and the data
folder is left as it was; ``--keep-names`` adds ``names.csv``, the one file that names the inputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety.test_outputs_run import find_bytes, planted_yolo_folder, snapshot
from welde_det.engine.evaluate import evaluate_checkpoint
from welde_det.engine.run import run_training

ROOT = Path(__file__).resolve().parents[2]
#: planted in the folder and file names (long enough not to occur by chance in compressed plot bytes)
PLANTED = ("Doe_Jane", "PID-99871", "19610203", "St_Elsewhere")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate_out")
    data = planted_yolo_folder(base / "St_Elsewhere Doe_Jane PID-99871", base / "gen")
    run = run_training(ROOT / "configs" / "yolo_ce.yaml", [
        "epochs=1", "imgsz=64", "batch=4", "workers=0", "warmup_steps=1", "class_floor=1", "conf=0.0",
        f"data.source={data}", f"output={base / 'runs'}"])
    return base, data, run / "weights" / "model.pt"


def _needles(base: Path, data: Path) -> tuple[str, ...]:
    return (*PLANTED, str(base), str(base.resolve()), str(data), str(ROOT))


def test_evaluate_on_a_raw_yolo_folder_names_no_user_file_and_no_absolute_path(trained):
    base, data, weights = trained
    before = snapshot(data)
    out = base / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--weights", str(weights), "--data",
                          str(data), "--split", "val", "--out", str(out), "--device", "cpu", "--conf", "0.001"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert {"ground_truth.json", "detections.json", "report.json", "report.md", "per_image.csv"} <= set(files)
    assert "names.csv" not in files  # only on request
    assert find_bytes(out, _needles(base, data)) == []  # names, bytes (PNG plots, CSV, JSON, Markdown), links
    gt = json.loads((out / "ground_truth.json").read_text())
    images = sorted(gt["images"], key=lambda im: im["id"])
    assert images and [im["file_name"] for im in images] == [f"{i:06d}.png" for i in range(1, len(images) + 1)]
    assert all(set(im) <= {"id", "file_name", "width", "height", "patient_id", "pixel_spacing", "slice_index",
                           "slice_axis", "world_x"} for im in images)
    with (out / "per_image.csv").open(newline="") as fh:  # the per-image rows name the index, not the file
        assert {row["file_name"] for row in csv.DictReader(fh)} <= {im["file_name"] for im in images}
    assert snapshot(data) == before  # nothing written into the user's data


def test_keep_names_writes_the_mapping_and_nothing_else_names_the_inputs(trained):
    base, data, weights = trained
    out = base / "eval_names"
    evaluate_checkpoint(weights, data, out, split="val", device="cpu", plots=False, keep_names=True)
    with (out / "names.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    gt = json.loads((out / "ground_truth.json").read_text())
    assert [r["name"] for r in rows] == [im["file_name"] for im in sorted(gt["images"], key=lambda im: im["id"])]
    # each index name maps to its image, by a path inside the data folder (no absolute path)
    inputs = sorted(f"images/val/{p.name}" for p in (data / "images" / "val").iterdir())
    assert sorted(r["input"] for r in rows) == inputs
    assert find_bytes(out, (str(base), str(base.resolve()), str(ROOT))) == []
    named = [hit for hit in find_bytes(out, PLANTED) if not hit.startswith("names.csv:")]
    assert named == []
