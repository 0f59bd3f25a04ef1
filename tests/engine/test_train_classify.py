"""tools/train.py --task classify end to end; checkpoint reload reproduces the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.test_classify import write_npz
from welde_det.engine.config import ConfigError
from welde_det.engine.run import run_training
from welde_det.evaluation.classification import classification_metrics
from welde_det.integrations.classify import load_classification_data
from welde_det.integrations.registry import load_model

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.arch=small_cnn", "batch=16", "lr=0.01"]


@pytest.mark.parametrize("config", ["cls_ce", "cls_ldam", "cls_welde", "cls_ce_ensemble"])
def test_train_classify_end_to_end_and_reload(tmp_path, config):
    npz = write_npz(tmp_path / "d.npz")
    run = run_training(ROOT / "configs" / f"{config}.yaml",
                       [f"data.source={npz}", f"output={tmp_path / 'runs'}", "epochs=2", "stage1_epochs=1", *FAST])
    rep = json.loads((run / "report.json").read_text())
    for name in ("weights/model.pt", "report.md", "config.yaml", "class_stats.json", "terms.csv"):
        assert (run / name).is_file(), name
    clf = load_model(run / "weights" / "model.pt", "cpu")
    x, y = load_classification_data(npz, channels=1).splits[rep["metrics"]["split"]]
    again = classification_metrics(y, clf.predict_proba(x), class_stats=clf.class_stats)
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "mcc", "map", "map_tail"):
        assert again[key] == pytest.approx(rep["metrics"][key], abs=1e-9), key
    if config == "cls_welde":
        header = (run / "terms.csv").read_text().splitlines()[0]
        for term in ("weight_ldam", "norm_focal", "diversity", "penalty"):
            assert term in header


def test_cli_prints_run_folder_last(tmp_path):
    npz = write_npz(tmp_path / "d.npz")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--task", "classify", "--config",
                          str(ROOT / "configs" / "cls_welde.yaml"), f"data.source={npz}",
                          f"output={tmp_path / 'runs'}", "epochs=1", "stage1_epochs=1", *FAST],
                         capture_output=True, text=True, check=True)
    run = Path(out.stdout.strip().splitlines()[-1])
    assert (run / "report.md").is_file() and run.parent == tmp_path / "runs"


def test_image_folder_run(tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("a", "b", "c")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 60, (24, 24), dtype=np.uint8)
            img[4 * c:4 * c + 6, 4:10] = 240
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"{i}.png"), img)
    run = run_training(ROOT / "configs" / "cls_focal.yaml",
                       [f"data.source={tmp_path / 'imgs'}", f"output={tmp_path / 'runs'}", "epochs=1", *FAST])
    assert json.loads((run / "report.json").read_text())["metrics"]["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize(("override", "match"), [
    (["loss.name=focall"], "unknown softmax loss .focall"),
    (["loss.mode=welde", "components=[ce,nope]"], "unknown softmax loss .nope"),
    (["loss.params.lmf.gamma=1.0"], "not among the heads"),
])
def test_bad_config(tmp_path, override, match):
    npz = write_npz(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match=match):
        run_training(ROOT / "configs" / "cls_ce.yaml",
                     [f"data.source={npz}", f"output={tmp_path / 'runs'}", "epochs=1", *FAST, *override])
