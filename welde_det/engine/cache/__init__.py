"""The cached frozen stage (``train.cache_frozen=true``): the frozen network runs once per image view.

In the frozen stage (:func:`~welde_det.engine.stages.plan_stages`) only adapters, heads and
θ train; the backbone, neck, box branch / RPN and box head — BatchNorm statistics included —
do not change. Their outputs are therefore computed once per image (per augmented view, see
below), kept in memory, and the heads are trained on them with the same loss code, the same
parameter set and the same optimiser settings as the through-network stage.

What is cached, per framework:

- **YOLO** (:mod:`welde_det.engine.cache.yolo`): per level, the output of the classification
  branch's frozen stem (``cv3[l][:-1]``: the input of the trainable WELDE heads,
  :meth:`~welde_det.integrations.yolo.WELDEDetect.forward_head`) and the frozen box branch's
  raw DFL distributions (``cv2[l]``) with the boxes the loss decodes from them (constant: the
  box branch is frozen), plus the view's labels, each in the memory layout the heads and the
  loss read (a batch is one gather per tensor, no transposes). The task-aligned assigner is
  **not** cached: it runs every batch inside the unchanged
  :class:`~welde_det.integrations.yolo.WELDEDetectionLoss` with the current (fused) class
  scores, as Ultralytics does. Training goes through Ultralytics' own trainer loop
  (:class:`~welde_det.engine.cache.yolo.CachedFrozenTrainer`): optimiser groups, nominal-batch
  accumulation, learning-rate schedule, gradient clipping, model EMA, validation on the
  selection split, ``patience``, checkpoints and ``--resume`` are the through-network
  trainer's; only the batches (cached tensors instead of images) and the forward differ. The
  YOLO backend picks the trainer with :func:`~welde_det.engine.cache.yolo.yolo_trainer_class`.
- **Faster R-CNN** (:mod:`welde_det.engine.cache.rcnn`): per image, the box-head features
  (``box_head`` output, the box predictor's input) of **all** training-mode RPN proposals
  (ground-truth boxes appended, as torchvision does), with their matched labels and
  regression targets from torchvision's own ``select_training_samples``. The fg/bg sampler
  (``roi_heads.subsample``) runs again every batch, so sampling stays stochastic; the RPN's
  own losses (constant in the frozen stage) are not computed and not logged.
  :func:`~welde_det.engine.cache.rcnn.fit_rcnn_cached` replaces the backend's epoch loop and
  keeps its bookkeeping (``last.pt`` every epoch with the optimiser state, ``best.pt`` and
  ``patience`` on the selection split, ``terms.csv``, ``--resume``, ``model.pt``).

Equality (``tests/engine/test_frozen_cache.py``): on the same batch — same images, same
augmentation, same sampled proposals — the loss and the gradient of every trainable parameter
from the cached path equal the through-network ones (relative difference ≤ 1e-12 in float64 and
≤ 1e-5 in float32, both frameworks; measured: 0 to 2e-16 in float64, ≤ 4e-7 in float32). For
YOLO the whole trainer is checked too: with every random augmentation at zero, two epochs of the
cached trainer end with the through-network trainer's heads, θ and EMA model to 1e-8 (measured
1e-10).

Augmentation (``train.cache_views``):

- ``0`` (default): one **plain** view per image — loaded as Ultralytics' training pipeline loads
  it (bilinear resize) and letterboxed to ``imgsz``, with no random augmentation: the
  through-network view with ``translate = scale = fliplr = hsv_v = 0``. Lost against
  through-network training: all of the frozen stage's random augmentation (YOLO's defaults there:
  translate 0.1, scale 0.5, left-right flip 0.5, brightness 0.4). Exact for Faster R-CNN, whose
  backend never augments.
- ``V ≥ 1`` (YOLO only): ``V`` views per image drawn **once**, before training, through
  Ultralytics' own training pipeline with the run's settings (the frozen stage has mosaic
  off; random affine scale/translate, left-right flip and HSV jitter as configured); epoch
  ``e`` trains on view ``e mod V``. What is lost against through-network training: a fresh
  random draw per image per epoch — after ``V`` epochs the same views come back, so with
  ``V`` smaller than the number of epochs the heads see ``V`` fixed perturbations of each
  image instead of ``epochs`` independent ones. Ultralytics' ``multi_scale`` (refused) and
  augmentation that depends on the epoch (``close_mosaic``; off in the frozen stage anyway)
  are not reproduced. Under ``amp`` the cached features are float32 while the
  through-network stage would compute them in half precision.

Memory: the cache lives in RAM. YOLOv8n at 256 px: 709,632 bytes per image view for 6 classes
(``(c3 + 4·reg_max + 4) × anchors × 4`` with ``c3 = max(64, nc)``, 1,344 anchors: stems, DFL
logits and the decoded boxes), about 0.5 GB for lumbar6's 726 training slices. Faster R-CNN (mobilenet-v3 FPN, 256 px): ``(1024 + 4) × 4 + 8``
bytes per cached proposal, up to 2,000 proposals per image depending on the RPN's scores; an
untrained RPN kept ~1,180 per lumbar6 slice (4.6 MiB per image, 3.4 GB for the 726 slices). The
size is estimated from the first batch, before the rest is computed (Faster R-CNN's again as the
cache fills, its proposal count varying): above :func:`memory_limit`
(half the machine's memory, or ``$WELDE_CACHE_MAX_GB``) the run stops with a
:class:`~welde_det.engine.config.ConfigError` giving the estimate.

Cost: building the cache is one pass of the frozen network over the images — for Faster R-CNN
about twice a through-network epoch, as the box head runs on every proposal rather than on the
512 sampled per image — after which an epoch costs only the heads (``bench/bench_frozen.py``).
Runs in one process that share a frozen network, its training images and the cache settings
(a study's methods and seeds, all from one stage-1 model) build it once (:func:`remembered`:
keyed by a fingerprint of every frozen tensor, the images and the settings).

Not supported, each a :class:`~welde_det.engine.config.ConfigError` in
:func:`check_cache_config`: a plan without a frozen stage, more than one device (DDP), and
``cache_views > 0`` for Faster R-CNN (nothing to augment).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from welde_det.engine.config import ConfigError, ExperimentConfig

__all__ = ["check_cache_config", "files_fingerprint", "forget_cache", "frozen_fingerprint", "memory_limit",
           "refuse_over_limit", "remembered"]

logger = logging.getLogger(__name__)

#: environment variable overriding :func:`memory_limit` (gigabytes)
LIMIT_ENV = "WELDE_CACHE_MAX_GB"


def memory_limit() -> int:
    """Bytes the frozen-stage cache may take: ``$WELDE_CACHE_MAX_GB`` or half the machine's memory."""
    raw = os.environ.get(LIMIT_ENV)
    if raw:
        try:
            return int(float(raw) * 2**30)
        except ValueError as exc:
            raise ConfigError(f"${LIMIT_ENV}={raw!r} is not a number of gigabytes") from exc
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): as if the machine had 16 GiB
        total = 16 * 2**30
    return total // 2


