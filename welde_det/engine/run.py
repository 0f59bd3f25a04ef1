"""The one run skeleton: config in, run folder out, for every framework.

:func:`run_training` does, in this order and once for all backends:

1. make the run folder and save the resolved config (``config.yaml``, its paths relative
   to the run folder) — or, for ``--resume``, reopen it: only the schedule may grow
   (:func:`resume_overrides`), every check (the backend's ``resume_gate`` included) runs
   before anything is written, and ``config.yaml`` is rewritten only when the first stage
   to train starts;
2. resolve the data (:func:`welde_det.datasets.resolve.resolve_data` for every detection
   layout; the classification backend reads its own ``.npz`` / image folders), carve the
   selection split if ``train.select=holdout``, and measure :class:`ClassStats` on the
   training split; a raw YOLO or COCO folder is trained through a private view
   (:func:`private_image_view`: indexed image names, hard links), so no file of the run
   names the user's files and nothing is written into the user's data;
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

No absolute path reaches a checkpoint or a report: the config a run works with has its
absolute paths made relative to the working folder (:func:`working_paths`; the YOLO backend
stores them relative to the run folder), ``eval_split.json`` names the image folder
relative to the run folder.
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
)
from welde_det.engine.stages import (
    KEPT_ANN_FIELDS,
    KEPT_IMAGE_FIELDS,
    RunData,
    Stage,
    map_paths,
    plan_stages,
    run_relative_paths,
    selection_label,
    working_paths,
)
from welde_det.utils.fileio import atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "RunData",
    "Stage",
    "check_unused_keys",
    "check_weights_classes",
    "class_stats_for",
    "finish_detection_run",
    "load_run_config",
    "make_run_dir",
    "plan_stages",
    "private_image_view",
    "resolve_run_data",
    "resume_gate",
    "resume_overrides",
    "run_relative_paths",
    "run_stages",
    "run_training",
    "save_run_config",
    "seed_everything",
    "selection_label",
    "working_paths",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
DONE = "done.json"
#: first line of a run folder's config.yaml: its paths are relative to the run folder
RUN_RELATIVE_MARK = "# welde_det run config: paths are relative to this run folder"
#: what ``--resume RUN key=value`` may change: the schedule, nothing else
RESUME_KEYS: frozenset[str] = frozenset({"train.epochs", "train.stage1_epochs"})
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
    private = resolved.kind in PRIVATE_KINDS
    if t.select == "last":
        select = None
    elif t.select == "holdout":
        try:
            kept, carved = carve_split(splits["train"], t.select_fraction, cfg.data.seed)
        except DataError as exc:
            raise ConfigError(f"train.select=holdout: {exc}") from exc
        if private:  # pseudonymised below: the carve's files are never written with the user's names
            carved_splits = {"train": kept, "holdout": carved}
        else:
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
    if private:
        from welde_det.datasets.coco import load_coco

        cocos = {s: load_coco(p) for s, p in splits.items()}
        if select == "holdout":
            cocos.update(carved_splits)
        splits, roots = private_image_view(cocos, roots, work)
    return RunData(splits=splits, image_roots=roots, names=tuple(resolved.names), measure=t.measure, select=select,
                   selection=selection_label(select, t.select_fraction), resolved=resolved)


#: data layouts whose file names are the user's own (a raw YOLO or COCO folder): the run works on a private view
PRIVATE_KINDS = ("yolo", "coco")
#: image fields kept in the run's private COCO files (``patient_id`` replaced by a group index)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (same bytes, no copy, and no path stored), else a copy."""
    if dst.exists():
        import filecmp

        if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: the bytes are copied instead
        shutil.copyfile(src, dst)


