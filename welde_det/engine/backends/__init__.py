"""One backend per framework: what differs between them (fit a stage, load, predict).

Everything else — data resolution, ClassStats, the stage plan, the weights check,
selection, prediction of the measured split, evaluation and the report — is written once
in :mod:`welde_det.engine.run`.
"""

from __future__ import annotations

from welde_det.engine.backends.base import Backend
from welde_det.engine.config import ConfigError, ExperimentConfig

__all__ = ["BACKENDS", "Backend", "get_backend"]

#: framework -> module:class, imported on use so classification never imports Ultralytics.
BACKENDS: dict[str, str] = {
    "yolo": "welde_det.engine.backends.yolo:YOLOBackend",
    "rcnn": "welde_det.engine.backends.rcnn:RCNNBackend",
    "classify": "welde_det.engine.backends.classify:ClassifyBackend",
}


def get_backend(cfg: ExperimentConfig) -> Backend:
    """The backend for ``cfg.model.framework``."""
    import importlib

    target = BACKENDS.get(cfg.model.framework)
    if target is None:
        raise ConfigError(f"model.framework={cfg.model.framework!r}: no backend; available: {sorted(BACKENDS)}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)()
