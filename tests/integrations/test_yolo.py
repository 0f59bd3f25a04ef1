"""Ultralytics YOLO integration: criterion equals Ultralytics' own for K=1 ce, stage-2 trainable
set, fused scores through Ultralytics' NMS, checkpoint round trip, short runs of every config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.nms import non_max_suppression

from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names
from welde_det.welde import fuse

ROOT = Path(__file__).resolve().parents[2]
COUNTS = [10, 20, 30, 5, 3, 1]


def _batch():
    return {"img": torch.rand(2, 1, 128, 128), "batch_idx": torch.tensor([0.0, 0, 1]),
            "cls": torch.tensor([[1.0], [2], [5]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.6, 0.4, 0.3, 0.2]])}


def _pair(components=("ce",), mode="single"):
    torch.manual_seed(0)
    plain = DetectionModel("yolov8n.yaml", nc=6, ch=1, verbose=False)
    ours = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=components, class_counts=COUNTS, mode=mode,
                               objective_kw={"warmup_steps": 0} if mode != "single" else None)
    ours.load(plain, verbose=False)
    plain.args = ours.args = get_cfg()
    return plain, ours


def test_k1_ce_criterion_equals_ultralytics():
    plain, ours = _pair()
    batch = _batch()
    l1, i1 = plain.loss(batch)
    l2, i2 = ours.loss(batch)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-5)  # float32 summation order
    assert set(i1) == set(i2)


def test_welde_criterion_terms_and_gradients_reach_heads_only_in_stage2():
    _, ours = _pair(("ce", "focal", "cb", "ldam"), "welde")
    freeze = [f"model.{x}." for x in stage2_freeze_names(ours)]
    for n, p in ours.named_parameters():
        p.requires_grad_(not any(f in n for f in freeze))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".welde_heads." in n or n.endswith("objective.theta") for n in trainable)
    assert any(n.endswith("objective.theta") for n in trainable)
    ours.train()
    loss, _ = ours.loss(_batch())
    terms = ours.criterion.last_terms
    assert {"loss_ce", "loss_focal", "loss_cb", "loss_ldam", "diversity", "penalty"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    loss.sum().backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if ".welde_heads." in n and "classifiers" in n)
    # after a step the fusion buffer holds the normalised effective weights
    torch.testing.assert_close(ours.head.fusion_weight, ours.head.objective.fusion_weights())


def test_fused_scores_go_through_ultralytics_nms_unchanged():
    _, ours = _pair(("ce", "focal"), "welde")
    ours.head.fusion_weight.copy_(torch.tensor([0.7, 0.3]))
    with torch.no_grad():
        for p in ours.head.welde_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.eval()
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        y, preds = ours(x)
        fused = fuse(preds["scores_heads"], [0.7, 0.3], activation="sigmoid", dim=1)
    torch.testing.assert_close(y[:, 4:], fused, atol=1e-5, rtol=1e-4)
    out = non_max_suppression(y, 0.0, 0.7)[0]
    assert out.shape[1] == 6 and (out[:, 4] <= 1).all()


def test_short_runs_every_config_and_checkpoint_reload(tmp_path):
    """tools/train.py on a tiny phantom for each yolo_* config; the checkpoint reloads (ours and
    Ultralytics' YOLO) and gives the same detections as the saved detections.json."""
    from welde_det.engine.train import run_training
    from welde_det.engine.train_yolo import load_yolo_detector

    common = ["epochs=1", "imgsz=64", "n_images=6", "batch=4", "workers=0", "warmup_steps=1",
              f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}", "conf=0.0"]
    for name in ("ce", "focal", "cb", "ldam", "lmf", "ce_ensemble", "welde"):
        extra = ["stage1_epochs=1"] if name in ("ce_ensemble", "welde") else []
        run = run_training(ROOT / "configs" / f"yolo_{name}.yaml", [*common, *extra])
        rep = json.loads((run / "report.json").read_text())
        assert len(rep["stats"]) == 12 and rep["num_detections"] > 0
        assert rep["tail_classes"] == ["DDD", "TDB", "Spondylolisthesis"]
        assert (run / "weights" / "best.pt").is_file() and (run / "report.md").is_file()
    det = load_yolo_detector(run / "weights" / "best.pt")
    assert det.names == ["DDD", "LDB", "Normal_IVD", "SS", "TDB", "Spondylolisthesis"]
    assert len(det.model.head.components) == 4
    from welde_det.integrations.yolo import predict_coco_yolo

    split = json.loads((run / "eval_split.json").read_text())
    again = predict_coco_yolo(det.model, split["coco"], split["images"], det.class_stats, imgsz=det.imgsz,
                              channels=det.channels, conf=0.0)
    saved = json.loads((run / "detections.json").read_text())
    assert len(again) == len(saved) > 0
    for a, b in zip(again, saved):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)
    terms = (run / "stage2" / "terms.csv").read_text().splitlines()[0].split(",")
    assert {"weight_ce", "weight_ldam", "diversity"} <= set(terms)
    from ultralytics import YOLO

    y = YOLO(str(run / "weights" / "best.pt"))
    assert type(y.model).__name__ == "WELDEDetectionModel"


