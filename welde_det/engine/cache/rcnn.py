"""The cached frozen stage for torchvision Faster R-CNN (see :mod:`welde_det.engine.cache`).

In the frozen stage only the box predictor's K heads (adapters, classifiers) and θ train
(:func:`~welde_det.integrations.rcnn.freeze_for_stage2`); backbone and FPN run in eval mode
(:func:`~welde_det.integrations.rcnn.train_frozen`), the RPN, the RoI pooler, the shared
TwoMLPHead and the box regressor are fixed. Per image, :func:`build_rcnn_cache` keeps what the
trainable part and the loss read, computed once by torchvision's own code:

- the training-mode RPN proposals with the ground-truth boxes appended, matched to the ground
  truth by ``roi_heads.select_training_samples`` with its fg/bg sampler set to keep every
  proposal it could draw: their labels (0 = background) and box-regression targets;
- the box-head features of all of them (``box_head(box_roi_pool(...))``, 1024 floats each).

Every batch, :func:`rcnn_cached_losses` draws the RoIs with torchvision's own sampler
(``roi_heads.subsample``: at most 512 per image, a quarter foreground) — sampling stays
stochastic — and computes the loss as ``WELDERoIHeads.forward`` does in training: the box
predictor on the sampled features, the WELDE objective on their labels, torchvision's
smooth-L1 box term (constant here: the regressor is frozen). The RPN's losses, constant in the
frozen stage, are neither computed nor logged.

Images are padded to one canvas (``imgsz`` rounded up to the transform's 32) before the
backbone; the through-network stage pads each batch to its largest image instead, which is
the same canvas for square slices (all of lumbar6) and differs at the border otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from welde_det.engine.cache import (
    files_fingerprint,
    frozen_fingerprint,
    refuse_over_limit,
    remembered,
)
from welde_det.engine.config import ConfigError, ExperimentConfig

__all__ = ["RCNNFeatureCache", "build_rcnn_cache", "fit_rcnn_cached", "rcnn_cached_losses", "rcnn_frozen_outputs",
           "rcnn_trainable"]

logger = logging.getLogger(__name__)


class RCNNFeatureCache:
    """Per image: box-head features (P_i, D), labels (P_i,) and regression targets (P_i, 4) of its proposals.

    Attributes:
        features, labels, regression_targets: lists over the images, on the CPU.
        build_seconds: time taken to fill the cache.
    """

    def __init__(self, features: list[torch.Tensor], labels: list[torch.Tensor],
                 regression_targets: list[torch.Tensor], build_seconds: float) -> None:
        self.features, self.labels, self.regression_targets = features, labels, regression_targets
        self.build_seconds = build_seconds

    def __len__(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        """Bytes held (features, labels and targets)."""
        return sum(t.numel() * t.element_size() for group in (self.features, self.labels, self.regression_targets)
                   for t in group)

    @property
    def proposals(self) -> int:
        """Cached proposals over all images."""
        return sum(len(lab) for lab in self.labels)


def rcnn_trainable(name: str) -> bool:
    """State-dict entries the frozen stage trains or updates (the K heads and the objective)."""
    return name.startswith(("roi_heads.box_predictor.heads.", "roi_heads.objective."))


def _all_proposals(labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """``subsample`` that keeps every proposal torchvision's sampler could draw (label ≥ 0)."""
    return [torch.where(lab >= 0)[0] for lab in labels]


