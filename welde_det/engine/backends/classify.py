"""Image-classification backend (``task: classify``): MedMNIST-style ``.npz`` or class-per-folder images.

The stage plan is :func:`welde_det.engine.stages.plan_stages` (the same meaning of
"frozen" as the detectors: only adapters, heads and θ train). A stage that follows
another starts from its backbone, every head from its head. The model is the last
epoch, or the best epoch by macro-F1 on a selection split (``train.select=val`` when
``train.measure=test``); the report measures ``train.measure``.

Writes ``weights/model.pt`` (the one schema; the objective's θ/EMA under ``objective.``),
``terms.csv``, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from welde_det.classes import ClassStats
from welde_det.engine.backends.base import Backend, device_for, welde_spec
from welde_det.engine.config import ConfigError, ExperimentConfig, config_to_dict
from welde_det.engine.stages import plan_stages, run_relative_paths, selection_label
from welde_det.evaluation.classification import classification_metrics
from welde_det.integrations.classifier import TrainedClassifier, build_classifier
from welde_det.integrations.classify import ClassificationData, load_classification_data
from welde_det.losses.samplers import build_sampler
from welde_det.utils.fileio import atomic_write_json, atomic_write_text, write_csv_rows
from welde_det.utils.logging import progress_enabled
from welde_det.welde.transfer import load_matching

__all__ = ["ClassifyBackend", "classification_markdown"]

logger = logging.getLogger(__name__)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 1-px shifts: cheap, label-preserving for medical crops."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def classification_markdown(metrics: dict[str, Any], cfg: ExperimentConfig, split: str, selection: str) -> str:
    """The report of a classification run."""
    lines = [f"# Classification report: {cfg.name}", "",
             f"Mode `{cfg.loss.mode}`, heads {list(cfg.components)}, arch `{cfg.model.arch}`.", "",
             f"**Selected on {selection}; measured on the {split} split.**", "",
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


class ClassifyBackend(Backend):
    """``model.framework: classify``."""

    framework = "classify"
    task = "classify"
    UNUSED = frozenset({"train.nbs", "train.conf", "train.imgsz", "data.bit_depth", "data.names",
                        "data.class_floor", "train.select_fraction", "loss.cls_pw", "data.repeat_threshold",
                        "train.cache_frozen", "train.cache_views"})

    def title(self, cfg: ExperimentConfig) -> str:
        return f"classifier ({cfg.model.arch})"

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.train.select == "holdout":
            raise ConfigError("train.select=holdout is for detection data; classification data has its own val "
                              "split: use train.select=val with train.measure=test, or last")
        if cfg.train.optimizer not in ("auto", "AdamW", "Adam", "SGD"):
            raise ConfigError(f"train.optimizer={cfg.train.optimizer!r}: the classify backend takes auto (AdamW), "
                              "AdamW, Adam or SGD")

    def run(self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool) -> Path:
        if resume:
            raise ConfigError("--resume is not supported for classification runs (they are short); start a new run")
        device = torch.device(device_for(cfg.train.device))
        data = load_classification_data(cfg.data.source, channels=cfg.data.channels, seed=cfg.data.seed)
        measure, select = cfg.train.measure, (None if cfg.train.select == "last" else cfg.train.select)
        for split in (measure, select):
            if split is not None and (split not in data.splits or not len(data.splits[split][1])):
                raise ConfigError(f"{data.source}: split {split!r} is empty or missing (splits: "
                                  f"{sorted(k for k, v in data.splits.items() if len(v[1]))})")
        if select in (measure, "train"):
            raise ConfigError(f"train.select={select!r} with train.measure={measure!r}: a figure must be measured "
                              "on a split that chose nothing (METHOD.md §5)")
        log: list[dict[str, Any]] = []
        trained, stats = self.fit(cfg, data, device=device, log=log, select=select)
        stats.save(run_dir / "class_stats.json")
        if log:
            keys = sorted({k for row in log for k in row}, key=lambda k: (k not in ("stage", "epoch"), k))
            write_csv_rows(run_dir / "terms.csv", log, fieldnames=keys)
        x, y = data.splits[measure]
        metrics = classification_metrics(y, trained.predict_proba(x), class_stats=stats)
        selection = selection_label(select)
        metrics.update({"split": measure, "selection": f"selected on {selection}; measured on the {measure} split"})
        self.save(run_dir / "weights" / "model.pt", trained, cfg, stats, metrics, run_dir=run_dir)
        stored = config_to_dict(run_relative_paths(cfg, run_dir))  # paths relative to the run folder
        atomic_write_json(run_dir / "report.json", {"config": stored, "class_stats": stats.to_dict(),
                                                    "metrics": metrics})
        atomic_write_text(run_dir / "report.md", classification_markdown(metrics, cfg, measure, selection))
        logger.info("%s: macro-F1 %.3f  balanced acc %.3f  mAP %.3f  mAP_tail %.3f (%s)", cfg.name,
                    metrics["macro_f1"], metrics["balanced_accuracy"], metrics["map"], metrics["map_tail"],
                    metrics["selection"])
        return run_dir

    @staticmethod
    def save(path: Path, trained: TrainedClassifier, cfg: ExperimentConfig, stats: ClassStats,
             metrics: dict[str, Any] | None = None, *, run_dir: Path | None = None) -> Path:
        """The classifier checkpoint; its config's paths relative to ``run_dir`` when given (none absolute)."""
        from welde_det.checkpoint import save_checkpoint

        stored = config_to_dict(run_relative_paths(cfg, run_dir) if run_dir is not None else cfg)
        return save_checkpoint(path, framework="classify", arch=cfg.model.arch,
                               model_state=trained.model.cpu().state_dict(),
                               class_stats=stats.to_dict(), config=stored, stage="final",
                               welde=trained.spec,
                               extra={"in_channels": trained.model.in_channels, "metrics": metrics or {}})

    def fit(self, cfg: ExperimentConfig, data: ClassificationData, *, device: torch.device | None = None,
            log: list | None = None, select: str | None = None) -> tuple[TrainedClassifier, ClassStats]:
        """Train every planned stage on ``data``; return the selected classifier and the train ClassStats."""
        device = device or torch.device(device_for(cfg.train.device))
        ytr = data.splits["train"][1]
        if len(ytr) == 0:
            raise ConfigError(f"{data.source}: the train split is empty")
        counts = np.bincount(ytr, minlength=len(data.class_names))
        # one label per image: image counts are the label counts, measured
        stats = ClassStats(data.class_names, counts.tolist(), image_counts=counts.tolist(),
                           tail=list(cfg.data.tail) or None, tail_threshold=cfg.data.tail_threshold or None)
        torch.manual_seed(cfg.train.seed)
        prev: TrainedClassifier | None = None
        for stage in plan_stages(cfg):
            spec = welde_spec(cfg, stage.components, stage.mode, "softmax")
            model = build_classifier(cfg.model.arch, list(stats.effective_counts), spec.to_dict(),
                                     in_channels=data.channels, weights=cfg.model.weights if prev is None else None)
            if prev is not None:  # the backbone, and every head as the previous stage's head
                model.backbone.load_state_dict(prev.model.backbone.state_dict())
                load_matching(model.heads, prev.model.heads.state_dict())
                if len(model.heads) > 1:
                    model.heads.spread_first_head()
            model = model.to(device)
            if stage.frozen:
                model.freeze_backbone()
                params = [*model.heads.parameters(), *model.objective.parameters()]
            else:
                params = list(model.parameters())
            prev = self._epochs(cfg, data, stage, model, params, device, log, select, stats)
        assert prev is not None
        return prev, stats

    def _epochs(self, cfg: ExperimentConfig, data: ClassificationData, stage: Any, model: Any, params: list,
                device: torch.device, log: list | None, select: str | None,
                stats: ClassStats) -> TrainedClassifier:
        xtr, ytr = data.splits["train"]
        ds = TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr))
        if cfg.data.sampler:
            kw = {"total_epochs": stage.epochs} if cfg.data.sampler == "progressive" else {}
            loader = DataLoader(ds, batch_size=cfg.train.batch, num_workers=cfg.train.workers,
                                sampler=build_sampler(cfg.data.sampler, ytr, seed=cfg.train.seed, **kw))
        else:
            loader = DataLoader(ds, batch_size=cfg.train.batch, shuffle=True, num_workers=cfg.train.workers,
                                generator=torch.Generator().manual_seed(cfg.train.seed))
        name = "AdamW" if cfg.train.optimizer == "auto" else cfg.train.optimizer
        opt_kw = {"momentum": 0.9} if name == "SGD" else {}
        opt = getattr(torch.optim, name)(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **opt_kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, stage.epochs * len(loader)))
        gen = torch.Generator().manual_seed(cfg.train.seed)
        amp = cfg.train.amp and device.type == "cuda"
        best: tuple[float, dict] | None = None
        since_best = 0
        for epoch in range(stage.epochs):
            gepoch = stage.epoch_offset + epoch
            model.train()
            objective = model.objective
            objective.set_epoch(gepoch)
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(gepoch)
            sums: dict[str, float] = defaultdict(float)
            steps = 0
            it = loader
            if progress_enabled():
                from tqdm import tqdm

                it = tqdm(loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", leave=False)
            for xb, yb in it:
                xb, yb = _augment(xb, gen).to(device), yb.to(device)
                with torch.autocast(device.type, enabled=amp):
                    out = objective(model(xb), yb)
                if not torch.isfinite(out["loss"]):
                    raise FloatingPointError(f"non-finite loss at epoch {gepoch}: {float(out['loss'])}; "
                                             "lower train.lr or check the data")
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()
                sched.step()
                for k, v in out.items():
                    sums[k] += float(v.detach())
                steps += 1
            row = {"stage": stage.name, "epoch": gepoch, **{k: v / max(steps, 1) for k, v in sums.items()}}
            if select is not None:
                xs, ys = data.splits[select]
                f1 = classification_metrics(ys, TrainedClassifier(model, stats, str(device)).predict_proba(xs),
                                            class_stats=stats)["macro_f1"]
                model.train()
                row["select_macro_f1"] = f1
                if best is None or f1 > best[0]:
                    best, since_best = (f1, copy.deepcopy(model.state_dict())), 0
                else:
                    since_best += 1
            if log is not None:
                log.append(row)
            if cfg.train.patience and since_best >= cfg.train.patience:
                break
        if best is not None:
            model.load_state_dict(best[1])
        return TrainedClassifier(model, stats, str(device))
