"""Real lumbar6 slices through the run skeleton: the YOLO folder, a 3-channel copy and its convert output
give the same training batch and the same first-step loss (same seed), for YOLO and Faster R-CNN.

Slices (names with trailing spaces among them) are copied from ``../shared/datasets/lumbar6`` by the
``sources`` fixture of ``tests/datasets/test_resolve.py``; skipped with a reason when it is absent. The
convert output renames files (pseudonyms), so batches are put in one canonical order — by a hash of
the pixels — before they are compared.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from tests.datasets.test_resolve import PUBLISHED, sources  # noqa: F401  (the fixture)
from welde_det.engine.config import load_config
from welde_det.engine.run import class_stats_for, plan_stages, resolve_run_data

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = ("grey", "rgb", "converted")


def _run_data(config: str, source: Path, run_dir: Path, *over: str):
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"data.source={source}", "imgsz=64", "batch=6",
                                                            "workers=0", "class_floor=1", f"output={run_dir}", *over])
    data = resolve_run_data(cfg, run_dir)
    return cfg, data, class_stats_for(cfg, data.splits["train"])


def _key(img: torch.Tensor) -> str:
    return hashlib.sha1(img.float().mul(1000).round().numpy().tobytes()).hexdigest()


def _yolo_batch_and_loss(sources, layout: str, tmp_path: Path):  # noqa: F811
    from welde_det.datasets.resolve import yolo_view
    from welde_det.engine.backends.yolo import YOLOBackend, spec_env, ultralytics_args
    from welde_det.integrations.yolo import WELDEDetectionTrainer

    run = tmp_path / layout
    cfg, data, stats = _run_data("yolo_ce", sources[layout], run)
    backend = YOLOBackend()
    stage = plan_stages(cfg)[0]
    spec = backend.trainer_spec(cfg, stage, data, stats, None)
    data_yaml = yolo_view(backend.view(data), run / "data", channels=cfg.data.channels)
    with spec_env(spec):
        trainer = WELDEDetectionTrainer(overrides=ultralytics_args(cfg, data_yaml, run, stage, validate=False))
        torch.manual_seed(0)
        model = trainer.model = trainer.get_model(cfg=cfg.model.arch, weights=None)
        ds = trainer.build_dataset(trainer.data["train"], mode="val", batch=6)  # no random augmentation
        items = sorted((ds[i] for i in range(len(ds))), key=lambda it: _key(it["img"]))
        batch = ds.collate_fn(items)
    model.args = trainer.args
    batch["img"] = batch["img"].float() / 255
    loss, parts = model.loss(batch)
    parts = {k: v.detach() for k, v in parts.items()} if isinstance(parts, dict) else {"items": parts.detach()}
    return batch, loss.detach(), parts, list(stats.names), list(stats.instance_counts)


def _rcnn_batch_and_loss(sources, layout: str, tmp_path: Path):  # noqa: F811
    from welde_det.engine.backends.base import welde_spec
    from welde_det.engine.backends.rcnn import CocoDetectionDataset
    from welde_det.integrations.rcnn import build_rcnn_model

    cfg, data, stats = _run_data("rcnn_ce", sources[layout], tmp_path / layout, "data.channels=1")
    ds = CocoDetectionDataset(data.splits["train"], data.image_roots["train"], stats, cfg.data.channels)
    items = sorted((ds[i] for i in range(len(ds))), key=lambda it: _key(it[0]))
    spec = welde_spec(cfg, cfg.components, "single", "softmax")
    torch.manual_seed(0)
    model = build_rcnn_model(RCNN_ARCH, list(stats.effective_counts), spec.to_dict(), channels=1, imgsz=64)
    model.train()
    torch.manual_seed(1)  # the RPN / RoI samplers draw at random
    targets = [{k: v for k, v in t.items() if k != "image_id"} for _, t in items]
    losses = model([x for x, _ in items], targets)
    return items, {k: v.detach() for k, v in losses.items()}, list(stats.names)


RCNN_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"


def test_yolo_same_batch_and_first_step_loss_for_every_layout(sources, tmp_path):  # noqa: F811
    out = {layout: _yolo_batch_and_loss(sources, layout, tmp_path) for layout in LAYOUTS}
    ref_batch, ref_loss, ref_parts, names, counts = out["grey"]
    assert names == PUBLISHED and sum(counts) > 0  # the published class order, names with spaces and parentheses
    assert ref_batch["img"].shape[0] == 6 and ref_loss.sum() > 0
    for layout in LAYOUTS[1:]:
        batch, loss, parts, other_names, other_counts = out[layout]
        assert (other_names, other_counts) == (names, counts), layout
        assert torch.equal(batch["img"], ref_batch["img"]), layout
        for key in ("cls", "bboxes", "batch_idx"):
            assert torch.equal(batch[key], ref_batch[key]), (layout, key)
        assert torch.equal(loss, ref_loss), layout
        assert set(parts) == set(ref_parts) and all(torch.equal(parts[k], ref_parts[k]) for k in parts), layout


def test_rcnn_same_batch_and_first_step_loss_for_every_layout(sources, tmp_path):  # noqa: F811
    out = {layout: _rcnn_batch_and_loss(sources, layout, tmp_path) for layout in LAYOUTS}
    ref_items, ref_losses, names = out["grey"]
    assert names == PUBLISHED and len(ref_items) == 6
    for layout in LAYOUTS[1:]:
        items, losses, other_names = out[layout]
        assert other_names == names
        for (x, t), (rx, rt) in zip(items, ref_items):
            assert torch.equal(x, rx) and torch.equal(t["boxes"], rt["boxes"]) and torch.equal(t["labels"],
                                                                                              rt["labels"])
        assert set(losses) == set(ref_losses) and all(torch.equal(losses[k], ref_losses[k]) for k in losses), layout
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in ref_losses.values())
