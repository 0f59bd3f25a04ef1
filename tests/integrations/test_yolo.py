"""Ultralytics YOLO integration: criterion equals Ultralytics' own for K=1 ce (with and without its
cls_pw class weights), stage-2 trainable set, fused scores through Ultralytics' NMS, the WELDE spec's
kwargs, the trainer's repeat-factor loader, and a DDP worker rebuilt by import."""

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
from welde_det.welde import WELDESpec, build_spec, fuse

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


def test_ddp_worker_rebuilds_the_trainer_by_import(tmp_path):
    """Ultralytics' DDP launcher pickles the trainer class, args, model and callbacks into a script
    that each worker runs in a fresh process (``generate_ddp_file``). On CPU the script runs as one
    process: it must rebuild a WELDEDetectionTrainer by import, read the spec from the environment it
    inherits, train through the repeat-factor loader, and log each WELDE term once per epoch
    (callbacks not registered twice)."""
    import csv
    import os

    from ultralytics.utils.dist import generate_ddp_file

    from welde_det.checkpoint import safe_load
    from welde_det.integrations.yolo import SPEC_ENV, WELDEDetectionTrainer

    data_yaml, _ = _tiny_yolo_folder(tmp_path / "data")
    spec = build_spec(components=("ce", "focal", "cb", "ldam"), mode="welde", activation="sigmoid",
                      objective_kw={"warmup_steps": 1})
    env_spec = json.dumps({"welde": spec.to_dict(), "class_counts": [11.0, 2.0], "sampler": "repeat_factor",
                           "repeat_threshold": 0.5})
    args = {"model": "yolov8n.yaml", "data": str(data_yaml), "epochs": 2, "imgsz": 64, "batch": 4, "workers": 0,
            "device": "cpu", "project": str(tmp_path / "runs"), "name": "stage", "exist_ok": True, "plots": False,
            "seed": 0, "verbose": False, "warmup_epochs": 0.0, "close_mosaic": 0}
    os.environ[SPEC_ENV] = env_spec
    try:
        parent = WELDEDetectionTrainer(overrides=args)
        script = Path(generate_ddp_file(parent))
    finally:
        del os.environ[SPEC_ENV]
    env = {**os.environ, SPEC_ENV: env_spec, "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    finally:
        script.unlink(missing_ok=True)
        script.with_suffix(".pt").unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "stage"
    ckpt = safe_load(run / "weights" / "last.pt", allow_modules=True)
    meta = json.loads((run / "weights" / "welde_det.json").read_text())
    assert meta["welde"] == spec.to_dict() and meta["framework"] == "yolo"
    assert type(ckpt["ema"]).__name__ == "WELDEDetectionModel" and ckpt["ema"].head.num_heads == 4
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"weight_ce", "weight_ldam", "diversity"} <= set(rows[0])


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


def test_spec_kwargs_build_the_model_and_refuse_heads_that_cannot_work():
    spec = build_spec(components=("ce", "ldam"), mode="welde", activation="sigmoid",
                      objective_kw={"warmup_steps": 0})
    m = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, class_counts=COUNTS, **spec.model_kwargs())
    assert WELDESpec.from_dict({k: v for k, v in m.welde_spec.items() if k != "class_counts"}) == spec
    assert m.head.objective.losses[1].s == 1.0 and m.head.welde_heads[0].head_types == ("linear", "linear")
    with pytest.raises(ValueError, match="prior bias"):
        WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, class_counts=COUNTS, components=("ldam",), heads=("cosine",))
    with pytest.raises(ValueError, match="activation='softmax'"):
        WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, class_counts=COUNTS, activation="softmax")
    with pytest.raises(ValueError, match="needs class_counts"):
        WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=("cb",))


def test_cls_pw_class_weights_equal_ultralytics_in_single_ce_mode():
    """Ultralytics' trainer sets ``model.class_weights`` from cls_pw; v8DetectionLoss multiplies each
    class column of the BCE by them. K = 1 ``ce`` gives the same loss, and a different one than without."""
    weights = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 1.0])
    plain, ours = _pair()
    batch = _batch()
    unweighted = ours.loss(batch)[0]
    plain, ours = _pair()
    plain.class_weights = ours.class_weights = weights
    l1, _ = plain.loss(batch)
    l2, _ = ours.loss(batch)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-5)
    assert ours.criterion.class_weights is not None
    assert not torch.allclose(l2[1], unweighted[1])  # the cls term moved; box and dfl did not
    torch.testing.assert_close(l2[[0, 2]], unweighted[[0, 2]])


@pytest.mark.parametrize(("components", "mode"), [(("ce", "focal"), "welde"), (("ce", "ce"), "ce_ensemble"),
                                                  (("focal",), "single")])
def test_cls_pw_class_weights_are_refused_where_they_mean_nothing(components, mode):
    _, ours = _pair(components, mode)
    ours.class_weights = torch.ones(6)
    with pytest.raises(ValueError, match=f"no meaning for mode '{mode}'"):
        ours.loss(_batch())


