"""The cached frozen stage (#16): loss and gradients equal the through-network ones on the same batch (YOLO and
Faster R-CNN), cached views cycle over epochs, both backends run it end to end into the one checkpoint schema with
the frozen network unchanged, and the settings it cannot honour are ConfigErrors."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from welde_det.checkpoint import load_checkpoint
from welde_det.engine.config import ConfigError
from welde_det.engine.run import run_training
from welde_det.integrations.registry import load_detector

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _perturb_adapters(model: torch.nn.Module) -> None:
    """Adapters start as the identity (zero up-projection), which gives their down-projection no gradient;
    a trained adapter does not, so move the up-projections off zero."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


# ----------------------------------------------------------------------------------------- YOLO
def _yolo_frozen_model(dtype: torch.dtype):
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names
    from welde_det.welde import build_spec

    torch.manual_seed(0)
    spec = build_spec(components=("ce", "focal", "ldam"), mode="welde", activation="sigmoid",
                      objective_kw={"warmup_steps": 0})
    model = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, class_counts=[50, 30, 10, 5, 3, 1],
                                **spec.model_kwargs()).to(dtype)
    model.args = get_cfg(DEFAULT_CFG)
    model.head.spread_first_head()
    _perturb_adapters(model)
    # what the frozen stage's trainer does: Ultralytics' freeze= names, their BatchNorm in eval mode
    frozen = [f"model.{x}." for x in stage2_freeze_names(model)] + [".dfl"]
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    model.train()
    for name, m in model.named_modules():
        if any(f in name for f in frozen) and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_yolo_cached_loss_and_gradients_equal_through_network(dtype, tol):
    """Same batch: the cached path's loss items and every trainable parameter's gradient equal the network's, with
    the cache built image by image (other batching than the through-network pass)."""
    from welde_det.engine.cache.yolo import (
        yolo_cached_loss,
        yolo_decoded_boxes,
        yolo_frozen_outputs,
    )

    model = _yolo_frozen_model(dtype)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(4, 1, 64, 64, generator=g, dtype=dtype)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 0, 1, 2, 3]),
             "cls": torch.tensor([[0.0], [3], [5], [1], [2]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4],
                                     [0.2, 0.7, 0.1, 0.2], [0.5, 0.4, 0.3, 0.3]])}
    net, cached = copy.deepcopy(model), copy.deepcopy(model)
    loss_net, items_net = net.loss(dict(batch))
    loss_net.sum().backward()
    outs = [yolo_frozen_outputs(cached, img[i:i + 1]) for i in range(4)]
    stems = [torch.cat([o[0][lvl] for o in outs]) for lvl in range(3)]
    boxes = torch.cat([o[1] for o in outs])
    # the cache's layout: channels-last stems, (anchors, 4·reg_max) DFL rows, the boxes decoded once
    stems = [s.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for s in stems]
    boxes = boxes.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    decoded = yolo_decoded_boxes(cached, stems, boxes)
    # decoding leaves no criterion behind: Ultralytics sets the model's class weights (read when the criterion
    # is made) after the training loader — the cache — is built
    assert getattr(cached, "criterion", None) is None
    loss_c, items_c = yolo_cached_loss(cached, {**batch, "stems": stems, "boxes": boxes, "pred_bboxes": decoded})
    loss_c.sum().backward()
    # without the decoded boxes the loss decodes them itself: the same loss
    with torch.no_grad():
        again, _ = yolo_cached_loss(copy.deepcopy(cached), {**batch, "stems": stems, "boxes": boxes})
    assert _rel_err(again, loss_c.detach()) <= tol

    assert float(items_net["cls_loss"]) > 0 and float(items_net["box_loss"]) > 0
    assert _rel_err(loss_net.detach(), loss_c.detach()) <= tol
    for k in items_net:
        assert abs(float(items_net[k]) - float(items_c[k])) <= tol * max(1.0, abs(float(items_net[k]))), k
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    theirs = dict(cached.named_parameters())
    assert len(trainable) == 55 and "model.22.objective.theta" in trainable  # 3 levels × 3 heads × (4 + 2) + θ
    assert not any(".cv2." in n or ".cv3." in n or n.startswith("model.0.") for n in trainable)
    # float64 checks every gradient relative to itself; in float32 a gradient that is a cancelling sum (the
    # adapters' down weights, ~1e-10 behind near-zero up weights) carries the rounding noise of its summands,
    # which depends on the thread count, so it is compared on the scale of the largest gradient
    scale = max(float(p.grad.abs().max()) for p in trainable.values() if p.grad is not None)
    for name, p in trainable.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        if dtype == torch.float64:
            assert _rel_err(p.grad, theirs[name].grad) <= tol, name
        else:
            assert float((p.grad - theirs[name].grad).abs().max()) <= tol * scale, name
    # the frozen network received nothing and its BatchNorm statistics did not move
    assert all(p.grad is None for n, p in cached.named_parameters() if n not in trainable)
    for (n, a), b in zip(model.state_dict().items(), cached.state_dict().values()):
        if "running_" in n:
            assert torch.equal(a, b), n


