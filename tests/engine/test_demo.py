"""``make demo`` end to end at a tiny size: the phantom study (stage 1, then CE, the control and WELDE
in the frozen stage) through the study code path, its study.json / study.md, the comparison report,
overlays, and the one-line summary printed last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from welde_det.checkpoint import load_checkpoint
from welde_det.engine import demo


def _state(run: Path):
    return load_checkpoint(run / "weights" / "model.pt").model_state


@pytest.mark.parametrize("framework", ["yolo", "rcnn"])
def test_demo_tiny(tmp_path, capsys, framework):
    size = ["--imgsz", "64"] if framework == "yolo" else ["--imgsz", "96"]
    out = tmp_path / "demo"
    assert demo.main(["--framework", framework, "--seeds", "1", "--n-images", "6", *size, "--epochs", "1",
                      "--stage2-epochs", "1", "--batch", "2", "--out", str(out), "--cache-dir", str(tmp_path / "gen"),
                      "--overlays", "2"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert list(study["methods"]) == ["ce", "ce_ensemble", "welde"] and study["seeds"] == [0]
    assert set(study["paired"]) == {"welde-ce_ensemble", "welde-ce", "welde-best_single"}
    md = (out / "study.md").read_text()
    assert "| ce |" in md and "| ce_ensemble |" in md and "| welde |" in md and "(tail)" in md
    rep = json.loads((out / "comparison" / "report.json").read_text())
    welde_run = out / study["methods"]["welde"]["runs"][0]["run_dir"]
    assert rep["compare"]["label"] == "CE ensemble"
    assert rep["map"] == json.loads((welde_run / "report.json").read_text())["map"]
    assert len(list((out / "overlays").glob("*.png"))) == 2 and len(list((out / "overlays").glob("*.json"))) == 2
    # WELDE's frozen stage started from the stage-1 checkpoint, and left its backbone as it was
    stage1_run = out / study["stage1_runs"][0]["run_dir"]
    welde_cfg = (welde_run / "config.yaml").read_text()
    assert f"{stage1_run.name}/weights/model.pt" in welde_cfg and "stage1_epochs: 0" in welde_cfg
    name = "model.0.conv.weight" if framework == "yolo" else "backbone.body.0.0.weight"
    assert torch.equal(_state(stage1_run)[name], _state(welde_run)[name])
    # the WELDE checkpoint stands alone: it still loads once the stage-1 run it started from is gone
    shutil.rmtree(stage1_run)
    from welde_det.engine.infer import load_detector

    assert len(load_detector(welde_run / "weights" / "model.pt", "cpu").names) == 6
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(("YOLOv8n: mAP CE", "Faster R-CNN: mAP CE")) and "min" in last and "mean of 1 seed" in last
    # honest selection: every run is its last epoch, measured on val, and the reports say so
    assert "last epoch" in md and "measured on the val split" in md
    assert "selected on the last epoch" in (welde_run / "report.md").read_text().lower()