def refuse_over_limit(per_view: float, views: int, what: str) -> None:
    """A :class:`ConfigError` with the estimate when ``per_view × views`` bytes exceed :func:`memory_limit`."""
    need, limit = per_view * views, memory_limit()
    if need > limit:
        raise ConfigError(
            f"train.cache_frozen: the {what} cache would take about {need / 2**30:.1f} GiB "
            f"({per_view / 2**20:.2f} MiB per image view × {views} views), over the limit of "
            f"{limit / 2**30:.1f} GiB (half the memory; ${LIMIT_ENV} sets it). Lower train.imgsz or "
            "train.cache_views, or set train.cache_frozen=false")


def check_cache_config(cfg: ExperimentConfig, framework: str) -> None:
    """Refuse settings the cached frozen stage cannot honour (called by the detection backends' ``check``)."""
    from welde_det.engine.stages import plan_stages

    t = cfg.train
    if t.cache_views < 0:
        raise ConfigError(f"train.cache_views={t.cache_views}: give 0 (one plain view per image) or a number "
                          "of augmented views")
    if not t.checkpoint_every_s >= 0:
        raise ConfigError(f"train.checkpoint_every_s={t.checkpoint_every_s}: give seconds ≥ 0 (0 = a checkpoint "
                          "every epoch)")
    if not t.cache_frozen:
        return
    if not any(s.frozen for s in plan_stages(cfg)):
        raise ConfigError("train.cache_frozen=true, but this run has no frozen stage (loss.mode=single without "
                          "train.freeze_backbone); set train.freeze_backbone=true or train.cache_frozen=false")
    devices = [d for d in t.device.split(",") if d.strip()]
    if len(devices) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"train.cache_frozen=true runs on one device; train.device={t.device!r} / "
                          "WORLD_SIZE asks for several. Use one device, or train.cache_frozen=false")
    if framework == "rcnn" and t.cache_views:
        raise ConfigError(f"train.cache_views={t.cache_views}: the rcnn backend does not augment, so one plain "
                          "view per image (cache_views=0) is already exact")


# ------------------------------------------------------------------ reuse within a process
#: the last cache built in this process, by key (one entry: a cache can take gigabytes)
_MEMO: dict[str, Any] = {}


def frozen_fingerprint(model: Any, trainable: Any) -> str:
    """SHA-1 of every state-dict entry of ``model`` whose name ``trainable(name)`` rejects: the frozen network,
    BatchNorm statistics included, to the bit."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        if trainable(name):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_fingerprint(paths: Any) -> str:
    """SHA-1 over the contents of the files, in order: the same images under other names (each run's own
    hard-linked or copied view of a source) give the same key, a changed image another."""
    h = hashlib.sha1()
    for p in paths:
        with open(p, "rb") as f:
            h.update(hashlib.sha1(f.read()).digest())
    return h.hexdigest()


def remembered(key_parts: Any, build: Callable[[], Any], what: str) -> Any:
    """The cache of ``key_parts`` built earlier in this process, or ``build()`` (which then replaces it).

    Runs that share a frozen network, its training images and the cache settings — the methods and seeds
    of a study, all starting their frozen stage from one stage-1 model in one process — compute the
    frozen outputs once. The key holds the frozen network's fingerprint (:func:`frozen_fingerprint`), the
    images (their contents) and labels, and every setting the views depend on (size, channels, bit
    depth, views, seed, augmentation). Only the last cache is kept; :func:`forget_cache` drops it.
    """
    key = hashlib.sha1(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()
    if key in _MEMO:
        logger.info("frozen-stage cache: reusing the %s cache built earlier in this process (same frozen network, "
                    "images and settings)", what)
        return _MEMO[key]
    _MEMO.clear()  # free the old one before the new one is filled
    cache = build()
    _MEMO[key] = cache
    return cache


def forget_cache() -> None:
    """Drop the cache kept for reuse (its memory is freed when nothing else holds it)."""
    _MEMO.clear()
