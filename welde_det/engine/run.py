"""The one run skeleton: config in, run folder out, for every framework.

:func:`run_training` does, in this order and once for all backends:

1. make (or reopen, for ``--resume``) the run folder and save the resolved config;
2. resolve the data (:func:`welde_det.datasets.resolve.resolve_data` for every detection
   layout; the classification backend reads its own ``.npz`` / image folders), carve the
   selection split if ``train.select=holdout``, and measure :class:`ClassStats` on the
   training split;
3. refuse config keys the backend does not use, and ``model.weights`` from another class
   list;
4. plan the stages (:func:`plan_stages`: one meaning of "frozen") and let the backend fit
   each one (:meth:`Backend.fit_stage`), each stage starting from the previous one's
   checkpoint;
5. take the model that ``train.select`` chose — the last epoch, or the best epoch on a
   selection split that is **not** the measured one — predict the measured split, and
   write ``detections.json``, ``ground_truth.json``, ``report.json`` / ``report.md`` with
   "selected on X, measured on Y".

A backend (:mod:`welde_det.engine.backends`) implements only what differs between
frameworks: fit a stage, load a checkpoint, predict.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.classes import ClassStats
from welde_det.engine.backends import get_backend
from welde_det.engine.backends.base import device_for
from welde_det.engine.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    save_config,
)
from welde_det.engine.stages import RunData, Stage, plan_stages, selection_label
from welde_det.utils.fileio import atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "RunData",
    "Stage",
    "check_unused_keys",
    "check_weights_classes",
    "class_stats_for",
    "finish_detection_run",
    "make_run_dir",
    "plan_stages",
    "resolve_run_data",
    "run_stages",
    "run_training",
    "seed_everything",
    "selection_label",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
DONE = "done.json"
#: the selected model of a finished run, in the one checkpoint schema
FINAL = Path("weights") / "model.pt"


# ----------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def check_weights_classes(weights: str | os.PathLike | None, names: list[str] | tuple[str, ...]) -> None:
    """Refuse ``model.weights`` that is a welde_det checkpoint trained on another class list.

    Plain Ultralytics / torchvision weights (no class list of ours) pass: their matching
    layers are transferred and the classifiers start fresh.

    Raises:
        ConfigError: the checkpoint's classes differ from ``names`` (in content or order).
    """
    if weights is None:
        return
    from welde_det.checkpoint import class_names

    theirs = class_names(weights)
    if theirs is not None and list(theirs) != list(names):
        raise ConfigError(
            f"model.weights {weights}: a checkpoint from another class list — it was trained on {list(theirs)}, "
            f"this dataset has {list(names)}. Train on data with the same classes in the same order, or start "
            "from plain (non-welde_det) weights or random initialisation (leave model.weights unset)")


def check_unused_keys(cfg: ExperimentConfig, framework: str, unused: frozenset[str] | set[str]) -> None:
    """A config key the chosen backend does not read must keep its default; otherwise a ConfigError.

    Args:
        cfg: the resolved config.
        framework: the backend's name (for the message).
        unused: dotted keys (``"train.nbs"``) the backend ignores.
    """
    default = config_to_dict(ExperimentConfig())
    mine = config_to_dict(cfg)
    set_keys = []
    for key in sorted(unused):
        section, _, name = key.partition(".")
        if mine[section][name] != default[section][name]:
            set_keys.append(f"{key}={mine[section][name]!r}")
    if set_keys:
        raise ConfigError(f"{', '.join(set_keys)}: not used by the {framework!r} backend (it would be ignored); "
                          "remove the key(s) or choose a framework that reads them")


def resolve_run_data(cfg: ExperimentConfig, run_dir: Path) -> RunData:
    """Resolve a detection source and apply ``train.select`` / ``train.measure``.

    Raises:
        ConfigError: the measured split is missing, or the selection split is the measured one.
    """
    from welde_det.datasets.resolve import DataError, carve_split, resolve_data
    from welde_det.utils.logging import progress_enabled

    work = run_dir / "data"
    phantom = {"n_images": cfg.data.n_images, "seed": cfg.data.seed, "difficulty": cfg.data.difficulty,
               "contrast": cfg.data.contrast, "bit_depth": cfg.data.bit_depth,
               "cache_dir": cfg.data.cache_dir} if cfg.data.source == "phantom" else None
    names = list(cfg.data.names) or None
    try:
        resolved = resolve_data(cfg.data.source, work, names=names, phantom=phantom, progress=progress_enabled())
    except DataError as exc:
        raise ConfigError(f"data.source: {exc}") from exc
    splits, roots = dict(resolved.splits), dict(resolved.image_roots)
    t = cfg.train
    if "train" not in splits:
        raise ConfigError(f"data.source {cfg.data.source}: no train split found")
    if t.measure not in splits:
        raise ConfigError(f"train.measure={t.measure!r}: the data has splits {sorted(splits)}; measure one of "
                          "them (never the one that selects)")
    if t.measure == "train":
        raise ConfigError("train.measure='train': the split trained on measures nothing; measure val or test")
    select: str | None
    if t.select == "last":
        select = None
    elif t.select == "holdout":
        try:
            kept, carved = carve_split(splits["train"], t.select_fraction, cfg.data.seed)
        except DataError as exc:
            raise ConfigError(f"train.select=holdout: {exc}") from exc
        splits["train"], splits["holdout"] = work / "train_kept.json", work / "holdout.json"
        atomic_write_json(splits["train"], kept)
        atomic_write_json(splits["holdout"], carved)
        roots["holdout"] = roots["train"]
        select = "holdout"
    else:
        if t.select not in splits:
            raise ConfigError(f"train.select={t.select!r}: no such split (the data has {sorted(splits)}); use "
                              "'last', 'holdout' or a split that is not measured")
        if t.select == "train":
            raise ConfigError("train.select='train': choosing on the split trained on is not a selection; use "
                              "'last' or 'holdout'")
        select = t.select
    if select == t.measure:
        raise ConfigError(f"train.select={select!r} is the measured split (train.measure={t.measure!r}): a figure "
                          "must be measured on a split that chose nothing (METHOD.md §5). Use train.select=last, "
                          "train.select=holdout, or measure another split")
    return RunData(splits=splits, image_roots=roots, names=tuple(resolved.names), measure=t.measure, select=select,
                   selection=selection_label(select, t.select_fraction), resolved=resolved)


def class_stats_for(cfg: ExperimentConfig, train_coco: Path) -> ClassStats:
    """The training split's ClassStats (measured image counts; zero-count classes are an error unless floored)."""
    kw: dict[str, Any] = {"tail": list(cfg.data.tail) or None, "tail_threshold": cfg.data.tail_threshold or None}
    if cfg.data.class_floor:
        kw["floor"] = cfg.data.class_floor
    try:
        stats = ClassStats.from_coco(train_coco, **kw)
    except ValueError as exc:
        raise ConfigError(f"{exc} (data.class_floor=1 trains anyway, with the count floored)") from exc
    if sum(stats.instance_counts) == 0:
        raise ConfigError(f"{train_coco}: the training split has no labelled boxes (is the label folder empty?)")
    return stats


