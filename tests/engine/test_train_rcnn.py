"""Faster R-CNN runner: smoke runs, reload, resume, DDP launch (gloo, 2 processes), bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from welde_det.engine.config import ConfigError
from welde_det.engine.train import run_training
from welde_det.engine.train_rcnn import CocoDetectionDataset, load_rcnn, predict_coco

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
    for name in ("weights/last.pt", "report.json", "report.md", "detections.json", "terms.csv", "config.yaml"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    # stage 1 is ordinary training with one ce head; the four WELDE heads arrive in stage 2
    assert rows[0]["loss_ce"] and not rows[0]["weight_ldam"] and rows[1]["weight_ldam"] and rows[1]["diversity"]
    model, ckpt = load_rcnn(run / "weights" / "last.pt")
    assert len(model.roi_heads.box_predictor.heads) == 4 and not ckpt["stage1_model"]
    from welde_det.classes import ClassStats

    stats = ClassStats.from_dict(ckpt["class_stats"])
    cfg_split = json.loads((run / "report.json").read_text())
    assert cfg_split["tail_classes"] == list(stats.tail_names)
    val = sorted((cache).rglob("annotations/val.json"))[0]
    again = predict_coco(model, CocoDetectionDataset(val, val.parent.parent / "images", stats, 1), stats)
    saved = json.loads((run / "detections.json").read_text())
    assert len(again) == len(saved)
    for a, b in zip(again, saved):
        assert a["category_id"] == b["category_id"] and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
    # resume with one more epoch: continues at epoch 2, keeps the earlier rows
    run_training(None, ["epochs=2"], resume=run)
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]


def test_single_loss_baseline_run(tmp_path, cache):
    run = _tiny(tmp_path, cache, "rcnn_ce", ["stage1_epochs=0"])
    assert json.loads((run / "report.json").read_text())["num_images"] > 0


def test_bad_config(tmp_path, cache):
    with pytest.raises(ConfigError, match="not registry losses"):
        _tiny(tmp_path, cache, "rcnn_ce", ["loss.name=focall"])
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(ConfigError, match="expected a COCO dataset folder"):
        _tiny(tmp_path, cache, "rcnn_ce", [f"data.source={tmp_path / 'nolabels'}"])
    reordered = tmp_path / "reordered.pt"
    names = ["LDB", "DDD", "Normal_IVD", "SS", "TDB", "Spondylolisthesis"]
    torch.save({"framework": "rcnn", "model": {}, "class_stats": {"names": names}}, reordered)
    with pytest.raises(ConfigError, match="another class list"):
        _tiny(tmp_path, cache, "rcnn_ce", [f"model.weights={reordered}"])
    assert not any((tmp_path / "runs").iterdir())  # every failed run removed its (checkpoint-less) folder


def test_plain_weights_carry_no_class_list(tmp_path):
    from welde_det.engine.infer import checkpoint_class_names
    from welde_det.engine.train import check_weights_classes

    plain = tmp_path / "plain.pt"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, plain)
    assert checkpoint_class_names(plain) is None
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
    assert (runs[0] / "report.json").is_file() and (runs[0] / "weights" / "last.pt").is_file()
    assert torch.load(runs[0] / "weights" / "last.pt", weights_only=False)["framework"] == "rcnn"