def test_cached_views_cycle_over_epochs():
    """Epoch e reads view e mod V; every image of the view once per epoch, with its own labels."""
    from welde_det.engine.cache.yolo import CachedLoader, YOLOFeatureCache

    n, views = 5, 2
    stems = [torch.arange(n * views, dtype=torch.float32).reshape(-1, 1, 1, 1)]
    boxes = torch.zeros(n * views, 1, 4)
    cls = [torch.full((e % 3 + 1, 1), float(e)) for e in range(n * views)]
    bboxes = [torch.full((e % 3 + 1, 4), 0.5) for e in range(n * views)]
    cache = YOLOFeatureCache(stems, boxes, None, cls, bboxes, n, views, 32, 0.0)
    epoch = {"e": 0}
    loader = CachedLoader(cache, 2, dataset=None, epoch_fn=lambda: epoch["e"], seed=0)
    assert len(loader) == 3 and len(loader.sampler) == n
    for e in range(4):
        epoch["e"] = e
        seen = []
        for b in loader:
            rows = b["stems"][0].reshape(-1).long().tolist()
            seen += rows
            assert b["img"].shape == (len(rows), 0, 32, 32)
            # labels travel with their entry: cls holds the entry number, batch_idx the position in the batch
            for j, r in enumerate(rows):
                assert b["cls"][b["batch_idx"] == j].reshape(-1).tolist() == [float(r)] * (r % 3 + 1)
        assert sorted(seen) == [(e % views) * n + i for i in range(n)]
    # with a detection sampler, each epoch visits the sampler's draw of that epoch (rare images repeated)
    from welde_det.losses import build_detection_sampler

    sampler = build_detection_sampler("repeat_factor", [[0], [0], [0], [0], [1]], threshold=0.5, seed=3)
    loader = CachedLoader(cache, 2, dataset=None, epoch_fn=lambda: epoch["e"], seed=0, sampler=sampler)
    for e in range(3):
        epoch["e"] = e
        rows = [r for b in loader for r in b["stems"][0].reshape(-1).long().tolist()]
        sampler.set_epoch(e)
        assert rows == [(e % views) * n + i for i in sampler]
        assert rows.count((e % views) * n + 4) >= 1


def _frozen_trainer_setup(tmp_path, phantom, overrides=()):
    """The spec and Ultralytics arguments of a phantom frozen stage (every random augmentation at zero)."""
    from welde_det.datasets.resolve import yolo_view
    from welde_det.engine.backends.yolo import YOLOBackend, ultralytics_args
    from welde_det.engine.config import load_config
    from welde_det.engine.run import class_stats_for, plan_stages, resolve_run_data

    cfg = load_config(ROOT / "configs" / "yolo_welde.yaml", [
        "stage1_epochs=0", "epochs=2", "imgsz=128", "batch=16", "nbs=16", "n_images=6", f"cache_dir={phantom}",
        "workers=0", f"output={tmp_path}", "warmup_steps=1", "cache_frozen=true", *overrides])
    data = resolve_run_data(cfg, tmp_path)
    stats = class_stats_for(cfg, data.splits["train"])
    (stage,) = plan_stages(cfg)
    backend = YOLOBackend()
    spec = backend.trainer_spec(cfg, stage, data, stats, None)
    data_yaml = yolo_view(backend.view(data), tmp_path / "data", channels=cfg.data.channels)
    args = {**ultralytics_args(cfg, data_yaml, tmp_path, stage, validate=False),
            "translate": 0.0, "scale": 0.0, "fliplr": 0.0, "hsv_v": 0.0}
    return spec, args


