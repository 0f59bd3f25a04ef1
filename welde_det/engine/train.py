"""Training entry point: one config in, one run folder out.

:func:`run_training` makes the run folder, saves the resolved config, and hands the
config to the runner for its task and framework:

- ``task=classify``                  -> :mod:`welde_det.engine.train_classify`
- ``task=detect, framework=yolo``    -> :mod:`welde_det.engine.train_yolo`
- ``task=detect, framework=rcnn``    -> :mod:`welde_det.engine.train_rcnn`

Each runner exposes ``train(cfg, run_dir, *, resume=None) -> Path`` and writes its
checkpoint, ``report.json`` and ``report.md`` into ``run_dir``. Runners are imported
lazily so that classification users never import Ultralytics.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

from welde_det.engine.config import ConfigError, ExperimentConfig, load_config, save_config

__all__ = ["RUNNERS", "check_weights_classes", "make_run_dir", "resolve_runner", "run_training", "seed_everything"]

logger = logging.getLogger(__name__)

#: (task, framework) -> module implementing ``train(cfg, run_dir, *, resume=None)``.
RUNNERS: dict[tuple[str, str], str] = {
    ("classify", "classify"): "welde_det.engine.train_classify",
    ("detect", "yolo"): "welde_det.engine.train_yolo",
    ("detect", "rcnn"): "welde_det.engine.train_rcnn",
}

CONFIG_NAME = "config.yaml"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_weights_classes(weights: str | os.PathLike | None, names: list[str] | tuple[str, ...]) -> None:
    """Refuse ``model.weights`` that is a welde_det checkpoint trained on another class list.

    Plain Ultralytics / torchvision weights (no class list of ours) pass: their matching
    layers are transferred and the classifiers start fresh.

    Raises:
        ConfigError: the checkpoint's classes differ from ``names`` (in content or order).
    """
    if weights is None:
        return
    from welde_det.engine.infer import checkpoint_class_names

    theirs = checkpoint_class_names(weights)
    if theirs is not None and theirs != list(names):
        raise ConfigError(
            f"model.weights {weights}: a checkpoint from another class list — it was trained on {theirs}, "
            f"this dataset has {list(names)}. Train on data with the same classes in the same order, or start "
            "from plain (non-welde_det) weights or random initialisation (leave model.weights unset)")


def make_run_dir(cfg: ExperimentConfig) -> Path:
    """Create ``<output>/<name>-<YYYYmmdd-HHMMSS>[-k]`` and return it."""
    root = Path(cfg.output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{cfg.name}-{stamp}"
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir = Path(f"{base}-{k}")
        k += 1
    run_dir.mkdir(parents=True)
    return run_dir


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _shared_run_dir(cfg: ExperimentConfig) -> Path:
    """Rank 0 makes the run folder; under torchrun every rank gets the same path."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return make_run_dir(cfg)
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    box = [str(make_run_dir(cfg)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def resolve_runner(cfg: ExperimentConfig):
    """Import and return the runner module for the config's task and framework."""
    key = (cfg.task, cfg.model.framework)
    if key not in RUNNERS:
        raise ConfigError(
            f"no trainer for task={cfg.task!r} with model.framework={cfg.model.framework!r}; "
            f"available: {sorted(RUNNERS)}"
        )
    return importlib.import_module(RUNNERS[key])


def run_training(
    config: str | os.PathLike | ExperimentConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | os.PathLike | None = None,
) -> Path:
    """Train one experiment and return its run folder.

    Args:
        config: a YAML path, an :class:`ExperimentConfig`, or None for the defaults.
        overrides: ``key=value`` strings applied on top of the file.
        resume: a previous run folder (or its last checkpoint) to continue; its saved
            config is used, and ``overrides`` may only extend the schedule.

    Returns:
        The run folder (checkpoint, ``config.yaml``, ``report.json``, ``report.md``).
    """
    if resume is not None:
        resume = Path(resume)
        run_dir = resume if resume.is_dir() else resume.parent.parent if resume.parent.name == "weights" else resume.parent
        saved = run_dir / CONFIG_NAME
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} not found (is {resume} a welde_det run folder?)")
        cfg = load_config(saved, overrides)
    else:
        cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
        if isinstance(config, ExperimentConfig) and overrides:
            from welde_det.engine.config import apply_overrides

            cfg = apply_overrides(cfg, list(overrides))
        run_dir = _shared_run_dir(cfg)
    try:
        runner = resolve_runner(cfg)
        if _rank() == 0:
            save_config(cfg, run_dir / CONFIG_NAME)
        seed_everything(cfg.train.seed)
        logger.info("run folder: %s", run_dir)
        return Path(runner.train(cfg, run_dir, resume=resume))
    except BaseException:
        if resume is None:
            _discard_if_unstarted(run_dir)
        raise


def _discard_if_unstarted(run_dir: Path) -> None:
    """Remove a new run folder in which no training has happened (bad config or data).

    Such a folder holds only ``config.yaml`` and the runner's data preparation
    (``data/``); anything else — a checkpoint, a log of epochs — means training began, and
    the folder stays for ``--resume`` and for reading.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not run_dir.is_dir():
        return
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel != Path(CONFIG_NAME) and rel.parts[0] != "data":
            return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    logger.info("removed %s: the run stopped before training began", run_dir)
