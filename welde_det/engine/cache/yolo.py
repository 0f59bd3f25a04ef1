"""The cached frozen stage for Ultralytics YOLO (see :mod:`welde_det.engine.cache`).

The frozen stage freezes everything but the WELDE heads and θ
(:func:`~welde_det.integrations.yolo.stage2_freeze_names`: backbone, neck, box branch
``cv2``, DFL and each level's classification branch ``cv3`` — its stem and the original
classifier, BatchNorm statistics fixed by Ultralytics' ``_model_train``). The trainable part
starts at :meth:`~welde_det.integrations.yolo.WELDEDetect.forward_head`, on each level's stem
output ``cv3[l][:-1](x_l)``; the loss also needs the frozen box branch's DFL logits
``cv2[l](x_l)`` (box and DFL terms, and the task-aligned assigner's predicted boxes). Those two
are cached per image view (:func:`yolo_frozen_outputs`), with the boxes the loss decodes from
the DFL logits (:func:`yolo_decoded_boxes`, the criterion's own ``bbox_decode``: constant, as
the box branch is frozen); every batch then runs the unchanged
:meth:`~welde_det.integrations.yolo.WELDEDetect.class_scores` — the trainable part of
``forward_head`` — on them (:func:`yolo_cached_preds`) and the unchanged
:class:`~welde_det.integrations.yolo.WELDEDetectionLoss` — assignment included, with the
current fused scores.

Layout: the cache keeps every tensor in the memory order the heads and the loss read, so a
batch is one gather per tensor and nothing is transposed: stems as (entries, h, w, c3) — the
heads' 1×1 convolutions are matmuls over rows of channels — and the DFL logits as
(entries, anchors, 4·reg_max), the loss's ``pred_distri``. A batch hands them out as views with
the shapes ``forward_head`` gives: stems (B, c3, h, w) in channels-last memory, ``boxes``
(B, 4·reg_max, anchors).

:class:`CachedFrozenTrainer` is :class:`~welde_det.integrations.yolo.WELDEDetectionTrainer`
with a training loader over the cache (:class:`CachedLoader`) and the training model's loss
pointed at :func:`yolo_cached_loss`; everything else (optimiser, schedule, accumulation, EMA,
validation, checkpoints, resume) is Ultralytics' own loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from welde_det.engine.cache import (
    files_fingerprint,
    frozen_fingerprint,
    refuse_over_limit,
    remembered,
)
from welde_det.engine.config import ConfigError, ExperimentConfig
from welde_det.integrations.yolo import WELDEDetectionTrainer, _core

__all__ = ["CachedFrozenTrainer", "CachedLoader", "YOLOFeatureCache", "build_yolo_cache", "yolo_cached_loss",
           "yolo_cached_preds", "yolo_decoded_boxes", "yolo_frozen_outputs", "yolo_trainable", "yolo_trainer_class"]

logger = logging.getLogger(__name__)


#: Ultralytics' arguments the training views depend on
AUGMENT_KEYS = ("degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "hsv_h", "hsv_s",
                "hsv_v", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode", "bgr", "auto_augment",
                "erasing", "fraction", "classes", "single_cls", "rect", "cache")


def yolo_trainable(name: str) -> bool:
    """State-dict entries the frozen stage trains or updates (WELDE heads, objective, fusion weights)."""
    return ".welde_heads." in name or ".objective." in name or name.endswith("fusion_weight")


def yolo_trainer_class(cfg: ExperimentConfig, stage: Any) -> type[WELDEDetectionTrainer]:
    """The trainer of a stage: :class:`CachedFrozenTrainer` for a frozen stage with
    ``train.cache_frozen``, else :class:`~welde_det.integrations.yolo.WELDEDetectionTrainer`."""
    return CachedFrozenTrainer if stage.frozen and cfg.train.cache_frozen else WELDEDetectionTrainer


class _StopAtHead(Exception):
    """Raised by the pre-hook on the detection head once its inputs are captured."""


@torch.no_grad()
def yolo_frozen_outputs(model: nn.Module, img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen network's outputs for a batch of preprocessed images (B, C, H, W), values in [0, 1].

    Returns:
        ``(stems, boxes)``: per level ``stems[l] = cv3[l][:-1](x_l)`` (B, c3, h, w) — the input of the
        trainable WELDE heads — with ``x_l`` the neck feature the head receives, and ``boxes`` the box
        branch's DFL logits ``cv2[l](x_l)`` joined over levels as ``forward_head`` joins them,
        (B, 4·reg_max, anchors). Every module runs in eval mode (BatchNorm on its fixed statistics, as
        the frozen stage's trainer keeps the frozen layers); the modules' own train/eval flags are
        restored afterwards.
    """
    head = model.model[-1]
    captured: dict[str, list[torch.Tensor]] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"] = list(args[0])
        raise _StopAtHead

    modes = [(m, m.training) for m in model.modules()]
    handle = head.register_forward_pre_hook(grab)
    model.eval()
    try:
        with contextlib.suppress(_StopAtHead):
            model.predict(img)
        x = captured["x"]
        # still in eval mode: the head's stems and box branch have BatchNorm layers too
        stems = [head.cv3[i][:-1](x[i]) for i in range(head.nl)]
        boxes = torch.cat([head.cv2[i](x[i]).flatten(2) for i in range(head.nl)], dim=-1)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    return stems, boxes