def test_yolo_cached_trainer_equals_through_network_trainer(tmp_path, phantom):
    """Ultralytics' whole loop — optimiser groups, schedule, accumulation, EMA — over two epochs: with every random
    augmentation at zero and one batch per epoch, the cached trainer (plain views) ends with the through-network
    trainer's heads, θ and EMA model (to 1e-8) and the same loss items; the frozen network is untouched."""
    from welde_det.engine.backends.yolo import spec_env
    from welde_det.engine.cache.yolo import CachedFrozenTrainer, yolo_trainable
    from welde_det.integrations.yolo import WELDEDetectionTrainer, _core

    spec, args = _frozen_trainer_setup(tmp_path, phantom)
    out = []
    for cls in (WELDEDetectionTrainer, CachedFrozenTrainer):
        with spec_env(spec):
            trainer = cls(overrides={**args, "name": cls.__name__})
            trainer.train()
        out.append((_core(trainer.model).state_dict(), trainer.ema.ema.state_dict(), trainer.tloss))
    (model_a, ema_a, loss_a), (model_b, ema_b, loss_b) = out
    assert float(loss_a["cls_loss"]) > 0 and float(loss_a["box_loss"]) > 0
    for k in loss_a:
        assert abs(float(loss_a[k]) - float(loss_b[k])) <= 1e-6, k
    heads = [k for k in model_a if yolo_trainable(k) and model_a[k].is_floating_point()]
    assert any(not torch.equal(model_a[k], ema_a[k]) for k in heads)  # they trained
    for k in heads:
        assert float((model_a[k] - model_b[k]).abs().max()) <= 1e-8, k
    for k, v in ema_a.items():
        if v.is_floating_point():
            assert float((v - ema_b[k]).abs().max()) <= 1e-8, k
    assert all(torch.equal(v, model_b[k]) for k, v in model_a.items() if not yolo_trainable(k))
    if hasattr(trainer.ema, "_pairs"):  # the cached EMA averaged only what the stage trains: the same EMA, as above
        assert len(trainer.ema._pairs[0]) == sum(yolo_trainable(k) and v.is_floating_point() for k, v in ema_b.items())