@torch.no_grad()
def rcnn_frozen_outputs(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
                        imgsz: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Box-head features, labels and regression targets of every proposal, per image of a batch.

    ``model`` must be in the frozen stage's mode (:func:`~welde_det.integrations.rcnn.train_frozen`).
    """
    from torchvision.models.detection.image_list import ImageList

    rh = model.roi_heads
    tr = model.transform
    image_list, tgts = tr(list(images), [dict(t) for t in targets])
    side = int(math.ceil(imgsz / tr.size_divisible) * tr.size_divisible)
    tensors = image_list.tensors
    if tensors.shape[-1] > side or tensors.shape[-2] > side:
        raise ConfigError(f"train.cache_frozen: a resized image is {tuple(tensors.shape[-2:])}, larger than "
                          f"train.imgsz={imgsz}")
    canvas = tensors.new_zeros((*tensors.shape[:-2], side, side))
    canvas[..., :tensors.shape[-2], :tensors.shape[-1]] = tensors
    image_list = ImageList(canvas, image_list.image_sizes)
    features = model.backbone(canvas)
    proposals, _ = model.rpn(image_list, features, tgts)
    rh.subsample = _all_proposals  # an instance attribute: torchvision's own matching, every proposal kept
    try:
        proposals, _, labels, regression_targets = rh.select_training_samples(proposals, tgts)
    finally:
        del rh.subsample
    feats = rh.box_head(rh.box_roi_pool(features, proposals, image_list.image_sizes))
    return list(feats.split([len(p) for p in proposals])), labels, regression_targets


def build_rcnn_cache(model: nn.Module, dataset: Any, *, batch: int, device: torch.device,
                     imgsz: int) -> RCNNFeatureCache:
    """:func:`rcnn_frozen_outputs` of every image of ``dataset`` (a ``CocoDetectionDataset``), once.

    Raises:
        ConfigError: the cache would exceed :func:`~welde_det.engine.cache.memory_limit` (estimated
            from the first batch, and checked again as it fills).
    """
    from welde_det.integrations.rcnn import train_frozen

    n = len(dataset)
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    targets_out: list[torch.Tensor] = []
    held = 0
    start = time.perf_counter()
    was_training = model.training
    train_frozen(model)
    try:
        for lo in range(0, n, batch):
            items = [dataset[i] for i in range(lo, min(lo + batch, n))]
            imgs = [x.to(device) for x, _ in items]
            tgts = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for _, t in items]
            f, lab, reg = rcnn_frozen_outputs(model, imgs, tgts, imgsz)
            for group, new in ((features, f), (labels, lab), (targets_out, reg)):
                group.extend(t.cpu() for t in new)
                held += sum(t.numel() * t.element_size() for t in new)
            refuse_over_limit(held / len(features), n, "Faster R-CNN")
    finally:
        model.train(was_training)
    return RCNNFeatureCache(features, labels, targets_out, time.perf_counter() - start)


def rcnn_cached_losses(model: nn.Module, cache: RCNNFeatureCache, indices: Sequence[int], *,
                       device: torch.device | str = "cpu",
                       sampled: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The RoI heads' training losses for images ``indices`` from the cache.

    Args:
        sampled: per image, the proposal indices to use; None draws them with torchvision's sampler
            (``roi_heads.subsample``), as the through-network stage does every batch.

    Returns:
        ``{"loss_classifier", "loss_box_reg"}`` as ``WELDERoIHeads.forward`` returns them; the WELDE
        terms are in ``roi_heads.last_terms``.
    """
    from welde_det.integrations.rcnn import _box_loss

    rh = model.roi_heads
    labels = [cache.labels[i] for i in indices]
    inds = list(sampled) if sampled is not None else rh.subsample(labels)
    inds = [idx.cpu() for idx in inds]
    feats = torch.cat([cache.features[i][idx] for i, idx in zip(indices, inds)]).to(device)
    labels_cat = torch.cat([lab[idx] for lab, idx in zip(labels, inds)]).to(device)
    reg = torch.cat([cache.regression_targets[i][idx] for i, idx in zip(indices, inds)]).to(device)
    logits_list, box_regression = rh.box_predictor(feats)
    out = rh.objective(logits_list, labels_cat)
    rh.last_terms = {k: v for k, v in out.items() if k != "loss"}
    return {"loss_classifier": out["loss"], "loss_box_reg": _box_loss(box_regression, labels_cat, reg)}


def fit_rcnn_cached(backend: Any, cfg: ExperimentConfig, stage: Any, data: Any, stats: Any, run_dir: Path, *,
                    init: Path | None, dataset: Any) -> Path:
    """``RCNNBackend.fit_stage`` for a frozen stage, on the cache: same model, parameters, optimiser,
    image order source (a detection sampler or a seeded permutation per epoch), per-epoch ``last.pt``
    with the optimiser state, selection (``best.pt``, ``patience``), ``terms.csv`` rows and ``model.pt``.

    Args:
        backend: the ``RCNNBackend``: its stage bookkeeping (``open_stage``, ``step_losses``,
            ``end_epoch``, ``close_stage``) is the through-network stage's own.
        dataset: the backend's ``CocoDetectionDataset`` (passed in: this module does not import the
            backend, which imports it).
    """
    from welde_det.engine.backends.base import device_for
    from welde_det.integrations.rcnn import train_frozen

    device = torch.device(device_for(cfg.train.device))
    # the backend's own stage bookkeeping: model and optimiser (or resume from last.pt), selection,
    # terms.csv, last.pt / best.pt, patience and model.pt — only the batches differ
    run = backend.open_stage(cfg, stage, data, stats, run_dir, init, device, extra={"cached": True})
    model, opt = run.model, run.opt
    train_ds = dataset(data.splits["train"], data.image_roots["train"], stats, cfg.data.channels)
    sampler: Any = None
    if cfg.data.sampler:
        from welde_det.losses.samplers import build_detection_sampler

        try:
            sampler = build_detection_sampler(cfg.data.sampler, train_ds.labels_per_image(),
                                              threshold=cfg.data.repeat_threshold, seed=cfg.train.seed)
        except ValueError as exc:
            raise ConfigError(f"data.sampler={cfg.data.sampler!r}: {exc}") from exc
    g = torch.Generator().manual_seed(cfg.train.seed)
    cache = RCNNFeatureCache([], [], [], 0.0)
    if run.start < stage.epochs:  # a resumed stage that had finished needs no cache
        key = ["rcnn", frozen_fingerprint(model, rcnn_trainable), files_fingerprint(
            [data.splits["train"], *(train_ds.root / im["file_name"] for im in train_ds.images)]),
            {"imgsz": cfg.train.imgsz, "channels": cfg.data.channels}]
        cache = remembered(key, lambda: build_rcnn_cache(model, train_ds, batch=cfg.train.batch, device=device,
                                                         imgsz=cfg.train.imgsz), "Faster R-CNN")
    logger.info("frozen-stage cache: %d images, %.0f proposals and %.2f MiB per image, %.1f MiB in all, built in "
                "%.1f s", len(cache), cache.proposals / max(len(cache), 1), cache.nbytes / max(len(cache), 1) / 2**20,
                cache.nbytes / 2**20, cache.build_seconds)
    amp = cfg.train.amp and device.type == "cuda"
    for epoch in range(run.start, stage.epochs):
        gepoch = stage.epoch_offset + epoch
        if sampler is not None:
            sampler.set_epoch(gepoch)
        model.roi_heads.objective.set_epoch(gepoch)
        train_frozen(model)
        order = list(iter(sampler)) if sampler is not None else torch.randperm(len(cache), generator=g).tolist()
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for lo in range(0, len(order), cfg.train.batch):
            with torch.autocast(device.type, enabled=amp):
                losses = rcnn_cached_losses(model, cache, order[lo:lo + cfg.train.batch], device=device)
            backend.step_losses(opt, losses, model, sums, gepoch)
            steps += 1
        if backend.end_epoch(run, cfg, stage, data, stats, device, epoch, sums, steps):
            break
    return backend.close_stage(run, cfg, stage, data, stats)
