"""Training runner for image classification (``task: classify``).

Modes (``loss.mode``):

- ``single``: one head with one registry loss, trained end to end for
  ``train.stage1_epochs + train.epochs`` epochs;
- ``ce_ensemble`` / ``welde``: stage 1 trains the backbone with an ordinary CE head for
  ``train.stage1_epochs`` epochs (or starts from ``model.weights``); stage 2 freezes the
  backbone and trains only the K adapters, heads and WELDE weights for ``train.epochs``.

Writes into the run folder: ``weights/last.pt`` (model, objective, ClassStats, resolved
config), ``terms.csv`` (every WELDE term per epoch), ``report.json`` and ``report.md``
(metrics on the test split, per-class table, tail set).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from welde_det.classes import ClassStats
from welde_det.engine.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from welde_det.evaluation.classification import classification_metrics
from welde_det.integrations.classify import (
    ClassificationData,
    ImageClassifier,
    load_classification_data,
)
from welde_det.losses import available_losses, build_loss
from welde_det.losses.samplers import build_sampler
from welde_det.utils.fileio import atomic_write_json, atomic_write_text, atomic_writer
from welde_det.utils.logging import progress_enabled
from welde_det.welde import WELDEHeads, WELDEObjective, single_loss_objective

__all__ = ["evaluate_classifier", "fit_classifier", "load_classifier", "train"]

logger = logging.getLogger(__name__)


class _BackboneWithHead(torch.nn.Module):
    """Stage 1: the shared backbone with an ordinary CE head (discarded afterwards)."""

    def __init__(self, backbone: torch.nn.Module, head: WELDEHeads) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.backbone(x))


def _check_components(cfg: ExperimentConfig) -> tuple[str, ...]:
    comps = cfg.components
    valid = available_losses("softmax")
    unknown = [c for c in comps if c not in valid]
    if unknown:
        raise ConfigError(f"loss component(s) {unknown} are not registry losses; valid names: {valid}")
    extra = sorted(set(cfg.loss.params) - set(comps))
    if extra:
        raise ConfigError(f"loss.params names {extra}, which are not among the heads {list(comps)}")
    return comps


def _objective(cfg: ExperimentConfig, comps: Sequence[str], counts: Sequence[int]) -> WELDEObjective:
    losses = []
    for name in comps:
        kw = dict(cfg.loss.params.get(name, {}))
        if name in ("ldam", "lmf") and cfg.loss.drw_epoch >= 0:
            kw.setdefault("drw_epoch", cfg.loss.drw_epoch)
        losses.append((name, build_loss(name, class_counts=counts, **kw)))
    if cfg.loss.mode == "single":
        return single_loss_objective(*losses[0])
    return WELDEObjective(losses, ema_momentum=cfg.loss.ema_momentum, sum_penalty=cfg.loss.sum_penalty,
                          diversity=cfg.loss.diversity, weight_floor=cfg.loss.weight_floor,
                          warmup_steps=cfg.loss.warmup_steps)


def _loader(x: np.ndarray, y: np.ndarray, batch: int, *, sampler_name: str | None, seed: int, epochs: int,
            shuffle: bool) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    if sampler_name and shuffle:
        kw = {"total_epochs": epochs} if sampler_name == "progressive" else {}
        return DataLoader(ds, batch_size=batch, sampler=build_sampler(sampler_name, y, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 1-px shifts: cheap, label-preserving for medical crops."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def _run_epochs(model: torch.nn.Module, objective: WELDEObjective, loader: DataLoader, params: list, *, epochs: int,
                lr: float, weight_decay: float, device: torch.device, seed: int, desc: str,
                epoch_offset: int = 0, log: list | None = None) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    gen = torch.Generator().manual_seed(seed)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for epoch in range(epochs):
        model.train()
        objective.train()
        objective.set_epoch(epoch_offset + epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch_offset + epoch)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        it = loader
        if tqdm is not None and progress_enabled():
            it = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False)
        for xb, yb in it:
            xb, yb = _augment(xb, gen).to(device), yb.to(device)
            out = objective(model(xb), yb)
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch_offset + epoch}: {float(out['loss'])}; "
                                         "lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            for k, v in out.items():
                sums[k] += float(v.detach())
            steps += 1
        if log is not None:
            log.append({"stage": desc, "epoch": epoch_offset + epoch, **{k: v / max(steps, 1) for k, v in sums.items()}})


@torch.no_grad()
def predict(model: ImageClassifier, objective: WELDEObjective, x: np.ndarray, device: torch.device,
            batch: int = 256) -> np.ndarray:
    """Fused probabilities (N, C) for images (N, C, H, W)."""
    model.eval()
    w = objective.fusion_weights().to(device)
    out = [model.predict_proba(torch.from_numpy(x[i:i + batch]).to(device), w).cpu().numpy()
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.num_classes))


def fit_classifier(cfg: ExperimentConfig, data: ClassificationData, *, device: torch.device | None = None,
                   log: list | None = None) -> tuple[ImageClassifier, WELDEObjective, ClassStats]:
    """Train per ``cfg`` on ``data`` and return (model, objective, train ClassStats)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps = _check_components(cfg)
    xtr, ytr = data.splits["train"]
    num = len(data.class_names)
    if len(ytr) == 0:
        raise ValueError(f"{data.source}: the train split is empty")
    counts = np.bincount(ytr, minlength=num)
    stats = ClassStats(data.class_names, counts.tolist(), tail=list(cfg.data.tail) or None,
                       tail_threshold=cfg.data.tail_threshold or None, floor=1)
    torch.manual_seed(cfg.train.seed)
    model = ImageClassifier(cfg.model.arch, num, comps, in_channels=data.channels, weights=cfg.model.weights,
                            hidden=cfg.model.hidden or None).to(device)
    objective = _objective(cfg, comps, stats.effective_counts).to(device)
    loader = _loader(xtr, ytr, cfg.train.batch, sampler_name=cfg.data.sampler, seed=cfg.train.seed,
                     epochs=cfg.train.stage1_epochs + cfg.train.epochs, shuffle=True)
    common = {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "device": device, "seed": cfg.train.seed,
              "log": log}
    if cfg.loss.mode == "single":
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.train.freeze_backbone:
            model.freeze_backbone()
            params = list(model.heads.parameters())
        _run_epochs(model, objective, loader, params, epochs=cfg.train.stage1_epochs + cfg.train.epochs,
                    desc="train", **common)
        return model, objective, stats
    if cfg.train.stage1_epochs > 0:
        head = WELDEHeads(model.heads.adapters[0].down.in_features, num, ["ce"]).to(device)
        stage1 = _BackboneWithHead(model.backbone, head)
        ce = single_loss_objective("ce", build_loss("ce")).to(device)
        _run_epochs(stage1, ce, loader, list(stage1.parameters()), epochs=cfg.train.stage1_epochs, desc="stage 1",
                    **common)
    model.freeze_backbone()
    _run_epochs(model, objective, loader, [*model.heads.parameters(), *objective.parameters()],
                epochs=cfg.train.epochs, desc="stage 2", epoch_offset=cfg.train.stage1_epochs, **common)
    return model, objective, stats