def private_image_view(cocos: dict[str, dict[str, Any]], roots: dict[str, Path], work: Path
                       ) -> tuple[dict[str, Path], dict[str, Path]]:
    """The run's own copy of a user's data view: indexed image names, nothing named after the user's files.

    Every image of every split is linked (hard link, else copied) into ``work/images`` as
    ``<index>.<ext>`` — the same image keeps one index across splits (a holdout carved from
    train) — and each split's COCO file is written to ``work/gt/<split>.json`` with those
    names, only the technical image fields (:data:`KEPT_IMAGE_FIELDS`) and the patient
    grouping as an index (``patient_id``: ``"g<k>"``) when the data defines one. Nothing in
    the run folder then carries the user's file or folder names, no symbolic link points into
    the user's data, and Ultralytics' label cache is written under ``work`` only.

    Returns:
        ``(splits, image_roots)`` of the view (every root is ``work/images``).
    """
    from welde_det.datasets.coco import save_coco
    from welde_det.datasets.resolve import DataError, image_group

    images_dir = work / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    index: dict[tuple[str, str], str] = {}
    groups: dict[Any, str] = {}
    order = sorted(cocos, key=lambda s: (("train", "val", "test", "holdout").index(s)
                                         if s in ("train", "val", "test", "holdout") else 9, s))
    splits: dict[str, Path] = {}
    for split in order:
        coco = cocos[split]
        root = Path(roots[split]).absolute()
        try:
            group_of = image_group(coco)
        except DataError:
            group_of = {}
        images = []
        for img in sorted(coco["images"], key=lambda im: int(im["id"])):
            key = (str(root.resolve()), str(img["file_name"]))
            if key not in index:
                suffix = Path(str(img["file_name"])).suffix.lower()
                index[key] = f"{len(index) + 1:06d}{suffix}"
                _link_or_copy(root / str(img["file_name"]), images_dir / index[key])
            entry = {k: img[k] for k in KEPT_IMAGE_FIELDS if k in img}
            entry["file_name"] = index[key]
            if img["id"] in group_of:
                entry["patient_id"] = groups.setdefault(group_of[img["id"]], f"g{len(groups) + 1}")
            images.append(entry)
        anns = [{k: a[k] for k in KEPT_ANN_FIELDS if k in a} for a in coco["annotations"]]
        cats = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in coco["categories"]]
        splits[split] = save_coco({"images": images, "annotations": anns, "categories": cats},
                                  work / "gt" / f"{split}.json")
    return splits, {split: images_dir for split in splits}


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


