"""YOLO through the run skeleton: short runs of every yolo_* config and their reload, bad input, the CLI,
the repeat-factor sampler, 16-bit slices (ported from the old runner's tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from welde_det.checkpoint import load_checkpoint, save_checkpoint
from welde_det.classes import LUMBAR_CLASSES, ClassStats
from welde_det.engine.config import ConfigError
from welde_det.engine.evaluate import predict_split
from welde_det.engine.run import run_training
from welde_det.integrations.registry import load_detector

ROOT = Path(__file__).resolve().parents[2]


def test_short_runs_every_config_and_checkpoint_reload(tmp_path):
    """tools/train.py on a tiny phantom for each yolo_* config; the checkpoint reloads and gives exactly the
    saved detections.json."""
    common = ["epochs=1", "imgsz=64", "n_images=6", "batch=4", "workers=0", "warmup_steps=1",
              f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}", "conf=0.0"]
    for name in ("ce", "focal", "cb", "ldam", "lmf", "ce_ensemble", "welde"):
        extra = ["stage1_epochs=1"] if name in ("ce_ensemble", "welde") else []
        run = run_training(ROOT / "configs" / f"yolo_{name}.yaml", [*common, *extra])
        rep = json.loads((run / "report.json").read_text())
        assert len(rep["stats"]) == 12 and rep["num_detections"] > 0
        assert rep["tail_classes"] == ["DDD", "Spondylolisthesis", "TDB"]
        assert (run / "weights" / "model.pt").is_file() and (run / "report.md").is_file()
    ckpt = load_checkpoint(run / "weights" / "model.pt")
    assert (ckpt.framework, ckpt.stage) == ("yolo", "stage2") and ckpt.welde["components"] == [
        "ce", "focal", "cb", "ldam"]
    det = load_detector(run / "weights" / "model.pt", "cpu")
    assert det.names == list(LUMBAR_CLASSES) and len(det.model.head.components) == 4
    split = json.loads((run / "eval_split.json").read_text())
    again, _ = predict_split(det, run / "ground_truth.json", run / split["images"], conf=0.0, batch=4)
    assert again == json.loads((run / "detections.json").read_text()) and again
    terms = (run / "stage2" / "terms.csv").read_text().splitlines()[0].split(",")
    assert {"weight_ce", "weight_ldam", "diversity"} <= set(terms)


def test_bad_input(tmp_path):
    common = [f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}", "n_images=6", "imgsz=64"]
    with pytest.raises(ConfigError, match=r"unknown sigmoid loss .nope_loss.*Valid names"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, "loss.name=nope_loss"])
    with pytest.raises(ConfigError, match="download"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, "model.arch=yolov8n.pt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data\.source"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [f"output={tmp_path / 'runs'}", "imgsz=64",
                                                         f"data.source={empty}"])
    # a welde_det checkpoint trained on other classes cannot initialise this dataset's model
    other = tmp_path / "other.pt"
    save_checkpoint(other, framework="yolo", arch="yolov8n.yaml", model_state={}, config={}, stage="train",
                    class_stats=ClassStats.from_counts(["disc", "vertebra"], [3, 4]).to_dict())
    with pytest.raises(ConfigError, match=r"another class list.*\['disc', 'vertebra'\].*Normal_IVD"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, f"model.weights={other}"])
    with pytest.raises(ConfigError, match="cls_pw"):
        run_training(ROOT / "configs" / "yolo_welde.yaml", [*common, "loss.cls_pw=1.0"])
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-written: no run folders left behind


def test_cli_prints_run_folder_last(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config",
                          str(ROOT / "configs" / "yolo_ce.yaml"), "epochs=1", "imgsz=64", "n_images=6", "batch=4",
                          "workers=0", f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert Path(last).is_dir() and (Path(last) / "report.json").is_file()


def test_repeat_factor_sampler_reaches_both_detectors(tmp_path):
    """``data.sampler=repeat_factor``: the YOLO trainer's loader and the Faster R-CNN loader draw with it."""
    from welde_det.engine.backends.rcnn import CocoDetectionDataset, RCNNBackend
    from welde_det.engine.config import load_config
    from welde_det.engine.run import class_stats_for, resolve_run_data
    from welde_det.losses.samplers import RepeatFactorSampler

    cfg = load_config(ROOT / "configs" / "rcnn_ce.yaml", ["n_images=12", f"cache_dir={tmp_path / 'gen'}",
                                                          "data.sampler=repeat_factor", "repeat_threshold=0.5"])
    data = resolve_run_data(cfg, tmp_path / "run")
    stats = class_stats_for(cfg, data.splits["train"])
    ds = CocoDetectionDataset(data.splits["train"], data.image_roots["train"], stats, 1)
    _, sampler = RCNNBackend()._loader(cfg, ds, 1)
    assert isinstance(sampler, RepeatFactorSampler)
    with pytest.raises(ConfigError, match="repeat_threshold"):
        run_training(ROOT / "configs" / "rcnn_ce.yaml", ["repeat_threshold=0.5", f"output={tmp_path / 'r'}"])
    run = run_training(ROOT / "configs" / "yolo_ce.yaml", [
        "epochs=1", "imgsz=64", "n_images=6", "batch=4", "workers=0", "data.sampler=repeat_factor",
        f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}"])
    assert json.loads((run / "report.json").read_text())["stats"]


def test_phantom_16bit_trains_through_the_runner(tmp_path):
    """data.bit_depth=16: the phantom writes 16-bit PNGs and the trainer builds a HighBitYOLODataset."""
    import cv2

    from welde_det.datasets.resolve import yolo_view
    from welde_det.engine.backends.yolo import YOLOBackend, spec_env, ultralytics_args
    from welde_det.engine.config import load_config
    from welde_det.engine.run import class_stats_for, plan_stages, resolve_run_data
    from welde_det.integrations.yolo import HighBitYOLODataset, WELDEDetectionTrainer

    cfg = load_config(ROOT / "configs" / "yolo_ce.yaml", ["epochs=1", "imgsz=64", "n_images=6", "batch=4",
                                                          "workers=0", "data.bit_depth=16",
                                                          f"cache_dir={tmp_path / 'gen'}"])
    run = tmp_path / "run"
    data = resolve_run_data(cfg, run)
    first = data.image_roots["train"] / json.loads(data.splits["train"].read_text())["images"][0]["file_name"]
    assert cv2.imread(str(first), cv2.IMREAD_UNCHANGED).dtype.name == "uint16"
    stats = class_stats_for(cfg, data.splits["train"])
    backend = YOLOBackend()
    (stage,) = plan_stages(cfg)
    spec = backend.trainer_spec(cfg, stage, data, stats, None)
    data_yaml = yolo_view(backend.view(data), run / "data", channels=1)
    with spec_env(spec):
        trainer = WELDEDetectionTrainer(overrides=ultralytics_args(cfg, data_yaml, run, stage, validate=False))
        trainer.model = trainer.get_model(cfg=cfg.model.arch, weights=None)
        ds = trainer.build_dataset(trainer.data["train"], mode="train", batch=4)
    assert isinstance(ds, HighBitYOLODataset)
    done = run_training(cfg, [f"output={tmp_path / 'runs'}"])
    assert json.loads((done / "report.json").read_text())["stats"]