# ----------------------------------------------------------------------------- the skeleton
def _load_cfg(config, overrides, resume) -> tuple[ExperimentConfig, Path | None]:
    if resume is not None:
        resume = Path(resume)
        run_dir = resume if resume.is_dir() else resume.parent.parent if resume.parent.name == "weights" else \
            resume.parent
        saved = run_dir / CONFIG_NAME
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} not found (is {resume} a welde_det run folder?)")
        return load_config(saved, overrides), run_dir
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if isinstance(config, ExperimentConfig) and overrides:
        cfg = apply_overrides(cfg, list(overrides))
    return cfg, None


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


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _end_process_group() -> None:
    """Under torchrun: wait for rank 0's report, then leave the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
        resume: a previous run folder (or its checkpoint) to continue; its saved config is
            used, and ``overrides`` may only extend the schedule.

    Returns:
        The run folder (``weights/model.pt``, ``config.yaml``, ``report.json``, ``report.md``).
    """
    cfg, run_dir = _load_cfg(config, overrides, resume)
    backend = get_backend(cfg)
    backend.check(cfg)
    check_unused_keys(cfg, backend.framework, backend.unused_keys(cfg))
    if run_dir is None:
        run_dir = _shared_run_dir(cfg)
    try:
        if _rank() == 0:
            save_config(cfg, run_dir / CONFIG_NAME)
        seed_everything(cfg.train.seed)
        logger.info("run folder: %s", run_dir)
        if backend.task != "detect":
            return Path(backend.run(cfg, run_dir, resume=resume is not None))
        data = resolve_run_data(cfg, run_dir)
        stats = class_stats_for(cfg, data.splits["train"])
        logger.info("%s", stats.summary())
        final = run_stages(backend, cfg, run_dir, data, stats, resume=resume is not None)
        if _rank() == 0:  # under torchrun only rank 0 predicts, evaluates and reports
            finish_detection_run(backend, cfg, run_dir, data, stats, final)
        _end_process_group()
        return run_dir
    except BaseException:
        if resume is None:
            _discard_if_unstarted(run_dir)
        raise


