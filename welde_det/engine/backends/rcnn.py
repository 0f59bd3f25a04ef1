"""torchvision Faster R-CNN backend with WELDE RoI heads.

- Model: :func:`welde_det.integrations.rcnn.build_faster_rcnn` (``model.arch``
  ``fasterrcnn_mobilenet_v3_large_fpn``, CPU-friendly, or ``fasterrcnn_resnet50_fpn``).
- A stage is a plain PyTorch loop (SGD or AdamW per ``train.optimizer``; ``data.sampler``
  draws images, e.g. ``repeat_factor``); a frozen stage trains only the K adapters, heads
  and θ (:func:`~welde_det.integrations.rcnn.freeze_for_stage2`: backbone, FPN, RPN, box
  head and box regressor fixed). A stage that follows another starts as it, every head as
  its head.
- Every epoch writes ``<stage>/weights/last.pt`` (the one schema, with the optimiser state)
  atomically, so ``--resume`` continues with the next epoch after a crash, even ``kill -9``.
  With a selection split, each epoch is evaluated on it and the best is kept
  (``best.pt``; ``train.patience`` stops early); otherwise the last epoch is the model.
- DDP: ``torchrun --nproc_per_node N tools/train.py ...`` (gloo on CPU, NCCL on CUDA);
  only rank 0 logs, saves and evaluates.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from welde_det.classes import ClassStats
from welde_det.engine.backends.base import DetectionBackend, device_for, welde_spec
from welde_det.engine.config import ConfigError, ExperimentConfig, config_to_dict
from welde_det.engine.stages import run_relative_paths
from welde_det.integrations.rcnn import build_rcnn_model
from welde_det.utils.fileio import append_csv_row
from welde_det.utils.logging import progress_enabled

__all__ = ["CocoDetectionDataset", "RCNNBackend"]

logger = logging.getLogger(__name__)
DEFAULT_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"


class CocoDetectionDataset(Dataset):
    """COCO images + boxes as torchvision detection targets (labels 1..C, 0 is background).

    The file is read with :func:`~welde_det.datasets.coco.load_coco`, which refuses
    zero-area boxes (part inside the image at most
    :data:`~welde_det.datasets.coco.MIN_BOX_SIDE` px wide or high) with an error naming the
    file and annotation id, so every target box has ``x1 > x0`` and ``y1 > y0``, as
    torchvision's detection models require, before training starts.
    """

    def __init__(self, coco_path: str | os.PathLike, image_root: str | os.PathLike, stats: ClassStats,
                 channels: int = 1) -> None:
        from welde_det.datasets.coco import CocoFormatError, load_coco

        self.coco = load_coco(coco_path)
        self.root = Path(image_root)
        self.channels = channels
        label_of = {cid: i + 1 for i, cid in enumerate(stats.category_ids)}
        unknown = {a["category_id"] for a in self.coco["annotations"]} - set(label_of)
        if unknown:
            raise CocoFormatError(f"{coco_path}: category ids {sorted(unknown)} are not in the class list "
                                  f"{list(stats.names)} (ids {list(stats.category_ids)})")
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.anns: dict[int, list] = defaultdict(list)
        for a in self.coco["annotations"]:
            if not a.get("iscrowd", 0):
                self.anns[a["image_id"]].append(a)
        self.label_of = label_of

    def __len__(self) -> int:
        return len(self.images)

    def labels_per_image(self) -> list[list[int]]:
        """Class indices (0..C-1) present in each image, in dataset order (for image samplers)."""
        return [sorted({self.label_of[a["category_id"]] - 1 for a in self.anns.get(info["id"], [])})
                for info in self.images]

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


def _optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    name = "SGD" if name == "auto" else name
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name in ("Adam", "AdamW"):
        return getattr(torch.optim, name)(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer={name!r}: the rcnn backend takes auto, SGD, Adam or AdamW")


@dataclass
class StageRun:
    """What one Faster R-CNN stage carries from epoch to epoch (:meth:`RCNNBackend.open_stage`)."""

    arch: str
    spec: Any
    last: Path
    best: Path
    out: Path
    stored: dict[str, Any]
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    opt: Any = None
    select_ds: Any = None
    start: int = 0
    best_fit: float = -math.inf
    since_best: int = 0


class RCNNBackend(DetectionBackend):
    """``model.framework: rcnn``."""

    framework = "rcnn"
    UNUSED = frozenset({"train.nbs"})

    def unused_keys(self, cfg: ExperimentConfig) -> set[str]:
        keys = super().unused_keys(cfg)
        return keys if cfg.data.sampler == "repeat_factor" else keys | {"data.repeat_threshold"}

    def title(self, cfg: ExperimentConfig) -> str:
        return f"Faster R-CNN ({self.arch(cfg)})"

    @staticmethod
    def arch(cfg: ExperimentConfig) -> str:
        from welde_det.integrations.rcnn import RCNN_ARCHS

        arch = cfg.model.arch
        if arch in RCNN_ARCHS:
            return arch
        if arch == "yolov8n.yaml":  # the config default: the CPU-friendly Faster R-CNN
            return DEFAULT_ARCH
        raise ConfigError(f"model.arch {arch!r} is not a Faster R-CNN; choose one of {list(RCNN_ARCHS)}")

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        self.arch(cfg)
        _optimizer(cfg.train.optimizer, [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.0)
        if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
            raise ConfigError(f"model.weights {cfg.model.weights!r} is not a local file; welde_det never downloads "
                              "weights — pass the path of a saved state dict, or leave it unset")

    # ------------------------------------------------------------------ one stage
    def _init_state(self, init: Path | None) -> dict[str, torch.Tensor] | None:
        """The previous stage's or ``model.weights``' state dict, read with ``weights_only=True``."""
        if init is None:
            return None
        from welde_det.checkpoint import is_welde_checkpoint, load_checkpoint, safe_load

        if is_welde_checkpoint(init):
            return load_checkpoint(init).model_state
        state = safe_load(init)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ConfigError(f"model.weights {init}: expected a Faster R-CNN state dict or welde_det checkpoint, "
                              f"found a {type(state).__name__}")
        return state

    def fit_stage(self, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats, run_dir: Path, *,
                  init: Path | None) -> Path:
        import torch.distributed as dist

        from welde_det.integrations.rcnn import train_frozen

        if stage.frozen and cfg.train.cache_frozen:  # the frozen network once per image (engine.cache)
            from welde_det.engine.cache.rcnn import fit_rcnn_cached

            return fit_rcnn_cached(self, cfg, stage, data, stats, run_dir, init=init, dataset=CocoDetectionDataset)
        rank, world = _dist_env()
        device = torch.device(device_for(cfg.train.device))
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        run = self.open_stage(cfg, stage, data, stats, run_dir, init, device)
        model, opt = run.model, run.opt
        train_ds = CocoDetectionDataset(data.splits["train"], data.image_roots["train"], stats, cfg.data.channels)
        loader, sampler = self._loader(cfg, train_ds, world)
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
        amp = cfg.train.amp and device.type == "cuda"
        for epoch in range(run.start, stage.epochs):
            gepoch = stage.epoch_offset + epoch
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(gepoch)
            model.roi_heads.objective.set_epoch(gepoch)
            if stage.frozen:  # the backbone's BatchNorm keeps the statistics the stage starts from
                train_frozen(model)
            else:
                model.train()
            sums: dict[str, float] = defaultdict(float)
            steps = 0
            it = loader
            if rank == 0 and progress_enabled():
                from tqdm import tqdm

                it = tqdm(loader, desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}", leave=False)
            for images, targets in it:
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in targets]
                with torch.autocast(device.type, enabled=amp):
                    losses = net(images, targets)
                self.step_losses(opt, losses, model, sums, gepoch)
                steps += 1
            if rank != 0:
                continue
            if self.end_epoch(run, cfg, stage, data, stats, device, epoch, sums, steps):
                break
        if world > 1:
            dist.barrier()
        if rank == 0:
            self.close_stage(run, cfg, stage, data, stats)
        if world > 1:
            dist.barrier()  # every rank starts the next stage from the file rank 0 has just written
        return run.out

    # ------------------------------------------------------------------ stage bookkeeping
    # shared by the through-network loop above and the cached frozen stage (engine.cache.rcnn)
    @staticmethod
    def step_losses(opt: torch.optim.Optimizer, losses: dict[str, torch.Tensor], model: Any, sums: dict[str, float],
                    epoch: int) -> None:
        """One optimiser step on the summed losses (a non-finite loss stops the run, naming the epoch);
        the losses and the WELDE terms are added to ``sums``."""
        loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch} "
                                     f"({ {k: float(v) for k, v in losses.items()} }); lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in {**losses, **model.roi_heads.last_terms}.items():
            sums[k] += float(v.detach())

    def open_stage(self, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats, run_dir: Path,
                   init: Path | None, device: torch.device, *, extra: dict[str, Any] | None = None) -> StageRun:
        """Build (or resume from ``last.pt``) the stage's model and optimiser over the stage's parameters."""
        from welde_det.checkpoint import load_checkpoint
        from welde_det.integrations.rcnn import freeze_for_stage2

        arch = self.arch(cfg)
        spec = welde_spec(cfg, stage.components, stage.mode, "softmax")
        sdir = run_dir / stage.name
        counts = list(stats.effective_counts)

        def build(weights: Any) -> torch.nn.Module:
            return build_rcnn_model(arch, counts, spec.to_dict(), channels=cfg.data.channels, imgsz=cfg.train.imgsz,
                                    weights=weights).to(device)

        run = StageRun(arch=arch, spec=spec, last=sdir / "weights" / "last.pt", best=sdir / "weights" / "best.pt",
                       out=sdir / "weights" / "model.pt",
                       # checkpoints store the config with its paths relative to the run folder
                       stored=config_to_dict(run_relative_paths(cfg, run_dir)), run_dir=run_dir,
                       extra=dict(extra or {}))
        opt_state = None
        if run.last.is_file():
            ck = load_checkpoint(run.last, map_location="cpu")
            model = build({})
            model.load_state_dict(ck.model_state)
            opt_state, run.start = ck.optimizer_state, int(ck.epoch) + 1
            run.best_fit = float((ck.extra or {}).get("best_fitness", -math.inf))
            run.since_best = int((ck.extra or {}).get("since_best", 0))
            logger.info("resuming stage %s at epoch %d of %d", stage.name, run.start + 1, stage.epochs)
        else:
            model = build(self._init_state(init) if init is not None else None)
        params = freeze_for_stage2(model) if stage.frozen else [p for p in model.parameters() if p.requires_grad]
        run.model, run.opt = model, _optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.weight_decay)
        if opt_state is not None:
            run.opt.load_state_dict(opt_state)
        run.select_ds = (CocoDetectionDataset(data.splits[data.select], data.image_roots[data.select], stats,
                                              cfg.data.channels) if data.select else None)
        return run

    def end_epoch(self, run: StageRun, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats,
                  device: torch.device, epoch: int, sums: dict[str, float], steps: int) -> bool:
        """``terms.csv`` row, selection fitness, ``last.pt`` (with optimiser state) / ``best.pt``; True to stop."""
        from welde_det.checkpoint import save_checkpoint

        row: dict[str, Any] = {"epoch": stage.epoch_offset + epoch, "stage": stage.name,
                               **{k: v / max(steps, 1) for k, v in sums.items()}}
        improved = False
        if run.select_ds is not None:
            fitness = self._fitness(run.model, run.select_ds, stats, device, cfg)
            row["select_map"] = fitness
            improved = fitness > run.best_fit
            run.best_fit, run.since_best = (fitness, 0) if improved else (run.best_fit, run.since_best + 1)
        append_csv_row(run.run_dir / "terms.csv", row)
        core = run.model.module if hasattr(run.model, "module") else run.model
        meta = {"framework": "rcnn", "arch": run.arch, "class_stats": stats.to_dict(), "config": run.stored,
                "stage": stage.name, "welde": run.spec.to_dict()}
        extra = {"channels": cfg.data.channels, "imgsz": cfg.train.imgsz, "best_fitness": run.best_fit,
                 "since_best": run.since_best, **run.extra}
        save_checkpoint(run.last, model_state=core.state_dict(), epoch=epoch, optimizer_state=run.opt.state_dict(),
                        extra=extra, **meta)
        if improved:
            save_checkpoint(run.best, model_state=core.state_dict(), epoch=epoch, extra=extra, **meta)
        logger.info("%s epoch %d%s: %s", stage.name, epoch, " (cached)" if run.extra.get("cached") else "",
                    ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("loss", "select"))))
        if cfg.train.patience and run.since_best >= cfg.train.patience:
            logger.info("no gain on %s for %d epochs: stopping", data.select, run.since_best)
            return True
        return False

    def close_stage(self, run: StageRun, cfg: ExperimentConfig, stage: Any, data: Any, stats: ClassStats) -> Path:
        """The stage's ``model.pt``: ``best.pt`` when a selection split chose, else ``last.pt``."""
        from welde_det.checkpoint import load_checkpoint, save_checkpoint

        chosen = run.best if data.select and run.best.is_file() else run.last
        ck = load_checkpoint(chosen)
        save_checkpoint(run.out, framework="rcnn", arch=run.arch, model_state=ck.model_state,
                        class_stats=stats.to_dict(), config=run.stored, stage=stage.name,
                        welde=run.spec.to_dict(), epoch=ck.epoch,
                        extra={"channels": cfg.data.channels, "imgsz": cfg.train.imgsz, "source": chosen.name})
        return run.out

    def _loader(self, cfg: ExperimentConfig, ds: CocoDetectionDataset, world: int) -> tuple[DataLoader, Any]:
        g = torch.Generator().manual_seed(cfg.train.seed)
        sampler: Any = None
        if cfg.data.sampler:
            from welde_det.losses.samplers import build_detection_sampler

            rank = int(os.environ.get("RANK", "0") or 0)
            try:
                sampler = build_detection_sampler(cfg.data.sampler, ds.labels_per_image(),
                                                  threshold=cfg.data.repeat_threshold, seed=cfg.train.seed,
                                                  num_replicas=world, rank=rank)
            except ValueError as exc:
                raise ConfigError(f"data.sampler={cfg.data.sampler!r}: {exc}") from exc
        elif world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, seed=cfg.train.seed)
        loader = DataLoader(ds, batch_size=cfg.train.batch, shuffle=sampler is None, sampler=sampler,
                            collate_fn=_collate, generator=g, num_workers=cfg.train.workers)
        return loader, sampler

    @staticmethod
    def _fitness(model: torch.nn.Module, ds: CocoDetectionDataset, stats: ClassStats, device: torch.device,
                 cfg: ExperimentConfig) -> float:
        """pycocotools-exact mAP on the selection split."""
        from welde_det.evaluation import evaluate_coco
        from welde_det.integrations.detectors import rcnn_predict_batch

        model.eval()
        dets = []
        for i in range(0, len(ds), cfg.train.batch):
            items = [ds[j] for j in range(i, min(i + cfg.train.batch, len(ds)))]
            outs = rcnn_predict_batch(model, [x for x, _ in items], conf=cfg.train.conf, device=device)
            for (_, t), rows in zip(items, outs):
                for x1, y1, x2, y2, score, c in rows:
                    dets.append({"image_id": int(t["image_id"]), "category_id": int(stats.category_ids[int(c)]),
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        model.train()
        return float(evaluate_coco(ds.coco, dets, class_stats=stats, device="cpu")["stats"][0])


def _dist_env() -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)

