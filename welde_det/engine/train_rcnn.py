"""Training runner for torchvision Faster R-CNN with WELDE RoI heads (``framework: rcnn``).

- Data: ``data.source=phantom`` generates (and caches) the synthetic lumbar phantom; any
  other value is a COCO dataset folder with ``annotations/{train,val[,test]}.json`` and the
  images they name under ``images/``. Slices are read as grey (1 channel) or repeated to
  3 channels (``data.channels``).
- Model: :func:`welde_det.integrations.rcnn.build_faster_rcnn` (``model.arch`` one of
  ``fasterrcnn_mobilenet_v3_large_fpn`` (default, CPU-friendly) or ``fasterrcnn_resnet50_fpn``).
- Schedule: for ``welde``/``ce_ensemble``, ``train.stage1_epochs`` of ordinary full-network
  training with one ``ce`` head (as the YOLO and classification runners do), then
  ``train.epochs`` of stage 2 with the configured K heads — each starting as the stage-1
  head — and backbone, FPN, RPN, box head and box regressor frozen. Single-loss runs train
  ``stage1_epochs + epochs`` with their loss (frozen in the second part with
  ``train.freeze_backbone``). ``model.weights`` may be a local torchvision state dict or a
  welde_det checkpoint of the same classes (``make demo`` starts stage 2 from the CE run).
- DDP: launched with ``torchrun --nproc_per_node N tools/train.py ...``; the process group
  uses gloo on CPU and NCCL on CUDA; only rank 0 logs, saves and evaluates.
- Resumable: ``weights/last.pt`` is written atomically after every epoch (model, optimiser,
  epoch, ClassStats, resolved config); ``--resume <run>`` continues with the next epoch.
- At the end, detections on the validation split are evaluated with the pycocotools-exact
  evaluator into ``report.json`` / ``report.md`` / plots, and saved as ``detections.json``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from welde_det.classes import ClassStats
from welde_det.datasets.coco import load_coco
from welde_det.engine.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    replace_section,
)
from welde_det.engine.train import check_weights_classes
from welde_det.integrations.rcnn import RCNN_ARCHS, build_faster_rcnn, freeze_for_stage2
from welde_det.losses import available_losses
from welde_det.utils.fileio import append_csv_row, atomic_write_json, atomic_writer
from welde_det.utils.logging import progress_enabled

__all__ = ["CocoDetectionDataset", "load_rcnn", "predict_coco", "train"]

logger = logging.getLogger(__name__)
DEFAULT_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"


class CocoDetectionDataset(Dataset):
    """COCO images + boxes as torchvision detection targets (labels 1..C, 0 is background)."""

    def __init__(self, coco_path: str | os.PathLike, image_root: str | os.PathLike, stats: ClassStats,
                 channels: int = 1) -> None:
        self.coco = load_coco(coco_path)
        self.root = Path(image_root)
        self.channels = channels
        label_of = {cid: i + 1 for i, cid in enumerate(stats.category_ids)}
        unknown = {a["category_id"] for a in self.coco["annotations"]} - set(label_of)
        if unknown:
            raise ValueError(f"{coco_path}: category ids {sorted(unknown)} are not in the class list "
                             f"{list(stats.names)} (ids {list(stats.category_ids)})")
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.anns: dict[int, list] = defaultdict(list)
        for a in self.coco["annotations"]:
            if not a.get("iscrowd", 0):
                self.anns[a["image_id"]].append(a)
        self.label_of = label_of

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import cv2

        info = self.images[i]
        path = self.root / info["file_name"]
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise FileNotFoundError(f"{path}: image named in the COCO file cannot be read")
        if img.ndim == 3:
            img = img[:, :, 0]
        scale = 65535.0 if img.dtype == np.uint16 else 255.0
        x = torch.from_numpy(img.astype(np.float32) / scale)[None]
        if self.channels == 3:
            x = x.expand(3, -1, -1).contiguous()
        anns = self.anns.get(info["id"], [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return x, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}


def _collate(batch):
    return tuple(zip(*batch))


def _data_paths(cfg: ExperimentConfig) -> tuple[dict[str, Path], Path, ClassStats]:
    """COCO file per split, the image root and the train split's ClassStats."""
    if cfg.data.source == "phantom":
        from welde_det.datasets.phantom import make_phantom_dataset, phantom_cache_dir

        formats = ("coco",)
        out = phantom_cache_dir(cfg.data.cache_dir, cfg.data.n_images, seed=cfg.data.seed,
                                difficulty=cfg.data.difficulty, contrast=cfg.data.contrast, formats=formats,
                                bit_depth=cfg.data.bit_depth)
        ds = make_phantom_dataset(out, cfg.data.n_images, seed=cfg.data.seed, difficulty=cfg.data.difficulty,
                                  contrast=cfg.data.contrast, formats=formats, progress=progress_enabled(),
                                  bit_depth=cfg.data.bit_depth)
        splits = {s: ds.annotations(s) for s in ("train", "val", "test")}
        root = ds.images_dir
    else:
        base = Path(cfg.data.source)
        ann = base / "annotations"
        if not ann.is_dir():
            raise ConfigError(f"data.source {base}: expected a COCO dataset folder with annotations/train.json and "
                              "annotations/val.json (convert other layouts with tools/convert.py)")
        splits = {s: ann / f"{s}.json" for s in ("train", "val", "test") if (ann / f"{s}.json").is_file()}
        if "train" not in splits:
            raise ConfigError(f"{ann}: no train.json")
        root = base / "images"
    stats = ClassStats.from_coco(splits["train"], tail=list(cfg.data.tail) or None,
                                 tail_threshold=cfg.data.tail_threshold or None, floor=1)
    if sum(stats.instance_counts) == 0:
        raise ConfigError(f"{splits['train']}: the training split has no labelled boxes")
    return splits, root, stats


