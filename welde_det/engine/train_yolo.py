"""Training runner for Ultralytics YOLO with WELDE heads (``framework: yolo``).

- Data: ``data.source=phantom`` generates (and caches) the synthetic lumbar phantom with
  its COCO and YOLO exports; a COCO folder (``annotations/{train,val[,test]}.json`` +
  ``images/``) is exported to YOLO inside the run folder; a YOLO folder or ``data.yaml``
  is used as is, with its COCO ground truth written into the run folder. ``data.channels=1``
  trains on grey slices (Ultralytics reads them with one channel); ``data.bit_depth=16``
  trains on 16-bit slices without squashing them to 8 bits
  (:class:`~welde_det.integrations.yolo.HighBitYOLODataset`; the phantom then writes
  16-bit PNGs).
- Stages: single-loss baselines train ``stage1_epochs + epochs`` epochs with their loss;
  ``welde`` / ``ce_ensemble`` train ``stage1_epochs`` of ordinary (K = 1, ``ce``) training
  — or start from ``model.weights``, a local checkpoint — then ``epochs`` of stage 2 with
  backbone, neck, box branch and classification stems frozen. Each stage is an Ultralytics
  run under ``<run>/<stage>/`` (its own ``results.csv``, ``terms.csv`` of every WELDE term,
  TensorBoard events, ``weights/last.pt`` and ``best.pt``), trained by
  :class:`~welde_det.integrations.yolo.WELDEDetectionTrainer`.
- Resume: after a crash (even ``kill -9``: checkpoints are written atomically every epoch),
  ``--resume <run>`` skips finished stages and continues the interrupted one from its
  ``last.pt`` with Ultralytics' own resume (no epoch lost).
- Multi-GPU: ``train.device=0,1`` uses Ultralytics' own DDP; the WELDE settings reach its
  workers through ``$WELDE_DET_YOLO_SPEC``.
- At the end the final model (best validation mAP, from welde_det's evaluator) is copied to
  ``<run>/weights/best.pt``, its validation detections to ``detections.json`` (the split
  and image folder they belong to in ``eval_split.json``), and
  ``report.json`` / ``report.md`` / plots are written by the pycocotools-exact evaluator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from welde_det.classes import ClassStats
from welde_det.engine.config import ConfigError, ExperimentConfig, config_to_dict
from welde_det.engine.infer import Detector
from welde_det.engine.train import check_weights_classes
from welde_det.losses import available_losses
from welde_det.utils.fileio import atomic_write_json, atomic_write_text
from welde_det.utils.logging import progress_enabled

__all__ = ["YOLODetector", "load_yolo_detector", "resolve_yolo_data", "spec_env", "stage_spec", "train"]

logger = logging.getLogger(__name__)
DONE = "done.json"


# ----------------------------------------------------------------------------- data
def resolve_yolo_data(cfg: ExperimentConfig, run_dir: Path) -> tuple[Path, dict[str, Path], Path | dict[str, Path],
                                                                   ClassStats]:
    """``data.yaml`` for Ultralytics, COCO ground truth per split, its image root, ClassStats.

    Raises:
        ConfigError: a source that is neither the phantom, a COCO folder nor a YOLO dataset;
            a training split without boxes.
    """
    from welde_det.datasets.coco import (
        coco_to_yolo,
        find_data_yaml,
        resolve_yolo_split,
        yolo_splits,
        yolo_to_coco,
    )

    work = run_dir / "data"
    if cfg.data.source == "phantom":
        from welde_det.datasets.phantom import make_phantom_dataset, phantom_cache_dir

        formats = ("coco", "yolo")
        out = phantom_cache_dir(cfg.data.cache_dir, cfg.data.n_images, seed=cfg.data.seed,
                                difficulty=cfg.data.difficulty, contrast=cfg.data.contrast, formats=formats,
                                bit_depth=cfg.data.bit_depth)
        ds = make_phantom_dataset(out, cfg.data.n_images, seed=cfg.data.seed, difficulty=cfg.data.difficulty,
                                  contrast=cfg.data.contrast, formats=formats, progress=progress_enabled(),
                                  bit_depth=cfg.data.bit_depth)
        splits = {s: ds.annotations(s) for s in ("train", "val", "test")}
        roots: Path | dict[str, Path] = ds.images_dir
        src_yaml = ds.data_yaml
    else:
        base = Path(cfg.data.source)
        if not base.exists():
            raise ConfigError(f"data.source {base}: no such file or folder")
        if (base / "annotations").is_dir():
            ann = base / "annotations"
            splits = {s: ann / f"{s}.json" for s in ("train", "val", "test") if (ann / f"{s}.json").is_file()}
            if "train" not in splits:
                raise ConfigError(f"{ann}: no train.json (a COCO dataset folder needs annotations/train.json)")
            roots = base / "images"
            yolo_dir = work / "yolo"
            if not (yolo_dir / "data.yaml").is_file():
                names = ClassStats.from_coco(splits["train"], floor=1).names
                coco_to_yolo(dict(splits), roots, yolo_dir, class_names=list(names), overwrite=True)
            src_yaml = yolo_dir / "data.yaml"
        elif find_data_yaml(base) is not None:
            src_yaml = find_data_yaml(base)
            splits, root_of = {}, {}
            for s in yolo_splits(base) or ["train"]:
                coco = yolo_to_coco(base, s)
                splits[s] = work / "gt" / f"{s}.json"
                atomic_write_json(splits[s], coco)
                root_of[s] = resolve_yolo_split(base, s)[0]
            roots = root_of
        else:
            raise ConfigError(f"data.source {base}: no labels found — expected the phantom, a COCO folder "
                              "(annotations/train.json + images/) or a YOLO dataset (data.yaml + images/ + labels/); "
                              "convert other layouts with tools/convert.py")
    stats = ClassStats.from_coco(splits["train"], tail=list(cfg.data.tail) or None,
                                 tail_threshold=cfg.data.tail_threshold or None, floor=1)
    if sum(stats.instance_counts) == 0:
        raise ConfigError(f"{splits['train']}: the training split has no labelled boxes (is the label folder empty?)")
    import yaml

    data = yaml.safe_load(Path(src_yaml).read_text())
    data["path"] = str(Path(src_yaml).parent.resolve() / data.get("path", ".")) if not Path(
        str(data.get("path", "."))).is_absolute() else data["path"]
    data["channels"] = cfg.data.channels
    names = data["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    if names != list(stats.names):
        raise ConfigError(f"{src_yaml}: YOLO class names {names} disagree with the COCO categories {list(stats.names)}")
    data_yaml = work / "data.yaml"
    atomic_write_text(data_yaml, yaml.safe_dump(data, sort_keys=False))
    return data_yaml, splits, roots, stats


def _root_for(roots: Path | dict[str, Path], split: str) -> Path:
    return roots[split] if isinstance(roots, dict) else roots


# ----------------------------------------------------------------------------- stages
def _check_cfg(cfg: ExperimentConfig, *, resume: bool = False) -> str:
    arch = cfg.model.arch
    if arch.endswith(".pt") and not Path(arch).is_file():
        raise ConfigError(f"model.arch {arch!r} would be downloaded by Ultralytics; welde_det never downloads "
                          "weights — give a model YAML (yolov8n.yaml, random init) and model.weights=<local .pt>")
    if not (arch.endswith((".yaml", ".yml", ".pt"))):
        raise ConfigError(f"model.arch {arch!r} is not a YOLO model YAML (e.g. yolov8n.yaml) or a local .pt")
    if cfg.model.weights is not None and not resume and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights {cfg.model.weights!r} is not a local file; welde_det never downloads "
                          "weights — pass the path of a saved .pt, or leave it unset for random initialisation")
    valid = available_losses("sigmoid")
    unknown = [c for c in cfg.components if c not in valid]
    if unknown:
        raise ConfigError(f"loss component(s) {unknown} are not dense (sigmoid) registry losses; valid: {valid}")
    return arch


def _stages(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    if cfg.loss.mode == "single":
        return [{"name": "train", "components": list(cfg.components), "mode": "single",
                 "epochs": cfg.train.stage1_epochs + cfg.train.epochs, "stage2": cfg.train.freeze_backbone}]
    stages = []
    if cfg.train.stage1_epochs > 0:
        stages.append({"name": "stage1", "components": ["ce"], "mode": "single", "epochs": cfg.train.stage1_epochs,
                       "stage2": False})
    stages.append({"name": "stage2", "components": list(cfg.components), "mode": cfg.loss.mode,
                   "epochs": cfg.train.epochs, "stage2": True})
    return stages


def _loss_params(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    params = {k: dict(v) for k, v in cfg.loss.params.items()}
    for name in ("ldam", "lmf"):
        if name in cfg.components:
            params.setdefault(name, {}).setdefault("s", 1.0)  # raw logits with a prior bias, not cosine
            if cfg.loss.drw_epoch >= 0:
                params[name].setdefault("drw_epoch", cfg.loss.drw_epoch)
    return params


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


def _ultralytics_args(cfg: ExperimentConfig, data_yaml: Path, run_dir: Path, stage: dict[str, Any],
                      model: str, pretrained: str | None) -> dict[str, Any]:
    t = cfg.train
    args = {"model": model, "data": str(data_yaml), "epochs": stage["epochs"], "imgsz": t.imgsz, "batch": t.batch,
            "workers": t.workers, "seed": t.seed, "deterministic": True, "project": str(run_dir.resolve()),
            "name": stage["name"], "exist_ok": True, "plots": False, "val": True, "amp": t.amp,
            "optimizer": "SGD" if t.optimizer == "auto" else t.optimizer, "lr0": t.lr,
            "weight_decay": t.weight_decay, "patience": t.patience or 100, "nbs": t.nbs, "verbose": False,
            "close_mosaic": min(10, max(0, stage["epochs"] // 2)), "warmup_epochs": min(3.0, stage["epochs"] / 3)}
    if t.device:
        args["device"] = t.device
    elif not torch.cuda.is_available():
        args["device"] = "cpu"
    if stage["stage2"]:
        # the frozen-feature stage fits heads on the stage-1 features: no geometric re-augmentation
        args.update({"mosaic": 0.0, "close_mosaic": 0, "warmup_epochs": 0.0})
    if cfg.data.channels == 1:
        args.update({"hsv_h": 0.0, "hsv_s": 0.0})
    if pretrained:
        args["pretrained"] = pretrained
    return args


def stage_spec(cfg: ExperimentConfig, stage: dict[str, Any], stats: ClassStats, arch: str, val_coco: Path,
               val_root: Path) -> dict[str, Any]:
    """The WELDE settings of one stage, as :func:`~welde_det.integrations.yolo.trainer_spec` reads them.

    It travels as JSON in ``$WELDE_DET_YOLO_SPEC``, which Ultralytics' DDP workers inherit.
    """
    from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names

    counts = [float(c) for c in stats.effective_counts]
    objective_kw = {"ema_momentum": cfg.loss.ema_momentum, "sum_penalty": cfg.loss.sum_penalty,
                    "diversity": cfg.loss.diversity, "weight_floor": cfg.loss.weight_floor,
                    "warmup_steps": cfg.loss.warmup_steps} if stage["mode"] != "single" else {}
    spec = {"components": stage["components"], "mode": stage["mode"], "class_counts": counts,
            "loss_params": _loss_params(cfg), "hidden": cfg.model.hidden or None, "objective_kw": objective_kw,
            "stage2": stage["stage2"], "val_coco": str(val_coco), "val_images": str(val_root),
            "class_stats": stats.to_dict(), "config": config_to_dict(cfg), "conf": cfg.train.conf,
            "bit_depth": cfg.data.bit_depth}
    if stage["stage2"]:
        probe = WELDEDetectionModel(arch if not arch.endswith(".pt") else "yolov8n.yaml", nc=len(stats.names),
                                    components=["ce"], class_counts=counts)
        spec["freeze"] = stage2_freeze_names(probe)
    return spec


def _run_stage(cfg: ExperimentConfig, run_dir: Path, stage: dict[str, Any], data_yaml: Path, val_coco: Path,
               val_root: Path, stats: ClassStats, arch: str, pretrained: str | None) -> Path:
    """Train one stage (or resume it, or skip it if done); return its best checkpoint."""
    sdir = run_dir / stage["name"]
    done = sdir / DONE
    if done.is_file():
        logger.info("stage %s already finished", stage["name"])
        return Path(json.loads(done.read_text())["best"])
    spec = stage_spec(cfg, stage, stats, arch, val_coco, val_root)
    last = sdir / "weights" / "last.pt"
    if last.is_file() and _finished(last, stage["epochs"]):
        logger.info("stage %s had finished its %d epochs when it stopped", stage["name"], stage["epochs"])
    else:
        _train_stage(cfg, run_dir, stage, data_yaml, arch, pretrained, spec, last)
    best = sdir / "weights" / "best.pt"
    best = best if best.is_file() else last
    atomic_write_json(done, {"best": str(best), "epochs": stage["epochs"]})
    return best


def _finished(last: Path, epochs: int) -> bool:
    """Whether an interrupted stage's ``last.pt`` already holds its final epoch (Ultralytics refuses to resume it)."""
    ckpt = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    epoch = int(ckpt.get("epoch", -1))
    return epoch < 0 or epoch + 1 >= epochs


