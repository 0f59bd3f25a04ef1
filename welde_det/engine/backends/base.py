"""The backend protocol and what all detection backends share."""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any

from welde_det.classes import ClassStats
from welde_det.engine.config import ConfigError, ExperimentConfig

__all__ = ["PHANTOM_KEYS", "Backend", "DetectionBackend", "device_for", "welde_spec"]

logger = logging.getLogger(__name__)

#: keys only the phantom reads
PHANTOM_KEYS = frozenset({"data.n_images", "data.difficulty", "data.contrast", "data.cache_dir"})


def device_for(spec: str) -> str:
    """A torch device string for ``train.device`` (``""`` = CUDA when available; ``"0,1"`` -> ``cuda:0``)."""
    import torch

    if not spec:
        return "cuda" if torch.cuda.is_available() else "cpu"
    first = spec.split(",")[0].strip()
    device = f"cuda:{first}" if first.isdigit() else first
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r}: no CUDA device is available here; use train.device=cpu "
                          "(or leave it empty for the best available)")
    return device


def welde_spec(cfg: ExperimentConfig, components: tuple[str, ...], mode: str, activation: str):
    """The one :class:`~welde_det.welde.spec.WELDESpec` of a stage, built from the config once.

    Only the loss parameters of the stage's own components are passed; ``loss.params``
    naming a loss that no stage trains is an error.
    """
    from welde_det.welde.spec import build_spec

    every = set(cfg.components) | {"ce"}
    stray = sorted(set(cfg.loss.params) - every)
    if stray:
        raise ConfigError(f"loss.params names {stray}, which are not among the heads {list(cfg.components)}")
    params = {k: dict(v) for k, v in cfg.loss.params.items() if k in components}
    objective_kw = {"ema_momentum": cfg.loss.ema_momentum, "sum_penalty": cfg.loss.sum_penalty,
                    "diversity": cfg.loss.diversity, "weight_floor": cfg.loss.weight_floor,
                    "warmup_steps": cfg.loss.warmup_steps} if mode != "single" else {}
    try:
        return build_spec(components=tuple(components), mode=mode, activation=activation, loss_params=params,
                          drw_epoch=cfg.loss.drw_epoch, objective_kw=objective_kw, hidden=cfg.model.hidden or None,
                          head=cfg.loss.head, cls_pw=cfg.loss.cls_pw)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from exc


class Backend:
    """What a framework implements; :mod:`welde_det.engine.run` does the rest.

    Detection backends implement :meth:`DetectionBackend.fit_stage`; a backend of another task
    (classification) implements ``run(cfg, run_dir, *, resume) -> Path`` whole.

    Attributes:
        framework: the ``model.framework`` name, also the checkpoint's ``framework``.
        task: ``"detect"`` or ``"classify"``.
    """

    framework: str = ""
    task: str = "detect"
    #: the heads' activation: ``"sigmoid"`` (dense YOLO heads) or ``"softmax"``
    activation: str = "softmax"
    #: config keys this backend never reads (a non-default value is an error)
    UNUSED: frozenset[str] = frozenset()

    def unused_keys(self, cfg: ExperimentConfig) -> set[str]:
        """Keys that would be ignored for this config (the phantom's keys when the source is not the phantom)."""
        keys = set(self.UNUSED)
        if cfg.data.source != "phantom":
            keys |= PHANTOM_KEYS
        if not cfg.train.cache_frozen:  # the views are those of the cache
            keys.add("train.cache_views")
        return keys

    def check(self, cfg: ExperimentConfig) -> None:
        """Framework-specific validation of the config (before any folder is made)."""
        if cfg.task != self.task:
            raise ConfigError(f"task={cfg.task!r} does not fit model.framework={self.framework!r}")
        if cfg.train.amp and device_for(cfg.train.device).startswith("cpu"):
            raise ConfigError("train.amp=true needs a CUDA device; this run is on the CPU (set amp=false)")
        from welde_det.engine.stages import plan_stages

        for stage in plan_stages(cfg):  # every stage's WELDE spec is checked before anything is written
            welde_spec(cfg, stage.components, stage.mode, self.activation)

    def title(self, cfg: ExperimentConfig) -> str:
        """A short description for report titles."""
        return f"{self.framework} ({cfg.model.arch})"



class DetectionBackend(Backend, abc.ABC):
    """A detector: :mod:`welde_det.engine.run` resolves, plans, selects, predicts and reports; this fits."""

    task = "detect"

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        from welde_det.engine.cache import check_cache_config

        check_cache_config(cfg, self.framework)

    @abc.abstractmethod
    def fit_stage(self, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats, run_dir: Path, *,
                  init: Path | None) -> Path:
        """Train (or resume) one stage; return its selected checkpoint (the one schema).

        Args:
            stage: the :class:`~welde_det.engine.run.Stage`.
            data: the :class:`~welde_det.engine.run.RunData` (``data.select``: the split
                that chooses the epoch, or None for the last epoch).
            init: the previous stage's checkpoint, or ``model.weights`` for the first stage.
        """