def _tiny_yolo_folder(root: Path) -> tuple[Path, list[list[int]]]:
    """12 grayscale 64 px images: class 0 in 10 of them, class 1 in 2 (f = 1/6), one without boxes."""
    import cv2
    import numpy as np

    classes = [[0]] * 9 + [[0, 1], [1], []]
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, cls in enumerate(classes):
        cv2.imwrite(str(root / "images" / "train" / f"im {i}.png"), rng.integers(0, 255, (64, 64), dtype=np.uint8))
        rows = [f"{c} {0.3 + 0.3 * k} 0.5 0.2 0.2" for k, c in enumerate(cls)]
        (root / "labels" / "train" / f"im {i}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    cv2.imwrite(str(root / "images" / "val" / "v.png"), np.zeros((64, 64), np.uint8))
    (root / "labels" / "val" / "v.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nchannels: 1\n"
                                    "names:\n  0: common\n  1: rare\n")
    return root / "data.yaml", classes


def _trainer(tmp_path, monkeypatch, *, sampler="repeat_factor", cls_pw=0.0, mode="single", components=("ce",),
             overrides=None):
    from welde_det.integrations.yolo import SPEC_ENV, WELDEDetectionTrainer

    data_yaml, classes = _tiny_yolo_folder(tmp_path / "data")
    spec = build_spec(components=components, mode=mode, activation="sigmoid", cls_pw=cls_pw)
    monkeypatch.setenv(SPEC_ENV, json.dumps({"welde": spec.to_dict(), "class_counts": [11.0, 2.0],
                                             "sampler": sampler, "repeat_threshold": 0.5}))
    args = {"model": "yolov8n.yaml", "data": str(data_yaml), "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu",
            "project": str(tmp_path / "runs"), "name": "t", "plots": False, "seed": 3, "verbose": False,
            **(overrides or {})}
    trainer = WELDEDetectionTrainer(overrides=args)
    trainer.model = trainer.get_model(cfg="yolov8n.yaml", verbose=False)
    return trainer, classes


def test_yolo_trainer_dataloader_draws_repeat_factors(tmp_path, monkeypatch):
    """The trainer's training loader samples images with frequency r_i / Σ r (LVIS repeat factors)."""
    import itertools

    import numpy as np

    from welde_det.losses.samplers import RepeatFactorSampler

    trainer, classes = _trainer(tmp_path, monkeypatch)
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=4, rank=-1, mode="train")
    sampler = loader.sampler
    assert isinstance(sampler, RepeatFactorSampler) and sampler.threshold == 0.5 and sampler.seed == 3
    files = [Path(f).stem for f in loader.dataset.im_files]
    per_image = [classes[int(name.split()[-1])] for name in files]  # the dataset's own order
    r = np.array([max((np.sqrt(0.5 / (2 / 12)) if c == 1 else 1.0 for c in cls), default=1.0) for cls in per_image])
    np.testing.assert_allclose(sampler.factors, r)
    # Ultralytics' InfiniteDataLoader re-iterates its sampler pass after pass (each a new draw)
    passes = 3000
    drawn = np.concatenate(list(itertools.islice(iter(loader.batch_sampler), passes * 4)))
    share = np.bincount(drawn, minlength=len(r)) / len(drawn)
    # tolerance: 5 binomial standard deviations of each image's share over the draws
    expected = r / r.sum()
    assert np.all(np.abs(share - expected) <= 5 * np.sqrt(expected * (1 - expected) / len(drawn)))
    batch = next(iter(loader))
    assert batch["img"].shape[1] == 1 and batch["img"].shape[0] == 4
    val = trainer.get_dataloader(trainer.data["val"], batch_size=2, rank=-1, mode="val")
    assert not isinstance(val.sampler, RepeatFactorSampler)


def test_yolo_trainer_sampler_and_cls_pw_settings(tmp_path, monkeypatch):
    trainer, _ = _trainer(tmp_path, monkeypatch, sampler=None, cls_pw=0.5)
    assert trainer.args.cls_pw == 0.5
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=4, rank=-1, mode="train")
    assert type(loader.sampler).__name__ == "RandomSampler"  # no sampler asked: Ultralytics' own shuffling
    trainer.train_loader = loader
    trainer.set_class_weights()  # Ultralytics' own: (1 / n_c)^cls_pw from the training labels, mean 1
    w = trainer.model.class_weights
    n = torch.tensor([10.0, 2.0])
    ref = n.pow(-0.5) / n.pow(-0.5).mean()
    torch.testing.assert_close(w.float().cpu(), ref)
    trainer.model.args = trainer.args
    crit = trainer.model.init_criterion()
    torch.testing.assert_close(crit.class_weights.reshape(-1).float(), ref)


def test_yolo_trainer_refuses_bad_sampler_and_conflicting_cls_pw(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a detection sampler"):
        _trainer(tmp_path / "a", monkeypatch, sampler="class")
    with pytest.raises(ValueError, match=r"cls_pw=0\.3 in Ultralytics' arguments but 0\.0"):
        _trainer(tmp_path / "b", monkeypatch, sampler=None, overrides={"cls_pw": 0.3})