@torch.no_grad()
def yolo_decoded_boxes(model: nn.Module, stems: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """The boxes the loss decodes from frozen DFL logits ``boxes`` (B, 4·reg_max, anchors): the criterion's own
    ``bbox_decode`` at the anchors of ``stems``' grids, (B, anchors, 4) xyxy in grid units.

    They depend on the frozen box branch only, so the cache keeps them and the loss skips the decoding
    (``pred_bboxes`` in :func:`yolo_cached_preds`); the assigner still sees them with the current scores.
    """
    from ultralytics.utils.tal import make_anchors

    # a criterion of its own, not kept on the model: the trainer sets the model's class weights (which the
    # criterion reads when it is created) only after the training loader, and so after this cache, is built
    crit = model.criterion if getattr(model, "criterion", None) is not None else model.init_criterion()
    anchor_points, _ = make_anchors(list(stems), crit.stride, 0.5)
    return crit.bbox_decode(anchor_points, boxes.permute(0, 2, 1).contiguous())  # outside a loss: Ultralytics' own


def yolo_cached_preds(head: nn.Module, stems: Sequence[torch.Tensor], boxes: torch.Tensor,
                      pred_bboxes: torch.Tensor | None = None) -> dict:
    """The training predictions dict of ``WELDEDetect.forward_head`` from cached frozen outputs: ``boxes``
    (B, 4·reg_max, anchors) as given, the heads' ``scores`` and ``scores_heads`` from
    :meth:`~welde_det.integrations.yolo.WELDEDetect.class_scores` on the stems, ``feats`` = the stems
    (their shapes give the anchors) and, when given, the decoded ``pred_bboxes`` (:func:`yolo_decoded_boxes`)."""
    preds = {"boxes": boxes, **head.class_scores(list(stems)), "feats": list(stems)}
    if pred_bboxes is not None:
        preds["pred_bboxes"] = pred_bboxes
    return preds


def yolo_cached_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``DetectionModel.loss`` on a cached batch (``stems``, ``boxes``, optional ``pred_bboxes``, ``batch_idx``,
    ``cls``, ``bboxes``): the model's own criterion
    (:class:`~welde_det.integrations.yolo.WELDEDetectionLoss`) on :func:`yolo_cached_preds`."""
    if getattr(model, "criterion", None) is None:  # as Ultralytics' DetectionModel.loss makes it
        model.criterion = model.init_criterion()
    preds = yolo_cached_preds(model.model[-1], batch["stems"], batch["boxes"], batch.get("pred_bboxes"))
    return model.criterion(preds, batch)


class YOLOFeatureCache:
    """The frozen outputs and labels of ``views × images`` entries (entry ``v · n + i``: view v of image i).

    Attributes:
        stems: per level, (entries, h, w, c3) on the CPU — channels last, the rows the heads' matmuls read.
        boxes: (entries, anchors, 4·reg_max): the DFL logits in the loss's layout.
        pred_bboxes: (entries, anchors, 4): the loss's decoding of ``boxes`` (:func:`yolo_decoded_boxes`),
            or None (the loss then decodes every batch).
        cls, bboxes: per entry, the view's labels as the dataset gives them ((n, 1), (n, 4) xywh normalised).
        images, views: the counts.
        imgsz: the views' side in pixels.
        build_seconds: time taken to fill the cache.
    """

    def __init__(self, stems: list[torch.Tensor], boxes: torch.Tensor, pred_bboxes: torch.Tensor | None,
                 cls: list[torch.Tensor], bboxes: list[torch.Tensor], images: int, views: int, imgsz: int,
                 build_seconds: float) -> None:
        self.stems, self.boxes, self.pred_bboxes, self.cls, self.bboxes = stems, boxes, pred_bboxes, cls, bboxes
        self.images, self.views, self.imgsz, self.build_seconds = images, views, imgsz, build_seconds

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.stems, self.boxes, *([self.pred_bboxes] if self.pred_bboxes is not None else [])]

    @property
    def bytes_per_entry(self) -> int:
        """Bytes of one cached image view (features only; the labels are a few bytes per box)."""
        return sum(t[0].numel() * t.element_size() for t in self._tensors())

    def batch(self, view: int, indices: Sequence[int]) -> dict[str, Any]:
        """A training batch of images ``indices`` in view ``view``, in the layout the criterion reads:
        ``stems`` per level (B, c3, h, w) and ``boxes`` (B, 4·reg_max, anchors), views of gathered rows
        (see the module docstring), and ``pred_bboxes`` (B, anchors, 4) when cached."""
        rows = torch.as_tensor([view * self.images + i for i in indices], dtype=torch.long)
        cls = [self.cls[int(r)] for r in rows]
        out = {"stems": [s.index_select(0, rows).permute(0, 3, 1, 2) for s in self.stems],
               "boxes": self.boxes.index_select(0, rows).permute(0, 2, 1),
               "cls": torch.cat(cls, 0), "bboxes": torch.cat([self.bboxes[int(r)] for r in rows], 0),
               "batch_idx": torch.cat([torch.full((len(c),), float(j)) for j, c in enumerate(cls)], 0),
               # what Ultralytics' loop reads of "img": its batch size and side (progress line)
               "img": torch.empty((len(rows), 0, self.imgsz, self.imgsz))}
        if self.pred_bboxes is not None:
            out["pred_bboxes"] = self.pred_bboxes.index_select(0, rows)
        return out


def _plain_view(dataset: Any, hyp: Any) -> Callable[[], None]:
    """Switch ``dataset`` to its plain transforms (letterbox, no random augmentation); returns the undo.

    Images are still loaded as the training pipeline loads them (``augment`` stays on for
    ``load_image``: bilinear resizing), so a plain view equals the through-network view with every
    random augmentation at zero.
    """
    augment, transforms = dataset.augment, dataset.transforms
    dataset.augment = False
    dataset.transforms = dataset.build_transforms(hyp=hyp)
    dataset.augment = augment

    def undo() -> None:
        dataset.transforms = transforms

    return undo


def build_yolo_cache(model: nn.Module, dataset: Any, *, views: int, batch: int, device: torch.device,
                     preprocess: Callable[[dict], dict], hyp: Any, imgsz: int) -> YOLOFeatureCache:
    """Run the frozen network over every image view of ``dataset`` once (:func:`yolo_frozen_outputs`).

    Args:
        model: the stage's model (frozen parts as they will stay).
        dataset: Ultralytics' training dataset of the stage (its transforms give the views).
        views: 0 = one plain view per image; V ≥ 1 = V draws through the dataset's own (augmenting)
            transforms, in order: all images of view 0, then view 1, ...
        batch: images per forward pass.
        preprocess: the trainer's batch preprocessing (to the device, ``/ 255``).
        hyp: the trainer's arguments (the plain transforms are built from them).
        imgsz: the views' side.

    Raises:
        ConfigError: the cache would exceed :func:`~welde_det.engine.cache.memory_limit` (checked
            after the first batch, before the rest is computed).
    """
    n = len(dataset)
    n_views = max(views, 1)
    undo = _plain_view(dataset, hyp) if views == 0 else (lambda: None)
    stems: list[torch.Tensor] = []
    boxes = decoded = torch.empty(0)
    cls: list[torch.Tensor] = []
    bboxes: list[torch.Tensor] = []
    start = time.perf_counter()
    try:
        for v in range(n_views):
            for lo in range(0, n, batch):
                items = [dataset[i] for i in range(lo, min(lo + batch, n))]
                b = preprocess(dataset.collate_fn(items))
                if tuple(b["img"].shape[-2:]) != (imgsz, imgsz):
                    raise ConfigError(f"train.cache_frozen: a training view is {tuple(b['img'].shape[-2:])} pixels, "
                                      f"not {imgsz}×{imgsz}; the cache needs square views (rect=False)")
                s, bx = yolo_frozen_outputs(model, b["img"])
                dec = yolo_decoded_boxes(model, s, bx)
                if not stems:
                    per_view = sum(t[0].numel() * t.element_size() for t in (*s, bx, dec))
                    refuse_over_limit(per_view, n * n_views, "YOLO")
                    stems = [torch.empty((n * n_views, t.shape[2], t.shape[3], t.shape[1]), dtype=t.dtype) for t in s]
                    boxes = torch.empty((n * n_views, bx.shape[2], bx.shape[1]), dtype=bx.dtype)
                    decoded = torch.empty((n * n_views, *dec.shape[1:]), dtype=dec.dtype)
                rows = slice(v * n + lo, v * n + lo + len(items))
                for dst, src in zip(stems, s):
                    dst[rows] = src.permute(0, 2, 3, 1).cpu()
                boxes[rows] = bx.permute(0, 2, 1).cpu()
                decoded[rows] = dec.cpu()
                idx = b["batch_idx"].cpu()
                for j in range(len(items)):
                    keep = idx == j
                    cls.append(b["cls"].cpu()[keep])
                    bboxes.append(b["bboxes"].cpu()[keep])
    finally:
        undo()
    return YOLOFeatureCache(stems, boxes, decoded, cls, bboxes, n, n_views, imgsz, time.perf_counter() - start)


class CachedLoader:
    """Ultralytics' training loader, as far as its trainer uses one, over a :class:`YOLOFeatureCache`.

    Each pass (one epoch) takes view ``epoch mod views`` (``epoch`` read from ``epoch_fn``) and visits
    the images in the order of ``sampler`` (a detection sampler, re-drawn per epoch) or of a random
    permutation from a generator seeded once, as a shuffling ``DataLoader`` does.
    """

    num_workers = 0
    drop_last = False

    def __init__(self, cache: YOLOFeatureCache, batch_size: int, *, dataset: Any, epoch_fn: Callable[[], int],
                 seed: int, sampler: Any = None) -> None:
        self.cache, self.batch_size, self.dataset, self.epoch_fn = cache, batch_size, dataset, epoch_fn
        self.sampler = sampler if sampler is not None else range(cache.images)
        self._shuffle = sampler is None
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        epoch = int(self.epoch_fn())
        if self._shuffle:
            order = torch.randperm(self.cache.images, generator=self.generator).tolist()
        else:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = list(iter(self.sampler))
        view = epoch % self.cache.views
        for lo in range(0, len(order), self.batch_size):
            yield self.cache.batch(view, order[lo:lo + self.batch_size])

    def reset(self) -> None:
        """Nothing to rebuild: the views were drawn when the cache was filled."""

    def close(self) -> None:
        """No worker processes to stop."""


class CachedFrozenTrainer(WELDEDetectionTrainer):
    """:class:`~welde_det.integrations.yolo.WELDEDetectionTrainer` for a frozen stage, on cached outputs.

    - ``get_dataloader("train")`` builds the same training dataset (and detection sampler) as the
      parent, fills a :class:`YOLOFeatureCache` from it with the stage's model (``cache_views`` from
      the run's config, travelling in the trainer spec) and returns a :class:`CachedLoader`;
    - ``preprocess_batch`` moves cached tensors to the device;
    - after Ultralytics' set-up (model, freeze, optimiser, EMA), the training model's ``loss`` is
      :func:`yolo_cached_loss` (an instance attribute, removed when training ends; the EMA copy and
      the checkpoints never carry it).

    Raises:
        ValueError: the spec is not a frozen stage's, or Ultralytics' ``multi_scale``/``compile``
            (which need images) is on.
    """

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        super().__init__(cfg, overrides, _callbacks)
        if not self.welde_spec.get("stage2"):
            raise ValueError("CachedFrozenTrainer trains a frozen stage only (the spec's stage2 is false)")
        if self.args.multi_scale or self.args.compile:
            raise ValueError(f"train.cache_frozen: Ultralytics' multi_scale={self.args.multi_scale} / "
                             f"compile={self.args.compile} need images in the loop; turn them off")
        train_cfg = self.welde_spec.get("config", {}).get("train", {})
        self.cache_views = int(train_cfg.get("cache_views", 0))
        self.checkpoint_every_s = float(train_cfg.get("checkpoint_every_s", 30.0))
        self.cache: YOLOFeatureCache | None = None
        self._last_save: float | None = None

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        if mode != "train":
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        from welde_det.integrations.yolo import yolo_image_classes
        from welde_det.losses import build_detection_sampler

        dataset = self.build_dataset(dataset_path, mode, batch_size)
        sampler = None
        if self.sampler_name not in (None, "none"):
            sampler = build_detection_sampler(self.sampler_name, yolo_image_classes(dataset),
                                              threshold=self.repeat_threshold, seed=int(self.args.seed))
        core, preprocess = _core(self.model), super().preprocess_batch
        key = ["yolo", frozen_fingerprint(core, yolo_trainable), files_fingerprint(dataset.im_files),
               [[np.asarray(lb["cls"]).tolist(), np.asarray(lb["bboxes"]).tolist()] for lb in dataset.labels],
               {"imgsz": int(self.args.imgsz), "views": self.cache_views, "channels": self.data["channels"],
                "bit_depth": int(self.welde_spec.get("bit_depth", 8)),
                # random views depend on the seed and the augmentation; plain views on neither, so the seeds of
                # a study's frozen stage share one plain cache
                **({"seed": int(self.args.seed), **{k: getattr(self.args, k, None) for k in AUGMENT_KEYS}}
                   if self.cache_views else {})}]
        self.cache = remembered(key, lambda: build_yolo_cache(
            core, dataset, views=self.cache_views, batch=batch_size, device=self.device, preprocess=preprocess,
            hyp=self.args, imgsz=int(self.args.imgsz)), "YOLO")
        c = self.cache
        logger.info("frozen-stage cache: %d images × %d view(s), %.2f MiB per view, %.1f MiB in all, built in %.1f s",
                    c.images, c.views, c.bytes_per_entry / 2**20, c.bytes_per_entry * c.images * c.views / 2**20,
                    c.build_seconds)
        return CachedLoader(c, batch_size, dataset=dataset, epoch_fn=lambda: self.epoch, seed=int(self.args.seed),
                            sampler=sampler)

    def preprocess_batch(self, batch: dict) -> dict:
        if "stems" not in batch:  # images (the validator's)
            return super().preprocess_batch(batch)
        dev = self.device
        return {k: ([t.to(dev) for t in v] if isinstance(v, list) else v.to(dev)) for k, v in batch.items()}

    def _setup_train(self):
        super()._setup_train()
        core = _core(self.model)
        core.loss = lambda batch, preds=None: yolo_cached_loss(core, batch)
        self._restrict_ema(core)

    def _restrict_ema(self, core: nn.Module) -> None:
        """Let the model EMA average only what the stage changes (:func:`yolo_trainable`).

        Ultralytics' ``ModelEMA`` lerps every floating tensor of the model each optimiser step — 3 M
        values for YOLOv8n, of which the frozen stage changes 30 k. The frozen tensors are equal in
        the model and its EMA copy (deep-copied at set-up, never updated: the cached stage does not
        even run the frozen layers), and ``lerp(a, a, w) = a`` exactly, so averaging only the
        trainable entries gives the same EMA model. Uses ``ModelEMA``'s list of (EMA, model) tensor
        pairs, which it builds on its first update; an Ultralytics without that list keeps its full
        update (same result, slower).
        """
        ema = self.ema
        if ema is None or not hasattr(ema, "_pairs"):
            return
        src = core.state_dict()  # detached tensors sharing the parameters' storage, as ModelEMA takes them
        pairs = [(v, src[k]) for k, v in ema.ema.state_dict().items() if v.dtype.is_floating_point and yolo_trainable(k)]
        ema._pairs = ([e for e, _ in pairs], [m for _, m in pairs])

    def _do_train(self):
        try:
            return super()._do_train()
        finally:
            _core(self.model).__dict__.pop("loss", None)

    def save_model(self):
        """The parent's checkpoint, at most once per ``train.checkpoint_every_s``.

        A cached epoch takes seconds and a full Ultralytics checkpoint (a half-precision copy of
        the whole EMA model, the optimiser state, the results table) about half a second, so
        writing one every epoch would cost as much as the training. Always written: the stage's
        first epoch (so a NaN recovery and a resume always find ``last.pt``), its last, and a new
        best when validation runs every epoch (``best.pt`` must be the best epoch). A killed run
        resumes from the last one written and repeats at most ``checkpoint_every_s`` of work.
        """
        final = self.epoch + 1 >= self.epochs or self.stop
        new_best = bool(self.args.val) and self.fitness is not None and self.best_fitness == self.fitness
        now = time.monotonic()
        due = self._last_save is None or now - self._last_save >= self.checkpoint_every_s
        if not (final or new_best or due):
            return False
        ok = super().save_model()
        self._last_save = time.monotonic()
        return ok