def run_stages(backend: Any, cfg: ExperimentConfig, run_dir: Path, data: RunData, stats: ClassStats, *,
               resume: bool) -> Path:
    """Fit every planned stage (skipping finished ones) and return the final checkpoint ``weights/model.pt``."""
    if not resume:
        check_weights_classes(cfg.model.weights, stats.names)
    init: Path | None = Path(cfg.model.weights) if cfg.model.weights else None
    ckpt: Path | None = None
    for stage in plan_stages(cfg):
        done = run_dir / stage.name / DONE
        if done.is_file() and json.loads(done.read_text())["epochs"] < stage.epochs:
            logger.info("stage %s: the schedule grew to %d epochs; continuing it", stage.name, stage.epochs)
            done.unlink()
        if done.is_file():
            ckpt = run_dir / json.loads(done.read_text())["checkpoint"]
            logger.info("stage %s already finished: %s", stage.name, ckpt)
        else:
            ckpt = backend.fit_stage(cfg, stage, data, stats, run_dir, init=init)
            if _rank() == 0:
                atomic_write_json(done, {"checkpoint": str(Path(ckpt).relative_to(run_dir)),
                                         "epochs": stage.epochs, "selected_on": data.select or "last"})
        init = ckpt
    assert ckpt is not None, "plan_stages always plans at least one stage"
    final = run_dir / FINAL
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.copyfile(ckpt, tmp)
        os.replace(tmp, final)
    return final


def finish_detection_run(backend: Any, cfg: ExperimentConfig, run_dir: Path, data: RunData, stats: ClassStats,
                         final: Path) -> dict[str, Any]:
    """Predict the measured split with the selected model and write the report (shared by all detectors)."""
    from welde_det.engine.evaluate import predict_split, write_detection_report
    from welde_det.integrations.registry import load_detector

    stats.save(run_dir / "class_stats.json")
    detector = load_detector(final, device=device_for(cfg.train.device))
    split = data.measure
    dets, gt = predict_split(detector, data.splits[split], data.image_roots[split], conf=cfg.train.conf,
                             batch=cfg.train.batch)
    atomic_write_json(run_dir / "detections.json", dets)
    atomic_write_json(run_dir / "ground_truth.json", gt)
    atomic_write_json(run_dir / "eval_split.json", {
        "split": split, "selected_on": data.select or "last", "selection": data.selection,
        # relative to the run folder: outputs hold no absolute paths
        "images": os.path.relpath(Path(data.image_roots[split]).resolve(), run_dir.resolve())})
    title = f"{cfg.name}: {backend.title(cfg)}, {cfg.loss.mode}"
    res = write_detection_report(gt, dets, run_dir, class_stats=stats, title=title,
                                 selection=f"selected on {data.selection}; measured on the {split} split")
    logger.info("%s: mAP %.3f mAP_tail %.3f on %s (selected on %s)", cfg.name, res["stats"][0], res["map_tail"],
                split, data.select or "last")
    return res


def _discard_if_unstarted(run_dir: Path) -> None:
    """Remove a new run folder in which no training has happened (bad config or data).

    Such a folder holds only ``config.yaml`` and the data preparation (``data/``);
    anything else — a checkpoint, a log of epochs — means training began, and the folder
    stays for ``--resume`` and for reading.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not run_dir.is_dir():
        return
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel != Path(CONFIG_NAME) and rel.parts[0] != "data":
            return
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.info("removed %s: the run stopped before training began", run_dir)
