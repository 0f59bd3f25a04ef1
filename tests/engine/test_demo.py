"""``make demo`` end to end at a tiny size: three runs, the summary table, the comparison report,
overlays, and the one-line summary printed last."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from welde_det.checkpoint import load_checkpoint
from welde_det.engine import demo


def _state(run):
    return load_checkpoint(demo._checkpoint(run)).model_state


@pytest.mark.parametrize("framework", ["yolo", "rcnn"])
def test_demo_tiny(tmp_path, capsys, framework):
    size = ["--imgsz", "64"] if framework == "yolo" else ["--imgsz", "96"]
    assert demo.main(["--framework", framework, "--n-images", "6", *size, "--epochs", "1", "--stage2-epochs", "1",
                      "--batch", "2", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "gen"),
                      "--overlays", "2"]) == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"ce", "ce_ensemble", "welde"}
    md = (out / "summary.md").read_text()
    assert "| CE |" in md and "| CE ensemble (control) |" in md and "| WELDE |" in md and "(tail)" in md
    rep = json.loads((out / "comparison" / "report.json").read_text())
    assert rep["compare"]["label"] == "CE" and rep["map"] == summary["runs"]["welde"]["map"]
    assert len(list((out / "overlays").glob("*.png"))) == 2 and len(list((out / "overlays").glob("*.json"))) == 2
    # WELDE's frozen stage started from the CE baseline's checkpoint, and left its backbone as it was
    ce_run, welde_run = next(out.glob(f"{framework}_ce-*")), next(out.glob(f"{framework}_welde-*"))
    welde_cfg = (welde_run / "config.yaml").read_text()
    assert f"{framework}_ce-" in welde_cfg and "stage1_epochs: 0" in welde_cfg
    name = "model.0.conv.weight" if framework == "yolo" else "backbone.body.0.0.weight"
    assert torch.equal(_state(ce_run)[name], _state(welde_run)[name])
    # the WELDE checkpoint stands alone: it still loads once the CE run it started from is gone
    shutil.rmtree(ce_run)
    from welde_det.engine.infer import load_detector

    assert len(load_detector(demo._checkpoint(welde_run), "cpu").names) == 6
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(("YOLOv8n: mAP CE", "Faster R-CNN: mAP CE")) and "min" in last
    # honest selection: every run is its last epoch, measured on val, and the reports say so
    assert "last epoch" in md and "measured on the validation split" in md
    assert "selected on the last epoch" in (welde_run / "report.md").read_text().lower()