def test_bad_input(tmp_path):
    from welde_det.engine.config import ConfigError
    from welde_det.engine.train import run_training

    common = [f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}", "n_images=6", "imgsz=64"]
    with pytest.raises(ConfigError, match="not dense"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, "loss.name=nope_loss"])
    with pytest.raises(ConfigError, match="download"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, "model.arch=yolov8n.pt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no labels"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, f"data.source={empty}"])
    # a welde_det checkpoint trained on other classes cannot initialise this dataset's model
    other = tmp_path / "other.pt"
    torch.save({"welde_det": {"framework": "yolo", "class_stats": {"names": ["disc", "vertebra"]}}}, other)
    with pytest.raises(ConfigError, match=r"another class list.*\['disc', 'vertebra'\].*Normal_IVD"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, f"model.weights={other}"])
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


def test_ddp_worker_rebuilds_the_trainer_by_import(tmp_path):
    """Ultralytics' DDP launcher pickles the trainer class, args, model and callbacks into a script
    that each worker runs in a fresh process (``generate_ddp_file``). On CPU the script runs as one
    process: it must rebuild a WELDEDetectionTrainer by import, read the spec from the environment it
    inherits, train, and log each WELDE term once per epoch (callbacks not registered twice)."""
    import csv
    import os

    from ultralytics.utils.dist import generate_ddp_file

    from welde_det.engine.config import load_config
    from welde_det.engine.train_yolo import (
        _stages,
        _ultralytics_args,
        resolve_yolo_data,
        spec_env,
        stage_spec,
    )
    from welde_det.integrations.yolo import WELDEDetectionTrainer

    cfg = load_config(ROOT / "configs" / "yolo_welde.yaml",
                      ["stage1_epochs=0", "epochs=2", "imgsz=64", "n_images=6", "batch=4", "workers=0",
                       "warmup_steps=1", f"cache_dir={tmp_path / 'gen'}"])
    run = tmp_path / "run"
    data_yaml, splits, roots, stats = resolve_yolo_data(cfg, run)
    (stage,) = _stages(cfg)
    spec = stage_spec(cfg, stage, stats, cfg.model.arch, splits["val"], roots)
    with spec_env(spec):
        parent = WELDEDetectionTrainer(overrides=_ultralytics_args(cfg, data_yaml, run, stage, cfg.model.arch, None))
        script = Path(generate_ddp_file(parent))
        env = {**os.environ, "WELDE_DET_YOLO_SPEC": os.environ["WELDE_DET_YOLO_SPEC"], "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    finally:
        script.unlink(missing_ok=True)
        script.with_suffix(".pt").unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(run / "stage2" / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["welde_det"]["components"] == ["ce", "focal", "cb", "ldam"]
    assert type(ckpt["ema"]).__name__ == "WELDEDetectionModel" and ckpt["ema"].head.num_heads == 4
    assert ckpt["train_args"]["freeze"] == spec["freeze"]  # the stage-2 freeze list reached the worker
    rows = list(csv.DictReader((run / "stage2" / "terms.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]


def test_stage1_head_starts_every_stage2_head():
    """Loading a trained K=1 model into K=4: every head computes the stage-1 head's logits (to the
    jitter that tells same-loss heads apart), and no two heads share their down-projection."""
    _, k1 = _pair()
    with torch.no_grad():
        for p in k1.head.welde_heads.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" stage-1 head: non-identity adapter
    k1.head.objective.num_steps.fill_(240)  # stage 1 ran 240 steps
    k4 = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=("ce", "focal", "cb", "ldam"),
                             class_counts=COUNTS, mode="welde")
    k4.load(k1, verbose=False)
    assert int(k4.head.objective.num_steps) == 0  # warm-up and EMA bias correction start afresh
    k4.head.objective.num_steps.fill_(7)
    resumed = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=("ce", "focal", "cb", "ldam"),
                                  class_counts=COUNTS, mode="welde")
    resumed.load(k4, verbose=False)  # the same objective (Ultralytics' resume) keeps its state
    assert int(resumed.head.objective.num_steps) == 7
    k4.head.objective.num_steps.fill_(0)
    k1.eval(), k4.eval()
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        ref = k1(x)[1]["scores_heads"][0]
        heads = k4(x)[1]["scores_heads"]
    for z in heads:
        torch.testing.assert_close(z, ref, atol=0.05, rtol=0)
    downs = [a.down.weight for a in k4.head.welde_heads[0].adapters]
    assert all(not torch.equal(downs[0], d) for d in downs[1:])
