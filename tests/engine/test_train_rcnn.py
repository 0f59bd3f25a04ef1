"""Faster R-CNN backend: smoke runs, reload, resume, DDP launch (gloo, 2 processes), bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from welde_det.checkpoint import load_checkpoint, save_checkpoint
from welde_det.engine.config import ConfigError
from welde_det.engine.evaluate import predict_split
from welde_det.engine.run import check_weights_classes, run_training
from welde_det.integrations.registry import load_detector

ROOT = Path(__file__).resolve().parents[2]
TINY = ["n_images=6", "imgsz=96", "batch=2", "warmup_steps=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


def _tiny(tmp_path, cache, config="rcnn_welde", extra=()):
    return run_training(ROOT / "configs" / f"{config}.yaml",
                        [f"output={tmp_path / 'runs'}", f"cache_dir={cache}", "epochs=1", "stage1_epochs=1", *TINY,
                         *extra])


def test_welde_run_reload_and_resume(tmp_path, cache):
    run = _tiny(tmp_path, cache)
    for name in ("weights/model.pt", "stage1/weights/last.pt", "stage2/weights/last.pt", "report.json", "report.md",
                 "detections.json", "ground_truth.json", "terms.csv", "config.yaml"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [r["stage"] for r in rows] == ["stage1", "stage2"]
    # stage 1 is ordinary training with one ce head; the four WELDE heads arrive in stage 2
    assert rows[0]["loss_ce"] and not rows[0]["weight_ldam"] and rows[1]["weight_ldam"] and rows[1]["diversity"]
    ckpt = load_checkpoint(run / "weights" / "model.pt")
    assert (ckpt.framework, ckpt.stage, ckpt.epoch) == ("rcnn", "stage2", 0)
    det = load_detector(run / "weights" / "model.pt", "cpu")
    assert len(det.model.roi_heads.box_predictor.heads) == 4
    rep = json.loads((run / "report.json").read_text())
    assert rep["tail_classes"] == list(ckpt.class_stats.tail_names)
    assert "selected on the last epoch" in (run / "report.md").read_text().lower()
    # the saved detections are the reloaded model's on the measured split
    split = json.loads((run / "eval_split.json").read_text())
    assert split["split"] == "val" and not Path(split["images"]).is_absolute()
    again, _ = predict_split(det, run / "ground_truth.json", run / split["images"], conf=0.001, batch=2)
    saved = json.loads((run / "detections.json").read_text())
    assert again == saved
    # resume with one more epoch: continues stage 2 at its epoch 2, keeps the earlier rows
    run_training(None, ["epochs=2"], resume=run)
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [("stage1", 0), ("stage2", 1), ("stage2", 2)]
    assert load_checkpoint(run / "weights" / "model.pt").epoch == 1


def test_selection_on_a_holdout_keeps_the_best_epoch(tmp_path, cache):
    run = _tiny(tmp_path, cache, "rcnn_ce", ["stage1_epochs=0", "epochs=2", "n_images=12", "select=holdout",
                                             "select_fraction=0.3"])
    rows = list(csv.DictReader((run / "terms.csv").open()))
    fit = [float(r["select_map"]) for r in rows]
    best = load_checkpoint(run / "weights" / "model.pt")
    assert best.epoch == int(np.argmax(fit))  # first best epoch by holdout mAP
    assert "holdout carved from train" in (run / "report.md").read_text().lower()
    assert json.loads((run / "eval_split.json").read_text())["split"] == "val"


def test_single_loss_baseline_run_applies_conf(tmp_path, cache):
    """``train.conf`` is the saved detections' threshold for Faster R-CNN too (it was YOLO's only)."""
    run = _tiny(tmp_path, cache, "rcnn_ce", ["stage1_epochs=0", "conf=0.2"])
    assert json.loads((run / "report.json").read_text())["num_images"] > 0
    det = load_detector(run / "weights" / "model.pt", "cpu")
    split = json.loads((run / "eval_split.json").read_text())
    low, _ = predict_split(det, run / "ground_truth.json", run / split["images"], conf=0.0, batch=2)
    saved = json.loads((run / "detections.json").read_text())
    assert saved == [d for d in low if d["score"] >= 0.2]
    assert len(low) > len(saved)  # the threshold removed something


def test_bad_config(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"unknown softmax loss .focall"):
        _tiny(tmp_path, cache, "rcnn_ce", ["loss.name=focall"])
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(ConfigError, match=r"data\.source"):
        run_training(ROOT / "configs" / "rcnn_ce.yaml", [f"output={tmp_path / 'runs'}", "epochs=1", *TINY[1:],
                                                         f"data.source={tmp_path / 'nolabels'}"])
    reordered = tmp_path / "reordered.pt"
    from welde_det.classes import ClassStats

    names = ["LDB", "DDD", "Normal_IVD", "SS", "TDB", "Spondylolisthesis"]
    save_checkpoint(reordered, framework="rcnn", arch="fasterrcnn_mobilenet_v3_large_fpn", model_state={},
                    class_stats=ClassStats.from_counts(names, [5] * 6).to_dict(), config={}, stage="train")
    with pytest.raises(ConfigError, match="another class list"):
        _tiny(tmp_path, cache, "rcnn_ce", [f"model.weights={reordered}"])
    assert not any((tmp_path / "runs").iterdir())  # every failed run removed its (checkpoint-less) folder


def test_plain_weights_carry_no_class_list(tmp_path):
    from welde_det.checkpoint import class_names

    plain = tmp_path / "plain.pt"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, plain)
    assert class_names(plain) is None
    check_weights_classes(plain, ["a", "b"])  # transferable: no error


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_launch_gloo_two_processes(tmp_path, cache):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1"}
    out = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(ROOT / "tools" / "train.py"),
         "--config", str(ROOT / "configs" / "rcnn_welde.yaml"), f"output={tmp_path / 'runs'}", f"cache_dir={cache}",
         "epochs=1", "stage1_epochs=0", *TINY],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # both ranks used one run folder
    assert (runs[0] / "report.json").is_file() and (runs[0] / "weights" / "model.pt").is_file()
    assert load_checkpoint(runs[0] / "weights" / "model.pt").framework == "rcnn"