def _check_cfg(cfg: ExperimentConfig) -> str:
    arch = cfg.model.arch if cfg.model.arch in RCNN_ARCHS else None
    if arch is None:
        if cfg.model.arch.startswith("yolo"):
            arch = DEFAULT_ARCH
        else:
            raise ConfigError(f"model.arch {cfg.model.arch!r} is not a Faster R-CNN; choose one of {list(RCNN_ARCHS)}")
    unknown = [c for c in cfg.components if c not in available_losses("softmax")]
    if unknown:
        raise ConfigError(f"loss component(s) {unknown} are not registry losses; valid: {available_losses('softmax')}")
    return arch


def _two_stage(cfg: ExperimentConfig) -> bool:
    """WELDE / ce_ensemble with a stage 1: ordinary K = 1 ``ce`` training comes first."""
    return cfg.loss.mode != "single" and cfg.train.stage1_epochs > 0


def _build(cfg: ExperimentConfig, stats: ClassStats, arch: str, *, stage1: bool = False,
           weights: Any = None) -> torch.nn.Module:
    """The model of a stage: the configured heads, or (``stage1``) one ``ce`` head.

    ``weights`` (a state dict) overrides ``model.weights``; the stage-2 model is built from
    the stage-1 model's this way, every head starting as its head.
    """
    if stage1:
        cfg = replace_section(cfg, "loss", mode="single", name="ce")
    mode = "single" if cfg.loss.mode == "single" else "welde"
    kw: dict[str, Any] = {}
    if mode == "welde":
        kw = {"ema_momentum": cfg.loss.ema_momentum, "sum_penalty": cfg.loss.sum_penalty,
              "diversity": cfg.loss.diversity, "weight_floor": cfg.loss.weight_floor,
              "warmup_steps": cfg.loss.warmup_steps}
    params = {k: dict(v) for k, v in cfg.loss.params.items()}
    for name in ("ldam", "lmf"):
        if name in cfg.components:
            params.setdefault(name, {}).setdefault("s", 1.0)  # raw RoI logits, not cosine
            if cfg.loss.drw_epoch >= 0:
                params[name].setdefault("drw_epoch", cfg.loss.drw_epoch)
    return build_faster_rcnn(arch, foreground_counts=stats.effective_counts, components=cfg.components, mode=mode,
                             in_channels=cfg.data.channels, weights=cfg.model.weights if weights is None else weights,
                             min_size=cfg.train.imgsz,
                             max_size=cfg.train.imgsz, loss_params=params, hidden=cfg.model.hidden or None, **kw)


def _dist_env() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _save(path: Path, model, opt, epoch: int, stats: ClassStats, cfg: ExperimentConfig, arch: str,
          stage1_model: bool = False) -> None:
    core = model.module if hasattr(model, "module") else model
    ckpt = {"framework": "rcnn", "arch": arch, "model": core.state_dict(), "optimizer": opt.state_dict(),
            "epoch": epoch, "class_stats": stats.to_dict(), "config": config_to_dict(cfg),
            "stage1_model": stage1_model}
    with atomic_writer(path, "wb") as f:
        torch.save(ckpt, f)