# ----------------------------------------------------------------------------- config paths
def save_run_config(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Write ``config.yaml`` with paths relative to the run folder (marked on its first line), atomically."""
    import yaml

    from welde_det.utils.fileio import atomic_write_text

    text = yaml.safe_dump(config_to_dict(run_relative_paths(cfg, run_dir)), sort_keys=False)
    return atomic_write_text(Path(run_dir) / CONFIG_NAME, f"{RUN_RELATIVE_MARK}\n{text}")


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """A run folder's ``config.yaml`` with its paths made usable from the working folder.

    Paths of a config written by :func:`save_run_config` are relative to the run folder;
    older run folders (no mark on the first line) hold paths as they were given.
    """
    saved = Path(run_dir) / CONFIG_NAME
    cfg = load_config(saved)
    first = saved.read_text(encoding="utf-8").split("\n", 1)[0].strip()
    if first != RUN_RELATIVE_MARK:
        return cfg
    base = Path(run_dir).absolute()
    return map_paths(cfg, lambda p: p if os.path.isabs(p) else os.path.relpath(os.path.normpath(base / p)))


# ----------------------------------------------------------------------------- resume
def resume_overrides(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...], run_dir: Path) -> ExperimentConfig:
    """The saved config with ``--resume`` overrides applied: the schedule may grow, nothing else may change.

    Raises:
        ConfigError: a key other than :data:`RESUME_KEYS` (named), a bad value, a schedule
            that shrinks or changes the stage plan, or one that grows a stage after which a
            later stage has already begun. Nothing is written.
    """
    from welde_det.engine.config import _field_paths, _resolve_key

    if not overrides:
        return cfg
    paths = _field_paths()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        full = _resolve_key(key, paths) if "=" in item else key
        if full not in RESUME_KEYS:
            raise ConfigError(
                f"--resume {run_dir}: {key!r} cannot change on resume (only the schedule can grow: "
                f"{', '.join(sorted(k.split('.')[-1] for k in RESUME_KEYS))}); the run's data, model and loss are "
                "fixed — start a new run (tools/train.py --config ...) to change them")
    new = apply_overrides(cfg, list(overrides))
    old_plan, new_plan = plan_stages(cfg), plan_stages(new)
    if [s.name for s in old_plan] != [s.name for s in new_plan]:
        raise ConfigError(f"--resume {run_dir}: {' '.join(overrides)} changes the stage plan "
                          f"({[s.name for s in old_plan]} -> {[s.name for s in new_plan]}); start a new run")
    for i, (old, grown) in enumerate(zip(old_plan, new_plan)):
        if grown.epochs < old.epochs:
            raise ConfigError(f"--resume {run_dir}: stage {old.name} would shrink from {old.epochs} to {grown.epochs} "
                              "epochs; a resume can only extend the schedule")
        later = [s.name for s in old_plan[i + 1:] if (run_dir / s.name).exists()]
        if grown.epochs > old.epochs and later:
            raise ConfigError(f"--resume {run_dir}: stage {old.name} cannot grow to {grown.epochs} epochs: stage "
                              f"{later[0]} has already begun from it; start a new run from its weights")
    return new


# ----------------------------------------------------------------------------- the skeleton
def _load_cfg(config, overrides, resume) -> tuple[ExperimentConfig, Path | None]:
    if resume is not None:
        resume = Path(resume)
        run_dir = resume if resume.is_dir() else resume.parent.parent if resume.parent.name == "weights" else \
            resume.parent
        saved = run_dir / CONFIG_NAME
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} not found (is {resume} a welde_det run folder?)")
        return resume_overrides(load_run_config(run_dir), list(overrides), run_dir), run_dir
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
            used, and ``overrides`` may only extend the schedule (:func:`resume_overrides`).
            Every check runs before anything is written, and ``config.yaml`` is rewritten
            only when the resumed training starts.

    Returns:
        The run folder (``weights/model.pt``, ``config.yaml``, ``report.json``, ``report.md``).
    """
    cfg, run_dir = _load_cfg(config, overrides, resume)
    backend = get_backend(cfg)
    backend.check(cfg)
    check_unused_keys(cfg, backend.framework, backend.unused_keys(cfg))
    resuming = run_dir is not None
    if run_dir is not None:
        resume_gate(backend, cfg, run_dir)
    else:
        run_dir = _shared_run_dir(cfg)
    cfg = working_paths(cfg)  # checkpoints and reports carry no absolute path
    try:
        if _rank() == 0 and not resuming:
            save_run_config(cfg, run_dir)
        seed_everything(cfg.train.seed)
        logger.info("run folder: %s", run_dir)
        if backend.task != "detect":
            if _rank() == 0 and resuming:
                save_run_config(cfg, run_dir)
            return Path(backend.run(cfg, run_dir, resume=resuming))
        data = resolve_run_data(cfg, run_dir)
        stats = class_stats_for(cfg, data.splits["train"])
        logger.info("%s", stats.summary())
        final = run_stages(backend, cfg, run_dir, data, stats, resume=resuming)
        if _rank() == 0:  # under torchrun only rank 0 predicts, evaluates and reports
            finish_detection_run(backend, cfg, run_dir, data, stats, final)
        _end_process_group()
        return run_dir
    except BaseException:
        if not resuming:
            _discard_if_unstarted(run_dir)
        raise


def _stages_to_train(cfg: ExperimentConfig, run_dir: Path) -> list[Stage]:
    """The planned stages without a ``done.json`` for their (possibly grown) schedule."""
    todo = []
    for stage in plan_stages(cfg):
        done = run_dir / stage.name / DONE
        if not done.is_file() or json.loads(done.read_text())["epochs"] < stage.epochs:
            todo.append(stage)
    return todo


def resume_gate(backend: Any, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Every check a resume needs, before it writes anything: the backend's ``resume_gate`` per stage to train.

    Raises:
        ConfigError: (from the backend) a stage that cannot continue to its schedule.
    """
    gate = getattr(backend, "resume_gate", None)
    if gate is None:
        return
    for stage in _stages_to_train(cfg, run_dir):
        gate(cfg, stage, run_dir)


def run_stages(backend: Any, cfg: ExperimentConfig, run_dir: Path, data: RunData, stats: ClassStats, *,
               resume: bool) -> Path:
    """Fit every planned stage (skipping finished ones) and return the final checkpoint ``weights/model.pt``.

    On ``resume`` the run's ``config.yaml`` is rewritten (grown schedule) only here, when the
    first stage to train is about to start — after every check has passed.
    """
    if not resume:
        check_weights_classes(cfg.model.weights, stats.names)
    init: Path | None = Path(cfg.model.weights) if cfg.model.weights else None
    ckpt: Path | None = None
    committed = not resume
    for stage in plan_stages(cfg):
        done = run_dir / stage.name / DONE
        grown = done.is_file() and json.loads(done.read_text())["epochs"] < stage.epochs
        if (grown or not done.is_file()) and not committed:
            if _rank() == 0:
                save_run_config(cfg, run_dir)
            committed = True
        if grown:
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