def _train_stage(cfg: ExperimentConfig, run_dir: Path, stage: dict[str, Any], data_yaml: Path, arch: str,
                 pretrained: str | None, spec: dict[str, Any], last: Path) -> None:
    from welde_det.integrations.yolo import WELDEDetectionTrainer

    with spec_env(spec):
        if last.is_file():
            logger.info("resuming stage %s from %s", stage["name"], last)
            trainer = WELDEDetectionTrainer(overrides={"resume": str(last)})
        else:
            trainer = WELDEDetectionTrainer(overrides=_ultralytics_args(cfg, data_yaml, run_dir, stage, arch,
                                                                        pretrained))
        trainer.train()


def train(cfg: ExperimentConfig, run_dir: Path, *, resume: str | os.PathLike | None = None) -> Path:
    """The YOLO runner (see the module docstring). Returns ``run_dir``."""
    arch = _check_cfg(cfg, resume=resume is not None)
    data_yaml, splits, roots, stats = resolve_yolo_data(cfg, run_dir)
    if resume is None:  # a resumed stage restores its own weights, whatever became of model.weights
        check_weights_classes(cfg.model.weights, stats.names)
    split = "val" if "val" in splits else "train"
    pretrained = cfg.model.weights
    best: Path | None = None
    for stage in _stages(cfg):
        best = _run_stage(cfg, run_dir, stage, data_yaml, splits[split], _root_for(roots, split), stats, arch,
                          pretrained)
        pretrained = str(best)
    assert best is not None
    (run_dir / "weights").mkdir(exist_ok=True)
    final = run_dir / "weights" / "best.pt"
    tmp = final.with_name(".best.pt.tmp")
    shutil.copyfile(best, tmp)
    os.replace(tmp, final)
    stats.save(run_dir / "class_stats.json")
    detector = load_yolo_detector(final, "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    from welde_det.integrations.yolo import predict_coco_yolo

    dets = predict_coco_yolo(detector.model, splits[split], _root_for(roots, split), stats, imgsz=cfg.train.imgsz,
                             channels=cfg.data.channels, conf=cfg.train.conf)
    atomic_write_json(run_dir / "detections.json", dets)
    atomic_write_json(run_dir / "eval_split.json", {"split": split, "coco": str(Path(splits[split]).resolve()),
                                                    "images": str(Path(_root_for(roots, split)).resolve())})
    from welde_det.engine.evaluate import write_detection_report

    res = write_detection_report(splits[split], dets, run_dir, class_stats=stats,
                                 title=f"{cfg.name}: YOLO ({Path(arch).stem}), {cfg.loss.mode}, {split} split")
    logger.info("mAP %.3f mAP_tail %.3f", res["stats"][0], res["map_tail"])
    return run_dir


# ----------------------------------------------------------------------------- inference
class YOLODetector(Detector):
    """A welde_det YOLO checkpoint (an Ultralytics ``.pt`` with a ``"welde_det"`` entry).

    The model's head fuses its K heads before Ultralytics' NMS.
    """

    framework = "yolo"

    def __init__(self, weights: str | os.PathLike, device: str = "cpu") -> None:
        ckpt = torch.load(Path(weights), map_location="cpu", weights_only=False)
        meta = ckpt.get("welde_det") if isinstance(ckpt, dict) else None
        if not isinstance(meta, dict) or meta.get("framework") != "yolo":
            raise ValueError(f"{weights}: not a welde_det YOLO checkpoint (no 'welde_det' entry)")
        model = ckpt.get("ema") or ckpt.get("model")
        cfg = meta.get("config", {})
        super().__init__(ClassStats.from_dict(meta["class_stats"]),
                         channels=int(cfg.get("data", {}).get("channels", 3)),
                         imgsz=int(cfg.get("train", {}).get("imgsz", 640)), weights=weights, device=device)
        self.model = model.float().to(device).eval()

    def predict(self, image, conf: float = 0.25) -> list[dict[str, Any]]:
        """See :meth:`Detector.predict`."""
        from welde_det.integrations.yolo import predict_yolo

        det = predict_yolo(self.model, image, imgsz=self.imgsz, channels=self.channels, conf=conf)
        out = [{"bbox": [float(v) for v in row[:4]], "score": float(row[4]), "class_index": int(row[5]),
                "class_name": self.names[int(row[5])]} for row in det.tolist()]
        out.sort(key=lambda d: -d["score"])
        return out


def load_yolo_detector(path: str | os.PathLike, device: str = "cpu") -> YOLODetector:
    """Load a YOLO checkpoint written by this runner as a :class:`~welde_det.engine.infer.Detector`."""
    return YOLODetector(path, device)