def _save(path: Path, model: ImageClassifier, objective: WELDEObjective, stats: ClassStats, cfg: ExperimentConfig,
          metrics: dict[str, Any]) -> None:
    ckpt = {"framework": "classify", "model": model.state_dict(), "objective": objective.state_dict(),
            "components": list(objective.names), "arch": model.arch, "in_channels": model.in_channels,
            "class_stats": stats.to_dict(), "config": config_to_dict(cfg), "metrics": metrics}
    with atomic_writer(path, "wb") as f:
        torch.save(ckpt, f)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[
        ImageClassifier, WELDEObjective, dict[str, Any]]:
    """Rebuild (model, objective, checkpoint dict) from ``weights/last.pt``.

    Raises:
        ValueError: the file is not a welde_det classification checkpoint.
    """
    ckpt = torch.load(Path(path), map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("framework") != "classify":
        raise ValueError(f"{path}: not a welde_det classification checkpoint")
    cfg = config_from_dict(ckpt["config"], source=str(path))
    stats = ClassStats.from_dict(ckpt["class_stats"])
    comps = cfg.components
    model = ImageClassifier(ckpt["arch"], stats.num_classes, comps, in_channels=ckpt["in_channels"],
                            hidden=cfg.model.hidden or None)
    model.load_state_dict(ckpt["model"])
    objective = _objective(cfg, comps, stats.effective_counts)
    objective.load_state_dict(ckpt["objective"])
    return model.to(device).eval(), objective.to(device).eval(), ckpt


def evaluate_classifier(path: str | os.PathLike, source: str | os.PathLike, split: str = "test") -> dict[str, Any]:
    """Reload a checkpoint and compute its metrics on ``split`` of ``source``."""
    model, objective, ckpt = load_classifier(path)
    stats = ClassStats.from_dict(ckpt["class_stats"])
    data = load_classification_data(source, channels=ckpt["in_channels"])
    if data.class_names != list(stats.names):
        raise ValueError(f"{source}: classes {data.class_names} differ from the checkpoint's {list(stats.names)}")
    x, y = data.splits[split]
    return classification_metrics(y, predict(model, objective, x, torch.device("cpu")), class_stats=stats)


def _markdown(metrics: dict[str, Any], cfg: ExperimentConfig, split: str) -> str:
    lines = [f"# Classification report: {cfg.name}", "",
             f"Mode `{cfg.loss.mode}`, heads {list(cfg.components)}, arch `{cfg.model.arch}`, split `{split}`.", "",
             "| metric | value |", "|---|---:|"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "macro_recall", "mcc", "map",
                "map_tail"):
        lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += ["", f"Tail classes: {', '.join(metrics['tail_classes'])} — {metrics['tail_rule']}.", "",
              "| class | support | precision | recall | F1 | AP |", "|---|---:|---:|---:|---:|---:|"]
    for k, name in enumerate(metrics["class_names"]):
        mark = f"**{name}** (tail)" if name in metrics["tail_classes"] else name
        lines.append(f"| {mark} | {metrics['support'][k]} | {metrics['per_class_precision'][k]:.3f} | "
                     f"{metrics['per_class_recall'][k]:.3f} | {metrics['per_class_f1'][k]:.3f} | "
                     f"{metrics['per_class_ap'][k]:.3f} |")
    return "\n".join(lines) + "\n"


def train(cfg: ExperimentConfig, run_dir: Path, *, resume: str | os.PathLike | None = None) -> Path:
    """The ``task: classify`` runner (see the module docstring). Returns ``run_dir``."""
    if resume is not None:
        raise ConfigError("--resume is not supported for classification runs (they are short); start a new run")
    device = torch.device(cfg.train.device) if cfg.train.device else None
    data = load_classification_data(cfg.data.source, channels=cfg.data.channels, seed=cfg.data.seed)
    log: list[dict[str, Any]] = []
    model, objective, stats = fit_classifier(cfg, data, device=device, log=log)
    stats.save(run_dir / "class_stats.json")
    if log:
        keys = sorted({k for row in log for k in row}, key=lambda k: (k not in ("stage", "epoch"), k))
        with atomic_writer(run_dir / "terms.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(log)
    split = "test" if len(data.splits["test"][1]) else "val"
    x, y = data.splits[split]
    dev = next(model.parameters()).device
    metrics = classification_metrics(y, predict(model, objective, x, dev), class_stats=stats)
    metrics["split"] = split
    _save(run_dir / "weights" / "last.pt", model.cpu(), objective.cpu(), stats, cfg, metrics)
    atomic_write_json(run_dir / "report.json", {"config": config_to_dict(cfg), "class_stats": stats.to_dict(),
                                                "metrics": metrics})
    atomic_write_text(run_dir / "report.md", _markdown(metrics, cfg, split))
    logger.info("%s: macro-F1 %.3f  balanced acc %.3f  mAP %.3f  mAP_tail %.3f", cfg.name, metrics["macro_f1"],
                metrics["balanced_accuracy"], metrics["map"], metrics["map_tail"])
    return run_dir
