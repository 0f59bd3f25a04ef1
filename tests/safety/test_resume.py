"""--resume: only the schedule may grow; every check runs before the run folder is touched, and config.yaml
changes only once the resumed training starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.safety.test_outputs_run import planted_yolo_folder, snapshot
from welde_det.engine.config import ConfigError, load_config
from welde_det.engine.run import RUN_RELATIVE_MARK, resume_overrides, run_training

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch YOLO run on a raw YOLO folder (given by a path relative to the working folder)."""
    base = tmp_path_factory.mktemp("resume")
    data = planted_yolo_folder(base / "user_data", base / "gen")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        run = run_training(ROOT / "configs" / "yolo_ce.yaml", [
            "epochs=1", "imgsz=64", "batch=4", "workers=0", "warmup_steps=1", "class_floor=1",
            "data.source=user_data", "output=runs"])
    finally:
        os.chdir(cwd)
    return base, data, (base / run).resolve()


def _copy(run: Path, name: str) -> Path:
    """A copy of the run folder beside it (its relative data path still resolves)."""
    dest = run.parent / name
    shutil.copytree(run, dest, symlinks=True)
    return dest


@pytest.mark.parametrize("override", ["imgsz=96", "data.source=elsewhere", "loss.name=focal", "train.lr=1e-4",
                                      "n_images=10", "measure=test"])
def test_a_non_schedule_override_is_refused_before_anything_is_written(finished, override):
    _, _, run = finished
    before = snapshot(run)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key!r} cannot change on resume"):
        run_training(None, [override], resume=run)
    assert snapshot(run) == before


def test_a_bad_schedule_value_is_refused_before_anything_is_written(finished):
    _, _, run = finished
    before = snapshot(run)
    with pytest.raises(ConfigError, match="epochs"):
        run_training(None, ["epochs=many"], resume=run)
    assert snapshot(run) == before


def test_growing_a_finished_yolo_stage_is_refused_and_the_folder_is_untouched(finished):
    """It used to rewrite config.yaml (epochs=2) and delete the stage's done.json before failing."""
    _, _, run = finished
    before = snapshot(run)
    with pytest.raises(ConfigError, match="cannot extend a finished YOLO stage"):
        run_training(None, ["epochs=2"], resume=run)
    assert snapshot(run) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1


def test_a_resume_that_fails_before_training_leaves_config_yaml_as_it_was(finished):
    base, data, run = finished
    copy = _copy(run, "no_data")
    shutil.rmtree(copy / "train")  # as if killed before the first epoch's checkpoint
    config = (copy / "config.yaml").read_bytes()
    moved = base / "moved_data"
    data.rename(moved)
    try:
        with pytest.raises(ConfigError, match=r"data\.source"):
            run_training(None, ["epochs=2"], resume=copy)
    finally:
        moved.rename(data)
    assert (copy / "config.yaml").read_bytes() == config


def test_growing_the_schedule_of_an_unfinished_stage_from_another_folder(finished, tmp_path, monkeypatch):
    """Run from elsewhere: paths resolve against the run folder; config.yaml is rewritten once the stage
    starts (seen by the backend) and keeps its relative paths."""
    import welde_det.engine.backends.yolo as yb

    _, data, run = finished
    copy = _copy(run, "grown")
    shutil.rmtree(copy / "train")
    seen = []
    real_fit = yb.YOLOBackend.fit_stage

    def fit_stage(self, cfg, stage, *a, **kw):  # what config.yaml says when the stage starts
        seen.append(yaml.safe_load((copy / "config.yaml").read_text())["train"]["epochs"])
        return real_fit(self, cfg, stage, *a, **kw)

    monkeypatch.setattr(yb.YOLOBackend, "fit_stage", fit_stage)
    monkeypatch.chdir(tmp_path)  # another working folder: the saved relative paths resolve against the run
    assert run_training(None, ["epochs=2"], resume=copy) == copy
    assert seen == [2]
    text = (copy / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert text.splitlines()[0] == RUN_RELATIVE_MARK and cfg["train"]["epochs"] == 2
    assert (copy / cfg["data"]["source"]).resolve() == data.resolve()
    assert (copy / "train" / "results.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_a_refused_override_through_the_cli_is_one_line(finished, tmp_path):
    _, _, run = finished
    before = snapshot(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--resume", str(run),
                          "data.source=/somewhere/else"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert "'data.source' cannot change on resume" in line
    assert snapshot(run) == before


def test_resume_overrides_rules(tmp_path):
    welde = load_config(ROOT / "configs" / "yolo_welde.yaml", ["stage1_epochs=2", "epochs=3"])
    assert resume_overrides(welde, ["epochs=5"], tmp_path).train.epochs == 5
    assert resume_overrides(welde, ["train.stage1_epochs=4"], tmp_path).train.stage1_epochs == 4
    with pytest.raises(ConfigError, match="shrink from 3 to 2"):
        resume_overrides(welde, ["epochs=2"], tmp_path)
    (tmp_path / "stage2").mkdir()
    with pytest.raises(ConfigError, match="stage stage2 has already begun"):
        resume_overrides(welde, ["stage1_epochs=3"], tmp_path)
    assert resume_overrides(welde, ["epochs=4"], tmp_path).train.epochs == 4  # the last stage may still grow
    without_stage1 = load_config(ROOT / "configs" / "yolo_welde.yaml", ["stage1_epochs=0", "model.weights=x.pt"])
    with pytest.raises(ConfigError, match="changes the stage plan"):
        resume_overrides(without_stage1, ["stage1_epochs=1"], tmp_path)