@pytest.mark.parametrize(("every_s", "writes"), [(3600.0, [0, 2]), (0.0, [0, 1, 2])])
def test_cached_stage_checkpoints_at_most_once_per_interval(tmp_path, phantom, monkeypatch, every_s, writes):
    """train.checkpoint_every_s: the cached frozen stage writes Ultralytics' checkpoint at its first and last epoch
    and otherwise at most once per interval (0 = every epoch); terms.csv still has every epoch."""
    from welde_det.engine.backends.yolo import spec_env
    from welde_det.engine.cache.yolo import CachedFrozenTrainer
    from welde_det.integrations.yolo import WELDEDetectionTrainer

    spec, args = _frozen_trainer_setup(tmp_path, phantom, ["epochs=3", f"train.checkpoint_every_s={every_s}"])
    saved = []
    parent = WELDEDetectionTrainer.save_model
    monkeypatch.setattr(WELDEDetectionTrainer, "save_model", lambda self: saved.append(self.epoch) or parent(self))
    with spec_env(spec):
        trainer = CachedFrozenTrainer(overrides={**args, "name": "throttled"})
        trainer.train()
    assert saved == writes
    rows = list(csv.DictReader((trainer.save_dir / "terms.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert (trainer.save_dir / "weights" / "last.pt").is_file()
    # TensorBoard has every step's terms (one event per step); per epoch they average to the terms.csv row
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(trainer.save_dir / "tensorboard"))
    board.Reload()
    assert {f"welde/{k}" for k in rows[0] if k not in ("epoch", "stage")} == set(board.Tags()["scalars"])
    steps = len(trainer.train_loader)
    for term in ("weight_ce", "loss_ldam", "diversity"):
        events = board.Scalars(f"welde/{term}")
        assert [e.step for e in events] == list(range(1, 3 * steps + 1))
        for epoch, row in enumerate(rows):
            mean = sum(e.value for e in events[epoch * steps:(epoch + 1) * steps]) / steps
            assert mean == pytest.approx(float(row[term]), rel=1e-5, abs=1e-7), (term, epoch)


def test_resume_drops_the_terms_of_epochs_it_redoes(tmp_path):
    """A resumed stage starts at the checkpoint's epoch; the terms.csv rows of later epochs (written before the
    kill, not in the checkpoint) are dropped so the redone epochs are not listed twice."""
    from types import SimpleNamespace

    from welde_det.integrations.yolo import _on_train_start
    from welde_det.utils.fileio import append_csv_row

    for epoch in range(4):
        append_csv_row(tmp_path / "terms.csv", {"epoch": epoch, "stage": 2, "weight_ce": 0.25 + epoch})
    _on_train_start(SimpleNamespace(save_dir=tmp_path, start_epoch=2))
    rows = list(csv.DictReader((tmp_path / "terms.csv").open()))
    assert [(int(r["epoch"]), float(r["weight_ce"])) for r in rows] == [(0, 0.25), (1, 1.25)]
    _on_train_start(SimpleNamespace(save_dir=tmp_path, start_epoch=0))  # a fresh start keeps what is there
    assert len(list(csv.DictReader((tmp_path / "terms.csv").open()))) == 2


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory, phantom):
    """A YOLO WELDE run (stage 1, then the cached frozen stage with two augmented views)."""
    out = tmp_path_factory.mktemp("yolo_cached")
    return run_training(ROOT / "configs" / "yolo_welde.yaml", [
        "epochs=2", "stage1_epochs=1", "imgsz=64", "n_images=6", "batch=4", "workers=0", "warmup_steps=1",
        f"output={out / 'runs'}", f"cache_dir={phantom}", "conf=0.0", "cache_frozen=true", "cache_views=2"])


def test_yolo_cached_frozen_run(yolo_run):
    """tools/train.py's pipeline with train.cache_frozen=true and two augmented views: the frozen stage trains only
    the heads and θ (every frozen tensor, BatchNorm statistics included, equals the model it started from), writes
    the one checkpoint schema, and the run reports on it."""
    run = yolo_run
    s1 = load_checkpoint(run / "stage1" / "weights" / "model.pt").model_state
    s2 = load_checkpoint(run / "stage2" / "weights" / "model.pt")
    assert (s2.framework, s2.stage, s2.epoch) == ("yolo", "stage2", 1)
    moved = {k for k, v in s2.model_state.items() if k in s1 and v.is_floating_point() and not torch.equal(v, s1[k])}
    assert moved and all(".welde_heads." in k or ".objective." in k or "fusion_weight" in k for k in moved), moved
    assert any(k.endswith("running_mean") for k in s1)  # BatchNorm statistics were among the compared tensors
    rows = list(csv.DictReader((run / "stage2" / "results.csv").open()))
    assert len(rows) == 2 and float(rows[-1]["train/cls_loss"]) > 0
    assert "weight_ldam" in (run / "stage2" / "terms.csv").read_text().splitlines()[0]
    assert json.loads((run / "report.json").read_text())["num_detections"] > 0
    assert len(load_detector(run / "weights" / "model.pt", "cpu").model.head.components) == 4


def test_seeds_of_a_frozen_stage_share_one_plain_cache(yolo_run, tmp_path, phantom, monkeypatch):
    """Two frozen stages from the same stage-1 weights in one process, seeds 1 and 2, plain views: the frozen network
    runs once; the second run trains on the first run's cache and still writes its own model."""
    import welde_det.engine.cache.yolo as cache_yolo
    from welde_det.engine.cache import forget_cache
    from welde_det.engine.cache.yolo import yolo_trainable

    builds = []
    build = cache_yolo.build_yolo_cache
    monkeypatch.setattr(cache_yolo, "build_yolo_cache", lambda *a, **k: builds.append(1) or build(*a, **k))
    forget_cache()
    runs = [run_training(ROOT / "configs" / "yolo_welde.yaml", [
        "epochs=1", "stage1_epochs=0", f"model.weights={yolo_run / 'stage1' / 'weights' / 'model.pt'}", "imgsz=64",
        "n_images=6", "batch=4", "workers=0", "warmup_steps=1", f"output={tmp_path / 'runs'}", f"name=seed{seed}",
        f"cache_dir={phantom}", "conf=0.0", "cache_frozen=true", f"train.seed={seed}"]) for seed in (1, 2)]
    forget_cache()
    assert len(builds) == 1
    for r in runs:
        assert len(list(csv.DictReader((r / "stage2" / "results.csv").open()))) == 1
    a, b = (load_checkpoint(r / "weights" / "model.pt").model_state for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a if not yolo_trainable(k))  # one frozen network, so one cache


# ------------------------------------------------------------------------------------ Faster R-CNN
def _rcnn_batch(dtype: torch.dtype):
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 64, 64, generator=g, dtype=dtype) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 30, 30], [20, 30, 50, 60]], dtype=dtype), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.0, 12, 40, 36]], dtype=dtype), "labels": torch.tensor([2])},
               {"boxes": torch.zeros((0, 4), dtype=dtype), "labels": torch.zeros((0,), dtype=torch.int64)}]
    return images, targets


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rcnn_cached_loss_and_gradients_equal_through_network(dtype, tol):
    """Same images, same sampled RoIs (the through-network draw replayed): equal classification and box losses,
    WELDE terms and gradients of every trainable parameter; the frozen backbone's statistics stay put."""
    from welde_det.engine.cache.rcnn import (
        RCNNFeatureCache,
        rcnn_cached_losses,
        rcnn_frozen_outputs,
    )
    from welde_det.integrations.rcnn import build_faster_rcnn, freeze_for_stage2, train_frozen

    torch.manual_seed(0)
    model = build_faster_rcnn("fasterrcnn_mobilenet_v3_large_fpn", foreground_counts=[5, 3, 2], in_channels=1,
                              min_size=64, max_size=64, components=("ce", "ldam", "focal"), mode="welde",
                              objective_kw={"warmup_steps": 0}).to(dtype)
    model.roi_heads.objective.float()  # the losses compute in float32 whatever the logits' dtype
    _perturb_adapters(model)
    freeze_for_stage2(model)
    train_frozen(model)
    images, targets = _rcnn_batch(dtype)
    net, cached = copy.deepcopy(model), copy.deepcopy(model)
    drawn = []
    subsample = net.roi_heads.subsample
    net.roi_heads.subsample = lambda labels: drawn.append(subsample(labels)) or drawn[-1]
    losses_net = net(images, targets)
    sum(losses_net.values()).backward()

    parts = [rcnn_frozen_outputs(cached, images[i:i + 1], targets[i:i + 1], 64) for i in range(3)]
    cache = RCNNFeatureCache(*[[t for p in parts for t in p[j]] for j in range(3)], build_seconds=0.0)
    assert all(len(s) <= len(lab) for s, lab in zip(drawn[0], cache.labels))
    losses_c = rcnn_cached_losses(cached, cache, [0, 1, 2], sampled=drawn[0])
    sum(losses_c.values()).backward()

    for k in ("loss_classifier", "loss_box_reg"):
        assert float(losses_net[k].detach()) > 0
        assert abs(float(losses_net[k].detach() - losses_c[k].detach())) <= tol * float(losses_net[k].detach()), k
    for k, v in net.roi_heads.last_terms.items():
        assert abs(float(v) - float(cached.roi_heads.last_terms[k])) <= tol * max(1.0, abs(float(v))), k
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    theirs = dict(cached.named_parameters())
    assert len(trainable) == 18 and "roi_heads.objective.theta" in trainable  # 3 × (adapter 4 + classifier 2) + θ
    for name, p in trainable.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        assert _rel_err(p.grad, theirs[name].grad) <= tol, name
    for (n, a), b in zip(model.state_dict().items(), net.state_dict().values()):
        if "running_" in n:  # train_frozen: a through-network step leaves the backbone's statistics alone
            assert torch.equal(a, b), n
    # without a replayed draw the cache samples with torchvision's sampler: ≤ 512 RoIs an image, ≤ 25 % foreground
    torch.manual_seed(3)
    rcnn_cached_losses(cached, cache, [0, 1, 2])
    for lab in cache.labels:
        pos, neg = model.roi_heads.fg_bg_sampler([lab])
        assert int(pos[0].sum()) <= 128 and int(pos[0].sum() + neg[0].sum()) <= 512


