"""Reports: files written, numbers in the tables, comparison column, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluation.test_coco_exact import make_dataset
from welde_det.engine.evaluate import write_detection_report


def test_report_files_and_numbers(tmp_path):
    gt, dets = make_dataset(4, n_cat=4)
    worse = [{**d, "score": d["score"] * 0.5} for d in dets[::2]]
    res = write_detection_report(gt, dets, tmp_path / "rep", compare=worse, compare_label="CE", title="t")
    for name in ("report.json", "report.md", "pr_curves.png", "per_class_ap.png", "confusion.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["map"] == pytest.approx(res["stats"][0])
    assert rep["compare"]["label"] == "CE"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{100 * res['stats'][0]:.1f}" in md
    assert "mAP_tail" in md and "(tail)" in md and "| CE |" in md
    assert "Excluded from mAP_tail" in md  # the last category has no GT
    assert not list((tmp_path / "rep").glob(".*tmp"))


def test_cli(tmp_path):
    gt, dets = make_dataset(1, n_cat=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "d.json").write_text(json.dumps(dets))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                          "--dets", str(tmp_path / "d.json"), "--out", str(tmp_path / "r"), "--no-plots"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "r")
    assert "Average Precision" in out.stdout
