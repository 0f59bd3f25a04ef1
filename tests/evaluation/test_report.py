"""Reports: files written, numbers in the tables, intervals, analyses, comparison column, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.evaluation.test_coco_exact import make_dataset
from welde_det.engine.evaluate import write_detection_report
from welde_det.evaluation import bootstrap_difference, evaluate_coco, froc_analysis, tide_errors
from welde_det.evaluation.report import report_dict, write_report

ROOT = Path(__file__).resolve().parents[2]


def test_report_files_and_numbers(tmp_path):
    gt, dets = make_dataset(4, n_cat=4)
    worse = [{**d, "score": d["score"] * 0.5} for d in dets[::2]]
    res = write_detection_report(gt, dets, tmp_path / "rep", compare=worse, compare_label="CE", title="t",
                                 n_resamples=200, selection="selected on the val split; measured on the test split")
    for name in ("report.json", "report.md", "pr_curves.png", "per_class_ap.png", "confusion.png", "tide.png",
                 "froc.png", "per_image.csv"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    text = (tmp_path / "rep" / "report.json").read_text()
    assert "NaN" not in text  # strict JSON
    rep = json.loads(text)
    assert rep["map"] == pytest.approx(res["stats"][0])
    assert rep["compare"]["label"] == "CE"
    assert rep["selection"] == "selected on the val split; measured on the test split"
    # the intervals and analyses are the library's, on the same input
    assert rep["intervals"]["map"]["value"] == pytest.approx(res["stats"][0], abs=1e-12)
    assert rep["intervals"]["n_resamples"] == 200 and "samples" not in rep["intervals"]
    assert rep["tide"]["map"] == pytest.approx(res["stats"][1], abs=1e-12)
    assert rep["tide"]["delta_map"] == pytest.approx(tide_errors(gt, dets)["delta_map"])
    assert rep["froc"]["mean"]["sensitivity"] == pytest.approx(froc_analysis(gt, dets)["mean"]["sensitivity"])
    diff = bootstrap_difference(gt, dets, worse, tail=res["tail_classes"], n_resamples=200)
    assert rep["difference"]["map"]["low"] == pytest.approx(diff["map"]["low"])
    assert rep["difference"]["map"]["value"] == pytest.approx(res["stats"][0] - rep["compare"]["map"], abs=1e-12)
    k0 = next(k for k, v in enumerate(res["per_class_ap"]) if v >= 0)
    row = rep["per_class"][k0]
    assert row["ap_ci"][0] <= row["ap"] <= row["ap_ci"][1]
    assert rep["per_image"]["file"] == "per_image.csv"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{100 * res['stats'][0]:.1f} (" in md  # value with its interval
    assert "**Model selection:** selected on the val split; measured on the test split." in md
    assert "mAP_tail" in md and "(tail)" in md and "| CE |" in md
    assert "Excluded from mAP_tail" in md  # the last category has no GT
    assert "## FROC" in md and "## Why boxes are missed" in md and "## Confusion matrix" in md
    assert "## Slices with the most missed tail boxes" in md
    assert rep["colocation"]["iou"] == 0.5 and rep["colocation_touching"]["iou"] == 0.1
    p = rep["colocation_touching"]["pairs"][0]  # random boxes: some of two classes overlap
    assert f"| {p['classes'][0]} + {p['classes'][1]} |" in md
    # per class: the paired difference beside the comparison's AP
    name = res["class_names"][k0]
    dk = rep["difference"]["per_class"][name]
    row_md = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} ") or ln.startswith(f"| **{name}**"))
    assert row_md.rstrip(" |").endswith(f"{100 * dk['value']:+.1f} ({100 * dk['low']:+.1f} to {100 * dk['high']:+.1f})")
    d = rep["difference"]["map"]
    assert f"{100 * d['value']:+.1f} ({100 * d['low']:+.1f} to {100 * d['high']:+.1f})" in md
    assert not list((tmp_path / "rep").glob(".*tmp"))


def test_ultralytics_flavour_is_shown_beside_pycocotools(tmp_path):
    gt, dets = make_dataset(2, n_cat=3)
    res = evaluate_coco(gt, dets, device="cpu")
    names = res["class_names"]
    res["ultralytics"] = {"map": 0.4321, "map50": 0.6543, "per_class": {n: 0.1 * (i + 1) for i, n in enumerate(names)},
                          "per_class_ap50": {n: 0.2 * (i + 1) for i, n in enumerate(names)}}
    write_report(res, tmp_path, plots=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["ultralytics"]["map"] == 0.4321
    assert rep["per_class"][1]["ap_ultralytics"] == pytest.approx(0.2)
    md = (tmp_path / "report.md").read_text()
    assert "Ultralytics flavour" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| mAP@[.5:.95] |"))
    assert line.split("|")[2].strip() == f"{100 * res['stats'][0]:.1f}" and line.split("|")[3].strip() == "43.2"
    # mAP_tail in the Ultralytics column: mean of its per-class AP over the tail classes with GT
    tail = [names.index(t) for t in res["tail_classes"] if t not in res["tail_excluded"]]
    tail_line = next(ln for ln in md.splitlines() if ln.startswith("| mAP_tail@[.5:.95] |"))
    assert tail_line.split("|")[3].strip() == f"{100 * np.mean([0.1 * (i + 1) for i in tail]):.1f}"
    tail50 = next(ln for ln in md.splitlines() if ln.startswith("| mAP_tail@.5 |"))
    assert tail50.split("|")[3].strip() == f"{100 * np.mean([0.2 * (i + 1) for i in tail]):.1f}"
    assert "selection" not in md.lower()  # no selection line unless given
    assert report_dict(res)["selection"] is None


def test_report_without_analysis_keeps_the_old_shape(tmp_path):
    gt, dets = make_dataset(3, n_cat=3)
    res = write_detection_report(gt, dets, tmp_path, analysis=False, plots=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "intervals" not in rep and "tide" not in rep and "analysis" not in res
    assert not (tmp_path / "per_image.csv").exists()
    md = (tmp_path / "report.md").read_text()
    assert f"| mAP@[.5:.95] | {100 * res['stats'][0]:.1f} |" in md


def _write(tmp_path, gt, dets, name):
    (tmp_path / name).write_text(json.dumps(dets))
    return str(tmp_path / name)


def test_cli(tmp_path):
    gt, dets = make_dataset(1, n_cat=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    d = _write(tmp_path, gt, dets, "d.json")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                          "--dets", d, "--out", str(tmp_path / "r"), "--no-plots", "--resamples", "100"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "r")
    assert "Average Precision" in out.stdout


def test_cli_compare_prints_the_paired_difference(tmp_path):
    gt, dets = make_dataset(6, n_cat=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    a = _write(tmp_path, gt, dets, "a.json")
    b = _write(tmp_path, gt, dets[::2], "b.json")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                          "--dets", a, "--compare", b, "--compare-label", "half", "--out", str(tmp_path / "r"),
                          "--no-plots", "--resamples", "300", "--seed", "3"],
                         capture_output=True, text=True, check=True)
    res = evaluate_coco(gt, dets, device="cpu")
    diff = bootstrap_difference(gt, dets, dets[::2], tail=res["tail_classes"], n_resamples=300, seed=3, device="cpu")
    lines = out.stdout.splitlines()
    for key, name in (("map", "mAP"), ("map_tail", "mAP_tail")):
        iv = diff[key]
        expect = (f"{name} difference (this run - half): {100 * iv['value']:+.2f} "
                  f"[95% CI {100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}]")
        assert expect in lines, (expect, lines)
    # the same sets: exactly zero
    same = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                           "--dets", a, "--compare", a, "--out", str(tmp_path / "s"), "--no-plots",
                           "--resamples", "100"], capture_output=True, text=True, check=True)
    assert "mAP difference (this run - baseline): +0.00 [95% CI +0.00, +0.00]" in same.stdout.splitlines()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    gt, dets = make_dataset(1, n_cat=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    bad = _write(tmp_path, gt, [{**dets[0], "image_id": 99999}], "bad.json")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                          "--dets", bad, "--out", str(tmp_path / "r"), "--no-plots"], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "99999" in lines[0]
    missing = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(tmp_path / "gt.json"),
                              "--dets", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.json: no such file" in missing.stderr