def test_rcnn_cached_frozen_run_with_selection(tmp_path, phantom):
    """The rcnn backend's frozen stage through the cache, selected on a holdout with patience: per-epoch rows with
    the selection mAP, best/last/model checkpoints in the one schema, the frozen network unchanged."""
    run = run_training(ROOT / "configs" / "rcnn_welde.yaml", [
        f"output={tmp_path / 'runs'}", f"cache_dir={phantom}", "epochs=2", "stage1_epochs=1", "n_images=8",
        "imgsz=64", "batch=2", "warmup_steps=1", "cache_frozen=true", "select=holdout", "select_fraction=0.3",
        "patience=3"])
    rows = [r for r in csv.DictReader((run / "terms.csv").open()) if r["stage"] == "stage2"]
    assert len(rows) == 2 and all(r["select_map"] != "" and r["weight_ldam"] for r in rows)
    assert all(r["loss_objectness"] == "" for r in rows)  # the RPN's (constant) losses are not computed
    last = load_checkpoint(run / "stage2" / "weights" / "last.pt")
    assert last.extra["cached"] is True and last.optimizer_state is not None
    s1 = load_checkpoint(run / "stage1" / "weights" / "model.pt").model_state
    s2 = load_checkpoint(run / "stage2" / "weights" / "model.pt")
    assert (s2.framework, s2.stage) == ("rcnn", "stage2") and s2.extra["source"] in ("best.pt", "last.pt")
    for ck in (last, s2):  # no absolute path in a checkpoint: the config's paths are relative to the run folder
        assert str(tmp_path) not in json.dumps(ck.config) and str(phantom) not in json.dumps(ck.config)
    for k, v in s2.model_state.items():
        if k.startswith(("backbone.", "rpn.", "roi_heads.box_head.", "roi_heads.box_predictor.bbox_pred.")):
            assert torch.equal(v, s1[k]), k
    assert "holdout" in (run / "report.md").read_text()
    assert len(load_detector(run / "weights" / "model.pt", "cpu").model.roi_heads.box_predictor.heads) == 4


