"""Ultralytics YOLO backend: fit a stage with :class:`~welde_det.integrations.yolo.WELDEDetectionTrainer`.

- Each stage is an Ultralytics run under ``<run>/<stage>/`` (its ``results.csv``,
  ``terms.csv`` of every WELDE term, TensorBoard events and Ultralytics' own
  ``weights/last.pt`` for resume). When the stage ends, the chosen epoch — Ultralytics'
  ``last.pt``, or with a selection split its ``best.pt`` (fitness = pycocotools-exact mAP on
  that split, never the measured one) — is converted into the one checkpoint schema
  (``<stage>/weights/model.pt``: state dict + model YAML + metadata).
- Weights never reach Ultralytics' own (unrestricted) loader: a stage starts from the
  previous stage's checkpoint or from ``model.weights`` through the trainer spec, read with
  ``weights_only=True``; Ultralytics' resume checkpoint is verified with the same gate
  before Ultralytics opens it.
- Resume: ``--resume`` continues the interrupted stage from its ``last.pt`` with
  Ultralytics' own resume (no epoch lost); a stage killed after its final checkpoint is
  converted without retraining.
- Multi-GPU: ``train.device=0,1`` uses Ultralytics' own DDP; the settings reach its workers
  through ``$WELDE_DET_YOLO_SPEC``.
- No absolute path is left behind (:func:`scrub_stage`): while a stage trains, Ultralytics
  keeps the run folder's absolute path in ``<stage>/args.yaml`` and in the ``train_args`` (and
  the model's ``args``) of its ``last.pt``/``best.pt`` (its resume needs them), and its label caches
  (``data/yolo/labels/*.cache``) list absolute image paths. Once the stage is finished and
  converted, nothing needs them absolute: a finished stage is never resumed by Ultralytics
  (:meth:`YOLOBackend.resume_gate` reads only the ``epoch`` of ``last.pt``, and a finished
  stage cannot grow), so those paths are rewritten relative to the run folder and the
  caches (rebuilt with the view of every stage anyway) removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from welde_det.classes import ClassStats
from welde_det.engine.backends.base import DetectionBackend, welde_spec
from welde_det.engine.config import ConfigError, ExperimentConfig, config_to_dict

__all__ = ["YOLOBackend", "scrub_stage", "spec_env", "ultralytics_args"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def spec_env(spec: dict[str, Any]) -> Iterator[None]:
    """Set ``$WELDE_DET_YOLO_SPEC`` to ``spec`` for the duration of the block."""
    from welde_det.integrations.yolo import SPEC_ENV

    old = os.environ.get(SPEC_ENV)
    os.environ[SPEC_ENV] = json.dumps(spec)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SPEC_ENV, None)
        else:
            os.environ[SPEC_ENV] = old


def ultralytics_args(cfg: ExperimentConfig, data_yaml: Path, run_dir: Path, stage: Any, *,
                     validate: bool) -> dict[str, Any]:
    """Ultralytics trainer overrides for one stage (weights travel in the spec, never here)."""
    import torch

    t = cfg.train
    args = {"model": cfg.model.arch, "data": str(data_yaml), "epochs": stage.epochs, "imgsz": t.imgsz,
            "batch": t.batch, "workers": t.workers, "seed": t.seed, "deterministic": True,
            "project": str(run_dir.resolve()), "name": stage.name, "exist_ok": True, "plots": False,
            "val": validate, "amp": t.amp, "optimizer": "SGD" if t.optimizer == "auto" else t.optimizer,
            "lr0": t.lr, "weight_decay": t.weight_decay, "patience": t.patience or 100, "nbs": t.nbs,
            "verbose": False, "pretrained": False,
            "close_mosaic": min(10, max(0, stage.epochs // 2)), "warmup_epochs": min(3.0, stage.epochs / 3)}
    if t.device:
        args["device"] = t.device
    elif not torch.cuda.is_available():
        args["device"] = "cpu"
    if stage.frozen:
        # the frozen stage fits heads on fixed features: no geometric re-augmentation
        args.update({"mosaic": 0.0, "close_mosaic": 0, "warmup_epochs": 0.0})
    if cfg.data.channels == 1:
        args.update({"hsv_h": 0.0, "hsv_s": 0.0})
    return args


class YOLOBackend(DetectionBackend):
    """``model.framework: yolo`` (Ultralytics 8.4, random init from a model YAML or local weights)."""

    framework = "yolo"
    activation = "sigmoid"

    def unused_keys(self, cfg: ExperimentConfig) -> set[str]:
        keys = super().unused_keys(cfg)
        return keys if cfg.data.sampler == "repeat_factor" else keys | {"data.repeat_threshold"}

    def title(self, cfg: ExperimentConfig) -> str:
        return f"YOLO ({Path(cfg.model.arch).stem})"

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        arch = cfg.model.arch
        if not arch.endswith((".yaml", ".yml")):
            raise ConfigError(f"model.arch {arch!r} is not a YOLO model YAML (e.g. yolov8n.yaml); welde_det never "
                              "downloads weights — give a model YAML and model.weights=<local .pt>")
        if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
            raise ConfigError(f"model.weights {cfg.model.weights!r} is not a local file; welde_det never downloads "
                              "weights — pass the path of a saved .pt, or leave it unset for random initialisation")

    def trainer_spec(self, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats,
                     init: Path | None, *, run_dir: Path | None = None) -> dict[str, Any]:
        """What :func:`~welde_det.integrations.yolo.trainer_spec` reads in the trainer (and its DDP workers).

        ``config`` (saved into Ultralytics' checkpoints) has its paths relative to ``run_dir``
        when given (:func:`welde_det.engine.run.run_relative_paths`): no absolute input path.
        """
        from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names

        spec = welde_spec(cfg, stage.components, stage.mode, "sigmoid")
        counts = [float(c) for c in stats.effective_counts]
        sel = data.select
        out = {"welde": spec.to_dict(), "class_counts": counts, "repeat_threshold": cfg.data.repeat_threshold, "stage2": stage.frozen, "epoch_offset": stage.epoch_offset,
               "val_coco": str(data.splits[sel]) if sel else None,
               "val_images": str(data.image_roots[sel]) if sel else None,
               "class_stats": stats.to_dict(), "config": _stored_config(cfg, run_dir), "conf": cfg.train.conf,
               "bit_depth": cfg.data.bit_depth, "init_weights": str(init) if init else None,
               "sampler": cfg.data.sampler}
        if stage.frozen:
            probe = WELDEDetectionModel(cfg.model.arch, nc=len(stats.names), components=["ce"], class_counts=counts)
            out["freeze"] = stage2_freeze_names(probe)
        return out

    def resume_gate(self, cfg: ExperimentConfig, stage: Any, run_dir: Path) -> bool:
        """Whether the stage's Ultralytics run had finished (``last.pt`` checked with the safe loader first).

        Called by the skeleton for every stage a resume will train, before anything is
        written, and again by :meth:`fit_stage`.

        Raises:
            ConfigError: a finished stage asked to grow (Ultralytics cannot extend it).
            UnsafeCheckpointError: a ``last.pt`` that fails the safe loader's gate.
        """
        from welde_det.checkpoint import safe_load

        sdir = run_dir / stage.name
        last = sdir / "weights" / "last.pt"
        finished, epoch = False, -1
        if last.is_file():
            ck = safe_load(last, allow_modules=True)  # the gate before Ultralytics unpickles it
            epoch = int(ck.get("epoch", -1)) if isinstance(ck, dict) else -1
            finished = epoch < 0 or epoch + 1 >= stage.epochs or (sdir / "weights" / "model.pt").is_file()
            del ck
        if finished and (sdir / "weights" / "model.pt").is_file() and 0 <= epoch < stage.epochs - 1:
            raise ConfigError(f"stage {stage.name} finished {epoch + 1} epochs; Ultralytics cannot extend a "
                              f"finished YOLO stage to {stage.epochs} — start a new run from its weights "
                              f"(model.weights={sdir / 'weights' / 'model.pt'})")
        return finished

    def fit_stage(self, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats, run_dir: Path, *,
                  init: Path | None) -> Path:
        from welde_det.datasets.resolve import yolo_view
        from welde_det.engine.cache.yolo import yolo_trainer_class

        trainer_cls = yolo_trainer_class(cfg, stage)  # WELDEDetectionTrainer, or train.cache_frozen's
        sdir = run_dir / stage.name
        last = sdir / "weights" / "last.pt"
        spec = self.trainer_spec(cfg, stage, data, stats, init, run_dir=run_dir)
        finished = self.resume_gate(cfg, stage, run_dir)
        if not finished:
            from welde_det.integrations.offline import ultralytics_offline

            # offline without the user's help: no DNS, no analytics, no hub, no download (integrations.offline)
            with spec_env(spec), ultralytics_offline():
                if last.is_file():
                    logger.info("resuming stage %s from %s", stage.name, last)
                    trainer = trainer_cls(overrides={"resume": str(last)})
                else:
                    data_yaml = yolo_view(self.view(data), run_dir / "data", channels=cfg.data.channels)
                    trainer = trainer_cls(overrides=ultralytics_args(
                        cfg, data_yaml, run_dir, stage, validate=data.select is not None))
                trainer.train()
        else:
            logger.info("stage %s had finished its %d epochs when it stopped", stage.name, stage.epochs)
        chosen = sdir / "weights" / ("best.pt" if data.select and (sdir / "weights" / "best.pt").is_file()
                                     else "last.pt")
        out = self.convert(chosen, cfg, stage, stats, spec, sdir / "weights" / "model.pt")
        scrub_stage(run_dir, stage.name)  # finished: Ultralytics' files need no absolute path any more
        return out

    @staticmethod
    def view(data: Any) -> Any:
        """The splits Ultralytics sees: the run's train part (after a holdout carve) and, as ``val``, the
        selection split — never the measured one. With ``select=last`` nothing is validated while training
        (the trainer's ``validate`` returns at once); ``val`` then names the train part only because
        Ultralytics insists on a ``val`` entry."""
        import dataclasses

        val = data.select or "train"
        return dataclasses.replace(data.resolved,
                                   splits={"train": data.splits["train"], "val": data.splits[val]},
                                   image_roots={"train": data.image_roots["train"], "val": data.image_roots[val]})

    def convert(self, src: Path, cfg: ExperimentConfig, stage: Any, stats: ClassStats, spec: dict[str, Any],
                out: Path) -> Path:
        """Ultralytics' checkpoint of a stage -> the one schema (float32 state dict + model YAML)."""
        from welde_det.checkpoint import safe_load, save_checkpoint

        ck = safe_load(src, allow_modules=True)
        model = (ck.get("ema") or ck.get("model")).float()
        return save_checkpoint(out, framework="yolo", arch=cfg.model.arch,
                               model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                               class_stats=stats.to_dict(), config=spec["config"], stage=stage.name,
                               welde=spec["welde"], epoch=int(ck.get("epoch", -1)),
                               extra={"yaml": _plain(model.yaml), "channels": cfg.data.channels,
                                      "imgsz": cfg.train.imgsz, "source": src.name})


def _relative_to_run(value: Any, base: Path) -> Any:
    """``value`` with every absolute path string made relative to ``base`` (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: _relative_to_run(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relative_to_run(v, base) for v in value)
    if isinstance(value, (str, Path)) and os.path.isabs(value):
        return Path(os.path.relpath(os.path.abspath(value), base)).as_posix()
    return value


def scrub_stage(run_dir: Path, stage: str) -> list[Path]:
    """Rewrite a finished stage's Ultralytics files so that none holds an absolute path.

    - ``<stage>/args.yaml``: its absolute paths (``data``, ``project``, ``save_dir``)
      relative to the run folder;
    - ``<stage>/weights/last.pt`` and ``best.pt`` (every Ultralytics ``.pt`` but our
      ``model.pt``): read with the safe loader, the paths of their ``train_args`` and of the
      pickled model's ``args`` (the same trainer arguments) made relative to the run folder
      and the ``git`` record's ``root`` (the code's checkout) dropped, written back atomically. They are kept, not deleted: :meth:`YOLOBackend.resume_gate` reads
      ``last.pt``'s ``epoch`` to refuse growing a finished stage (without it the stage would
      silently start over); nothing passes them to Ultralytics' resume again;
    - ``data/yolo/labels/*.cache``: Ultralytics' label caches list absolute image paths;
      removed (the view and its caches are rebuilt when the next stage starts).

    Call it only once the stage's checkpoint is converted: a stage that is still to be
    resumed needs Ultralytics' absolute paths. Idempotent; a file without an absolute path
    is not rewritten.

    Returns:
        The files rewritten or removed.
    """
    import torch
    import yaml

    from welde_det.checkpoint import safe_load
    from welde_det.utils.fileio import atomic_write_text

    base = Path(run_dir).resolve()
    sdir = base / stage
    changed: list[Path] = []
    args = sdir / "args.yaml"
    if args.is_file():
        content = yaml.safe_load(args.read_text(encoding="utf-8")) or {}
        scrubbed = _relative_to_run(content, base)
        if scrubbed != content:
            atomic_write_text(args, yaml.safe_dump(scrubbed, sort_keys=False, allow_unicode=True))
            changed.append(args)
    for pt in sorted((sdir / "weights").glob("*.pt")) if (sdir / "weights").is_dir() else []:
        if pt.name == "model.pt":
            continue
        ck = safe_load(pt, allow_modules=True)
        if not isinstance(ck, dict):
            continue
        new_args = _relative_to_run(ck.get("train_args"), base)
        git = ck.get("git")
        new_git = {k: v for k, v in git.items() if k != "root"} if isinstance(git, dict) else git
        models = [m for m in (ck.get("model"), ck.get("ema")) if hasattr(getattr(m, "args", None), "__dict__")]
        model_args = [(m.args, _relative_to_run(vars(m.args), base)) for m in models]  # the trainer's args again
        if new_args == ck.get("train_args") and new_git == git and all(vars(a) == n for a, n in model_args):
            continue
        ck["train_args"], ck["git"] = new_args, new_git
        for a, n in model_args:
            a.__dict__.update(n)
        tmp = pt.with_name(f".{pt.name}.tmp")
        torch.save(ck, tmp)
        os.replace(tmp, pt)
        changed.append(pt)
        del ck
    labels = base / "data" / "yolo" / "labels"
    for cache in sorted(labels.rglob("*.cache")) if labels.is_dir() else []:
        cache.unlink()
        changed.append(cache)
    return changed


def _stored_config(cfg: ExperimentConfig, run_dir: Path | None) -> dict[str, Any]:
    """The config as checkpoints store it: paths relative to the run folder (none absolute)."""
    if run_dir is None:
        return config_to_dict(cfg)
    from welde_det.engine.run import run_relative_paths

    return config_to_dict(run_relative_paths(cfg, run_dir))


def _plain(obj: Any) -> Any:
    """A model YAML dict with only plain types (weights_only loading admits nothing else)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