def load_rcnn(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) and its checkpoint dict from ``weights/last.pt``."""
    ckpt = torch.load(Path(path), map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("framework") != "rcnn":
        raise ValueError(f"{path}: not a welde_det Faster R-CNN checkpoint")
    cfg = config_from_dict(ckpt["config"], source=str(path))
    stats = ClassStats.from_dict(ckpt["class_stats"])
    # weights={}: the checkpoint holds every weight; model.weights may have moved since
    model = _build(cfg, stats, ckpt["arch"], stage1=bool(ckpt.get("stage1_model", False)), weights={})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def predict_coco(model: torch.nn.Module, dataset: CocoDetectionDataset, stats: ClassStats, *, batch: int = 4,
                 device: torch.device | None = None) -> list[dict[str, Any]]:
    """COCO results (xywh boxes, category ids, scores) for every image of ``dataset``."""
    device = device or next(model.parameters()).device
    model.eval()
    results = []
    loader = DataLoader(dataset, batch_size=batch, collate_fn=_collate)
    for images, targets in loader:
        outs = model([im.to(device) for im in images])
        for out, t in zip(outs, targets):
            b = out["boxes"].cpu().double()
            for box, label, score in zip(b.tolist(), out["labels"].tolist(), out["scores"].tolist()):
                results.append({"image_id": int(t["image_id"]), "category_id": int(stats.category_ids[label - 1]),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    return results


def train(cfg: ExperimentConfig, run_dir: Path, *, resume: str | os.PathLike | None = None) -> Path:
    """The Faster R-CNN runner (see the module docstring). Returns ``run_dir``."""
    arch = _check_cfg(cfg)
    rank, world = _dist_env()
    device = torch.device(cfg.train.device if cfg.train.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    splits, root, stats = _data_paths(cfg)
    if resume is None:  # a resumed run restores its own weights, whatever became of model.weights
        check_weights_classes(cfg.model.weights, stats.names)
    train_ds = CocoDetectionDataset(splits["train"], root, stats, cfg.data.channels)
    torch.manual_seed(cfg.train.seed)
    total = cfg.train.stage1_epochs + cfg.train.epochs
    start = 0
    ckpt_path = run_dir / "weights" / "last.pt"
    opt_state = None
    stage1_model = _two_stage(cfg)
    if resume is not None:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: {ckpt_path} not found")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        stage1_model = bool(ckpt.get("stage1_model", False))
        model = _build(cfg, stats, arch, stage1=stage1_model, weights={}).to(device)
        model.load_state_dict(ckpt["model"])
        opt_state, start = ckpt["optimizer"], ckpt["epoch"] + 1
        if start >= total:
            logger.info("run already finished %d epochs", total)
    else:
        model = _build(cfg, stats, arch, stage1=stage1_model).to(device)
    stage2 = cfg.loss.mode != "single" or cfg.train.freeze_backbone
    sampler = torch.utils.data.distributed.DistributedSampler(train_ds, seed=cfg.train.seed) if world > 1 else None
    g = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch, shuffle=sampler is None, sampler=sampler,
                        collate_fn=_collate, generator=g, num_workers=0)
    # theta gets no gradient during WELDE's warm-up, so DDP must allow unused parameters
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    log_rows: list[dict[str, Any]] = []
    opt = None
    for epoch in range(start, total):
        in_stage2 = stage2 and epoch >= cfg.train.stage1_epochs
        if in_stage2 and stage1_model:  # the K heads start as the trained stage-1 head
            model = _build(cfg, stats, arch, weights=model.state_dict()).to(device)
            stage1_model, opt_state = False, None  # a new model: the stage-1 optimiser state does not apply
            net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
        if opt is None or (in_stage2 and epoch == cfg.train.stage1_epochs):
            params = freeze_for_stage2(model) if in_stage2 else [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
            if opt_state is not None:
                try:
                    opt.load_state_dict(opt_state)
                except ValueError:
                    logger.warning("optimizer state does not fit this stage; starting it afresh")
                opt_state = None
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.roi_heads.objective.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        it = loader
        if rank == 0 and progress_enabled():
            from tqdm import tqdm

            it = tqdm(loader, desc=f"epoch {epoch + 1}/{total}{' (stage 2)' if in_stage2 else ''}", leave=False)
        for images, targets in it:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in targets]
            losses = net(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch} ({ {k: float(v) for k, v in losses.items()} }); "
                                         "lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in {**losses, **model.roi_heads.last_terms}.items():
                sums[k] += float(v.detach())
            steps += 1
        if rank == 0:
            row = {"epoch": epoch, "stage": 2 if in_stage2 else 1, **{k: v / max(steps, 1) for k, v in sums.items()}}
            log_rows.append(row)
            append_csv_row(run_dir / "terms.csv", row)
            _save(ckpt_path, model, opt, epoch, stats, cfg, arch, stage1_model)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("loss")))
    if world > 1:
        dist.barrier()
    if rank == 0:
        stats.save(run_dir / "class_stats.json")
        split = "val" if "val" in splits else "train"
        eval_ds = CocoDetectionDataset(splits[split], root, stats, cfg.data.channels)
        dets = predict_coco(model, eval_ds, stats, device=device)
        atomic_write_json(run_dir / "detections.json", dets)
        atomic_write_json(run_dir / "eval_split.json", {"split": split, "coco": str(Path(splits[split]).resolve()),
                                                        "images": str(Path(root).resolve())})
        from welde_det.engine.evaluate import write_detection_report

        res = write_detection_report(splits[split], dets, run_dir, class_stats=stats,
                                     title=f"{cfg.name}: Faster R-CNN ({arch}), {cfg.loss.mode}, {split} split")
        logger.info("mAP %.3f mAP_tail %.3f", res["stats"][0], res["map_tail"])
    if world > 1:
        dist.destroy_process_group()
    return run_dir