# ------------------------------------------------------------------------------------------ errors
def test_settings_the_cache_cannot_honour(tmp_path, phantom, monkeypatch):
    common = [f"output={tmp_path / 'runs'}", f"cache_dir={phantom}", "n_images=6", "imgsz=64", "epochs=1",
              "batch=4", "workers=0"]
    with pytest.raises(ConfigError, match=r"cache_frozen=true, but this run has no frozen stage"):
        run_training(ROOT / "configs" / "yolo_ce.yaml", [*common, "cache_frozen=true"])
    with pytest.raises(ConfigError, match=r"train\.cache_views.*not used"):
        run_training(ROOT / "configs" / "yolo_welde.yaml", [*common, "cache_views=2"])
    with pytest.raises(ConfigError, match=r"rcnn backend does not augment"):
        run_training(ROOT / "configs" / "rcnn_welde.yaml", [*common, "cache_frozen=true", "cache_views=2"])
    with pytest.raises(ConfigError, match=r"one device"):
        run_training(ROOT / "configs" / "yolo_welde.yaml", [*common, "cache_frozen=true", "device=0,1"])
    with pytest.raises(ConfigError, match=r"train\.cache_frozen.*not used by the 'classify' backend"):
        run_training(ROOT / "configs" / "cls_welde.yaml", [f"output={tmp_path / 'runs'}", "cache_frozen=true"])
    with pytest.raises(ConfigError, match=r"cache_views=-1"):
        run_training(ROOT / "configs" / "yolo_welde.yaml", [*common, "cache_frozen=true", "cache_views=-1"])
    # over the memory limit: refused with the estimate before the cache is filled; no half-made run folder
    monkeypatch.setenv("WELDE_CACHE_MAX_GB", "0.00001")
    with pytest.raises(ConfigError, match=r"YOLO cache would take about .* MiB per image view × \d+ views.*"
                                          r"WELDE_CACHE_MAX_GB"):
        run_training(ROOT / "configs" / "yolo_welde.yaml", [*common, "cache_frozen=true", "stage1_epochs=0",
                                                            "name=over"])
    (run,) = (tmp_path / "runs").glob("over-*")
    assert not list(run.rglob("*.pt"))  # refused before the frozen stage trained a step


def test_cache_reused_only_for_the_same_frozen_network_and_data(tmp_path):
    """Runs sharing a frozen network, images and settings (a study's methods and seeds) build the cache once; a
    different frozen tensor — a BatchNorm statistic included — or a changed image builds a new one."""
    from welde_det.engine.cache import (
        files_fingerprint,
        forget_cache,
        frozen_fingerprint,
        remembered,
    )
    from welde_det.engine.cache.yolo import yolo_trainable

    model = _yolo_frozen_model(torch.float32)
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    builds = []

    def key(m):
        return ["yolo", frozen_fingerprint(m, yolo_trainable), files_fingerprint([image]), {"imgsz": 64}]

    def build():
        builds.append(object())
        return builds[-1]

    forget_cache()
    first = remembered(key(model), build, "test")
    trained = copy.deepcopy(model)
    with torch.no_grad():  # the heads and θ train: same frozen network, same cache
        for name, p in trained.named_parameters():
            if yolo_trainable(name):
                p.add_(1.0)
    assert remembered(key(trained), build, "test") is first and len(builds) == 1
    moved = copy.deepcopy(model)
    moved.model[0].bn.running_mean.add_(1e-6)
    assert remembered(key(moved), build, "test") is not first and len(builds) == 2
    image.write_bytes(b"other")
    assert remembered(key(moved), build, "test") is builds[-1] and len(builds) == 3
    forget_cache()
