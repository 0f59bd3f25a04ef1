"""Ultralytics YOLO (8.4.x) with WELDE classification heads.

Only Ultralytics' public extension points are subclassed; importing this module changes
nothing global, and every class lives here so Ultralytics' DDP (which rebuilds the trainer
by import) and ``YOLO(path)`` (which unpickles the model) find them.

- :class:`WELDEDetect` — a ``Detect`` head whose classification branch ends in K heads
  (adapter + 1×1 classifier each, :class:`~welde_det.welde.WELDEHeads` with ``conv=True``)
  on the output of the branch's stem, beside the unchanged box branch. The original last
  1×1 classifier of each level is kept (so plain Ultralytics weights load) and copied into
  every head (all classifiers are linear with Ultralytics' prior bias; LDAM/LMF run on raw
  logits with ``s = 1``, which :func:`~welde_det.welde.build_spec` enforces for sigmoid
  heads, METHOD.md §2). ``preds["scores"]`` are the logits of the **fused** per-class
  probabilities (Σ_k ŵ_k σ(z_k)), so Ultralytics' own decoding, NMS, predictor and
  validator see the fused scores unchanged; ``preds["scores_heads"]`` holds the K logit
  tensors for the criterion. With K = 1 the scores are the single head's logits.
- :class:`WELDEDetectionModel` — a ``DetectionModel`` built from a YAML (``yolov8n.yaml``)
  whose last module is swapped for :class:`WELDEDetect`; ``init_criterion`` returns
  :class:`WELDEDetectionLoss`.
- :class:`WELDEDetectionLoss` — ``v8DetectionLoss`` keeping the box (CIoU) and DFL terms and
  the TaskAlignedAssigner; the classification BCE is replaced by the head's
  :class:`~welde_det.welde.WELDEObjective` over dense sigmoid losses on the assigner's
  soft targets, normalised by the sum of target scores as Ultralytics does.
- :class:`HighBitYOLODataset` — a ``YOLODataset`` that, for ``bit_depth=16``, reads
  16-bit slices without Ultralytics' squash to 8 bits and carries them through its
  augmentations as float32 (see the class docstring).
- :class:`WELDEDetectionTrainer` — a ``DetectionTrainer`` whose model is a
  :class:`WELDEDetectionModel`; ``welde_stage2=True`` freezes backbone, neck, box branch
  and classification stems, leaving adapters, heads and θ to train. It validates with
  welde_det's pycocotools-exact evaluator instead of Ultralytics' validator when the
  spec names a COCO validation split.

The WELDE objective (θ, EMA statistics) is a sub-module of the head, so the optimiser,
Ultralytics' model EMA and its checkpoints carry it. Fusion at inference reads the
``fusion_weight`` buffer, which the criterion refreshes every step (and Ultralytics' model
EMA averages like any float buffer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from welde_det.integrations.offline import offline_import

# Ultralytics resolves host names on import unless $YOLO_OFFLINE is set, and it and cv2 write
# into os.environ: imported offline, with the environment put back (integrations.offline)
with offline_import():
    import cv2
    from ultralytics.data.augment import Compose, Mosaic, RandomHSV
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import get_split_fraction
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import RANK, colorstr
    from ultralytics.utils.loss import v8DetectionLoss

from welde_det.losses import build_detection_sampler
from welde_det.losses.samplers import DETECTION_SAMPLERS
from welde_det.welde import WELDEHeads, WELDEObjective, WELDESpec, build_spec, fuse
from welde_det.welde.transfer import load_matching, loaded_heads

__all__ = [
    "HighBitMosaic",
    "HighBitYOLODataset",
    "WELDEDetect",
    "WELDEDetectionLoss",
    "WELDEDetectionModel",
    "WELDEDetectionTrainer",
    "predict_coco_yolo",
    "predict_yolo",
    "sampled_dataloader",
    "stage2_freeze_names",
    "trainer_spec",
    "yolo_image_classes",
]

logger = logging.getLogger(__name__)


class WELDEDetect(Detect):
    """Ultralytics ``Detect`` with K classification heads per level (see the module docstring).

    Build it from an existing head with :meth:`from_detect`.

    Shape:
        training: dict with ``boxes`` (B, 4·reg_max, A), ``scores`` (B, C, A) (fused logits,
        detached when K > 1), ``scores_heads`` K × (B, C, A), ``feats``.
    """

    @classmethod
    def from_detect(
        cls,
        detect: Detect,
        objective: WELDEObjective,
        components: Sequence[str],
        *,
        heads: Sequence[str] | None = None,
        hidden: int | None = None,
    ) -> WELDEDetect:
        """Keep ``detect``'s box branch and classification stems; add K heads per level.

        Raises:
            ValueError: an end-to-end or non-plain ``Detect`` head, or a head type other than
                ``"linear"`` (dense heads need Ultralytics' prior bias).
        """
        heads = tuple(heads or ("linear",) * len(components))
        if set(heads) != {"linear"} or len(heads) != len(components):
            raise ValueError(f"YOLO's dense heads are linear (they need the prior bias); got heads {list(heads)} "
                             f"for components {list(components)}")
        if getattr(detect, "one2one_cv2", None) is not None:
            raise ValueError("end-to-end (one-to-one) YOLO heads are not supported; use a yolov8/yolo11 model YAML")
        if type(detect) is not Detect and not isinstance(detect, WELDEDetect):
            raise ValueError(f"WELDE heads need a plain Detect head, got {type(detect).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in detect.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")})
        new._modules.update(detect._modules)
        new._buffers.update(detect._buffers)
        new._parameters.update(detect._parameters)
        c3 = detect.cv3[0][-1].in_channels
        levels = []
        for level in detect.cv3:
            # linear 1x1 classifiers for every component: dense heads need the prior bias
            # (99 % of anchors are background), so margin losses run on raw logits (s = 1)
            h = WELDEHeads(c3, detect.nc, components, hidden=hidden, conv=True, heads=heads)
            for clf in h.classifiers:
                if isinstance(clf, nn.Conv2d):
                    clf.load_state_dict(level[-1].state_dict())
            levels.append(h)
        new.welde_heads = nn.ModuleList(levels)
        new.objective = objective
        k = len(components)
        new.register_buffer("fusion_weight", torch.full((k,), 1.0 / k))
        new.components = tuple(components)
        return new

    @property
    def num_heads(self) -> int:
        """K."""
        return len(self.components)

    def copy_classifiers_from_stems(self) -> None:
        """Copy each level's original 1×1 classifier into every non-cosine head (after loading weights)."""
        with torch.no_grad():
            for level, heads in zip(self.cv3, self.welde_heads):
                for clf in heads.classifiers:
                    if isinstance(clf, nn.Conv2d):
                        clf.load_state_dict(level[-1].state_dict())

    def spread_first_head(self, jitter: float = 1e-2) -> None:
        """Start every head of every level as head 0 (:meth:`WELDEHeads.spread_first_head`)."""
        for level, heads in enumerate(self.welde_heads):
            heads.spread_first_head(jitter, seed=level)

    def bias_init(self) -> None:
        """Ultralytics' prior bias for the box and class convs, applied to every head too."""
        super().bias_init()
        for i, heads in enumerate(self.welde_heads):
            for clf in heads.classifiers:
                if isinstance(clf, nn.Conv2d):
                    clf.bias.data[:] = math.log(5 / self.nc / (640 / self.stride[i]) ** 2)

    def forward_head(self, x, box_head=None, cls_head=None):
        """Boxes as ``Detect`` does; K logit maps per level, concatenated per head, then fused."""
        if box_head is None or cls_head is None:
            return {}
        bs = x[0].shape[0]
        boxes = torch.cat([box_head[i](x[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], dim=-1)
        return {"boxes": boxes, **self.class_scores([cls_head[i][:-1](x[i]) for i in range(self.nl)]), "feats": x}

    def class_scores(self, stems: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The K heads on each level's classification stem (B, c3, h, w): ``scores_heads`` K × (B, C, A) and
        the fused ``scores`` (B, C, A) (detached when K > 1; one head's own logits when K = 1).

        The (B, C, A) tensors are transposed views of (B, A, C) memory — the layout the loss reads
        (``permute(0, 2, 1)``), so it takes them without a copy; the heads emit channels-last maps
        (:class:`~welde_det.welde.WELDEHeads`), so each head's levels are joined by one copy.
        """
        bs = stems[0].shape[0]
        per_head: list[list[torch.Tensor]] = [[] for _ in range(self.num_heads)]
        for i in range(self.nl):
            for k, z in enumerate(self.welde_heads[i](stems[i])):
                per_head[k].append(z.reshape(bs, self.nc, -1).transpose(1, 2))  # (B, h·w, C)
        rows = [torch.cat(p, dim=1) for p in per_head]  # K × (B, A, C)
        heads = [r.transpose(1, 2) for r in rows]
        if self.num_heads == 1:
            return {"scores": heads[0], "scores_heads": heads}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.training):
            p = fuse(rows, self.fusion_weight, activation="sigmoid", dim=2)
            scores = torch.logit(p.clamp(1e-12, 1 - 1e-7)).to(rows[0].dtype).transpose(1, 2)
        return {"scores": scores, "scores_heads": heads}


class WELDEDetectionModel(DetectionModel):
    """A YOLO detection model whose head is :class:`WELDEDetect`.

    Args:
        cfg: model YAML (``"yolov8n.yaml"``) or dict.
        ch: input channels (1 for grayscale slices).
        nc: number of classes.
        class_counts: training instances per class (``ClassStats.effective_counts``; None
            only when no component weights by counts).
        components, mode, activation, heads, loss_params, objective_kw, hidden: a
            :class:`~welde_det.welde.WELDESpec`'s ``model_kwargs()`` (checked by
            :func:`~welde_det.welde.build_spec`; ``activation`` must be ``"sigmoid"``, every
            head linear with s = 1).
        verbose: print the model summary.

    Attributes:
        welde_spec: the spec as a plain dict (``WELDESpec.to_dict()`` plus ``class_counts``):
            Ultralytics pickles the model, and plain values load with ``weights_only=True``.

    Example:
        >>> spec = build_spec(components=("ce", "focal", "cb", "ldam"), mode="welde", activation="sigmoid")
        >>> m = WELDEDetectionModel("yolov8n.yaml", nc=6, class_counts=[5] * 6,
        ...                         **spec.model_kwargs())  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: str | dict = "yolov8n.yaml",
        ch: int = 3,
        nc: int | None = None,
        *,
        class_counts: Sequence[int | float] | None = None,
        components: Sequence[str] = ("ce",),
        mode: str = "single",
        activation: str = "sigmoid",
        heads: Sequence[str] | None = None,
        loss_params: Mapping[str, Mapping[str, Any]] | None = None,
        objective_kw: Mapping[str, Any] | None = None,
        hidden: int | None = None,
        verbose: bool = False,
    ) -> None:
        spec = build_spec(components=components, mode=mode, activation=activation, head=heads or "auto",
                          loss_params=loss_params, objective_kw=objective_kw, hidden=hidden)
        if spec.activation != "sigmoid":
            raise ValueError(f"YOLO's classification branch is dense sigmoid (one-vs-all per anchor); the WELDE spec "
                             f"says activation={spec.activation!r}; build the spec with activation='sigmoid'")
        super().__init__(cfg, ch=ch, nc=nc, verbose=verbose)
        detect = self.model[-1]
        counts = [float(c) for c in class_counts] if class_counts is not None else None
        if counts is not None and len(counts) != detect.nc:
            raise ValueError(f"{len(counts)} class counts for a model with nc={detect.nc}")
        head = WELDEDetect.from_detect(detect, spec.build_objective(counts), spec.components, heads=spec.heads,
                                       hidden=spec.hidden)
        head.bias_init()
        self.model[-1] = head
        self.welde_spec = {**spec.to_dict(), "class_counts": counts}

    @property
    def head(self) -> WELDEDetect:
        """The WELDE detection head."""
        return self.model[-1]

    def init_criterion(self) -> WELDEDetectionLoss:
        return WELDEDetectionLoss(self)

    def load(self, weights, verbose: bool = True):
        """Load matching weights (Ultralytics ``DetectionModel.load``) but keep this model's loss buffers.

        The component losses' per-class buffers (counts, weights, margins) come from this
        model's own class counts: checkpoints store them in float16. The objective's state
        (θ, EMA, step counter) is taken only from a model with the same components and
        mode (Ultralytics' resume), never from a stage-1 model. When ``weights`` is a
        plain Ultralytics model (no K heads), its classifiers are copied into the heads;
        when it is a K = 1 welde_det model (stage 1), its head starts every head
        (:meth:`WELDEDetect.spread_first_head`).
        """
        model = weights["model"] if isinstance(weights, dict) else weights
        csd = model.float().state_dict()
        # θ, EMA statistics and the step counter continue only in the same objective (a resume);
        # a stage-1 model's counter would otherwise skip the warm-up and break bias correction
        spec = getattr(model, "welde_spec", {})
        same = (spec.get("components"), spec.get("mode")) == (self.welde_spec["components"], self.welde_spec["mode"])
        keep = load_matching(self, csd, lambda k: ".objective.losses." not in k and (same or ".objective." not in k))
        src_heads = loaded_heads(keep, ".welde_heads.")
        if not src_heads:
            self.head.copy_classifiers_from_stems()
        elif src_heads == {0} and self.head.num_heads > 1:
            self.head.spread_first_head()
        if verbose:
            logger.info("transferred %d/%d items from pretrained weights", len(keep), len(self.state_dict()))


class _RecordingAssigner(nn.Module):
    """Wraps Ultralytics' TaskAlignedAssigner and keeps its last soft targets for the criterion."""

    def __init__(self, assigner: nn.Module) -> None:
        super().__init__()
        self.inner = assigner
        self.last: tuple[torch.Tensor, ...] | None = None

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.last = out
        return out


class WELDEDetectionLoss(v8DetectionLoss):
    """Ultralytics' detection loss with the classification BCE replaced by the head's objective.

    Box (CIoU) and DFL terms, the gains ``box``/``cls``/``dfl`` and the assignment are
    Ultralytics' own; the classification term is ``objective(K logits, target_scores,
    normalizer=Σ target_scores)["loss"] · cls``. The detached WELDE terms of the last step
    are in :attr:`last_terms`.

    Ultralytics' ``cls_pw`` class weights (``model.class_weights``, set by its trainer from
    the training labels: (1/n_c)^cls_pw, mean 1) multiply each class column of the BCE, as in
    ``v8DetectionLoss``, for one plain ``ce`` head (mode ``single``) — the only case where
    they have a meaning.

    Raises:
        ValueError: class weights on a model whose objective is not one plain ``ce`` loss.
    """

    def __init__(self, model: WELDEDetectionModel, tal_topk: int = 10, tal_topk2: int | None = None) -> None:
        super().__init__(model, tal_topk, tal_topk2)
        self.head = model.model[-1]
        self.assigner = _RecordingAssigner(self.assigner)
        self.last_terms: dict[str, torch.Tensor] = {}
        self._pred_bboxes: torch.Tensor | None = None
        spec = model.welde_spec
        if self.class_weights is not None and (spec["mode"], list(spec["components"])) != ("single", ["ce"]):
            raise ValueError(
                f"cls_pw={getattr(self.hyp, 'cls_pw', '?')}: Ultralytics' class weights weight the plain BCE of one "
                f"'ce' head; they have no meaning for mode {spec['mode']!r} with components {list(spec['components'])}"
                ". Set cls_pw=0, or use a class-weighted loss component ('wce', 'cb') instead")

    def bbox_decode(self, anchor_points: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """Ultralytics' decoding, or the predictions' ``pred_bboxes`` when they carry them (the cached frozen
        stage: its box branch is frozen, so the cache decodes once what this would decode every batch)."""
        given = self._pred_bboxes
        if given is None:
            return super().bbox_decode(anchor_points, pred_dist)
        if given.shape != (*pred_dist.shape[:2], 4):
            raise ValueError(f"pred_bboxes of shape {tuple(given.shape)} for DFL logits of shape "
                             f"{tuple(pred_dist.shape)}: expected {(*pred_dist.shape[:2], 4)}")
        return given.to(pred_dist.dtype)

    def get_assigned_targets_and_loss(self, preds, batch, **assign_kwargs):
        self._pred_bboxes = preds.get("pred_bboxes")
        try:
            assigned, loss, _ = super().get_assigned_targets_and_loss(preds, batch, **assign_kwargs)
        finally:
            self._pred_bboxes = None
        target_scores = self.assigner.last[2]
        target_scores_sum = target_scores.sum().clamp_(min=1)
        nc = self.nc
        logits = [z.permute(0, 2, 1).reshape(-1, nc) for z in preds["scores_heads"]]
        objective = self.head.objective
        weights = {"class_weight": self.class_weights.reshape(-1)} if self.class_weights is not None else {}
        out = objective(logits, target_scores.reshape(-1, nc).to(logits[0].dtype), normalizer=target_scores_sum,
                        **weights)
        if objective.training:
            with torch.no_grad():
                self.head.fusion_weight.copy_(objective.fusion_weights())
        self.last_terms = {k: v for k, v in out.items() if k != "loss"}
        loss = torch.stack([loss[0], out["loss"].to(loss.dtype) * self.hyp.cls, loss[2]])
        return assigned, loss, dict(zip(self.loss_names, loss.detach()))


def stage2_freeze_names(model: DetectionModel) -> list[int | str]:
    """Ultralytics ``freeze=`` entries that leave only the K heads and θ trainable.

    Every module but the head, then the head's box branch, its DFL and each level's
    classification stem and original classifier.
    """
    n = len(model.model)
    head = model.model[-1]
    names: list[int | str] = list(range(n - 1))
    names += [f"{n - 1}.cv2", f"{n - 1}.dfl"]
    for i in range(len(head.cv3)):
        names.append(f"{n - 1}.cv3.{i}")
    return names


#: Ultralytics' grey padding value, on its 0-255 scale.
LETTERBOX_FILL = 114


class HighBitMosaic(Mosaic):
    """Ultralytics' 2x2 ``Mosaic`` on a canvas of the tiles' own dtype.

    Ultralytics builds the mosaic canvas as ``uint8``, which would truncate the float32
    tiles of :class:`HighBitYOLODataset`; 8-bit tiles go through the parent unchanged.
    """

    def apply_image(self, labels: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        img = labels["img"]
        if img.dtype == np.uint8:
            return super().apply_image(labels, params)
        if self.n != 4:
            raise ValueError(f"16-bit training supports the 2x2 mosaic only, got n={self.n}")
        canvas = np.full((2 * self.imgsz, 2 * self.imgsz, img.shape[2]), LETTERBOX_FILL, dtype=img.dtype)
        for tile in params["layout"]:
            src = tile["labels_patch"]["img"]
            canvas[tile["y1a"]:tile["y2a"], tile["x1a"]:tile["x2a"]] = src[tile["y1b"]:tile["y2b"],
                                                                             tile["x1b"]:tile["x2b"]]
        labels["img"] = canvas
        return labels


class HighBitYOLODataset(YOLODataset):
    """``YOLODataset`` that keeps 16-bit slices 16-bit (``bit_depth=16``).

    Ultralytics reads every image as 8 bits (a 16-bit PNG keeps only its high byte). With
    ``bit_depth=16`` this dataset reads the file's own depth, stores it so in its cache,
    and hands the augmentations a float32 image on Ultralytics' 0-255 scale
    (``uint16 · 255 / 65535``, 8-bit files as they are): letterbox, random affine, flips
    and :class:`HighBitMosaic` keep the fractional values, and the trainer's ``/ 255``
    then gives ``uint16 / 65535`` — what :func:`predict_yolo` feeds the model at
    inference. Ultralytics' HSV jitter (an 8-bit lookup table) is left out of the
    pipeline, and ``mixup``/``cutmix`` (which cast their blend to ``uint8``) are refused.

    Args:
        *args, **kwargs: ``YOLODataset``'s.
        bit_depth: 8 (Ultralytics' behaviour, unchanged) or 16.
    """

    def __init__(self, *args: Any, bit_depth: int = 8, **kwargs: Any) -> None:
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
        self.bit_depth = bit_depth
        super().__init__(*args, **kwargs)

    @property
    def cv2_flag(self) -> int:
        """Ultralytics' read flag, with ``IMREAD_ANYDEPTH`` for 16-bit data."""
        return self._cv2_flag | (cv2.IMREAD_ANYDEPTH if self.bit_depth == 16 else 0)

    @cv2_flag.setter
    def cv2_flag(self, value: int) -> None:
        self._cv2_flag = value

    def load_image(self, i: int, rect_mode: bool = True, **kwargs: Any):
        """Ultralytics' ``load_image`` (resize, cache buffer), then float32 on the 0-255 scale for 16-bit data."""
        im, hw0, hw = super().load_image(i, rect_mode, **kwargs)
        if self.bit_depth == 16:
            im = im.astype(np.float32) * np.float32(255.0 / 65535.0) if im.dtype == np.uint16 else im.astype(np.float32)
        return im, hw0, hw

    def build_transforms(self, hyp=None) -> Compose:
        """Ultralytics' transforms; for 16-bit data :class:`HighBitMosaic` and no HSV jitter.

        Raises:
            ValueError: ``mixup`` or ``cutmix`` asked for with 16-bit data.
        """
        transforms = super().build_transforms(hyp)
        if self.bit_depth == 16:
            if self.augment and (getattr(hyp, "mixup", 0) > 0 or getattr(hyp, "cutmix", 0) > 0):
                raise ValueError(f"bit_depth=16: Ultralytics' mixup ({hyp.mixup}) and cutmix ({hyp.cutmix}) cast "
                                 "images to 8 bits; set mixup=0 and cutmix=0 to train on 16-bit slices")
            _replace_mosaic(transforms)
            transforms.transforms = [t for t in transforms.transforms if not isinstance(t, RandomHSV)]
        return transforms


def _replace_mosaic(compose: Compose) -> None:
    """Swap every ``Mosaic`` in a (nested) ``Compose`` for a :class:`HighBitMosaic` with its settings."""
    for i, t in enumerate(compose.transforms):
        if isinstance(t, Compose):
            _replace_mosaic(t)
        elif type(t) is Mosaic:
            compose.transforms[i] = HighBitMosaic(t.dataset, imgsz=t.imgsz, p=t.p, n=t.n)


SPEC_ENV = "WELDE_DET_YOLO_SPEC"
WELDE_META_NAME = "welde_det.json"  # the trainer's metadata, written beside last.pt / best.pt


def trainer_spec() -> dict[str, Any]:
    """The WELDE settings of the trainer of this process (JSON in ``$WELDE_DET_YOLO_SPEC``).

    Ultralytics checks its ``overrides`` against its own argument list and its DDP launcher
    rebuilds the trainer in new processes from those arguments alone, so the model/loss
    settings travel in the environment, which the DDP workers inherit.

    Keys read by :class:`WELDEDetectionTrainer`: ``welde`` (``WELDESpec.to_dict()``, ``cls_pw`` included),
    ``class_counts``, ``sampler`` (None, ``"none"`` or ``"repeat_factor"``),
    ``repeat_threshold`` (t, default 0.1), ``stage2``/``freeze``, ``val_coco``/``val_images``,
    ``class_stats``, ``config``, ``conf``, ``bit_depth``, ``init_weights``.
    """
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"{SPEC_ENV} is not set: start YOLO training through welde_det.engine.run "
                           "(python tools/train.py --config configs/yolo_welde.yaml)")
    return json.loads(raw)


class WELDEDetectionTrainer(DetectionTrainer):
    """Ultralytics ``DetectionTrainer`` for :class:`WELDEDetectionModel`.

    Settings (components, class counts, objective, stage, evaluation split) come from
    :func:`trainer_spec`. Differences from the parent:

    - ``get_model`` builds a :class:`WELDEDetectionModel`; in stage 2 (``spec["stage2"]``)
      ``freeze`` is set to :func:`stage2_freeze_names`, so only adapters, heads and θ train
      (Ultralytics also keeps the frozen layers' BatchNorm statistics fixed);
    - θ gets its own optimiser group without weight decay;
    - Ultralytics' ``cls_pw`` is the spec's (``welde["cls_pw"]``; a different ``cls_pw`` in the
      overrides is an error), honoured by :class:`WELDEDetectionLoss`;
    - ``get_dataloader`` draws training images with the spec's ``sampler``
      (``"repeat_factor"``: :class:`~welde_det.losses.samplers.RepeatFactorSampler` over the
      dataset's labels, threshold ``repeat_threshold``, seeded by ``seed``; sharded under DDP)
      in Ultralytics' own ``InfiniteDataLoader``. Mosaic's three extra tiles stay uniform;
    - ``validate`` evaluates the EMA model with welde_det's pycocotools-exact evaluator on
      the COCO validation split (fitness = mAP@[.5:.95]) instead of Ultralytics' validator,
      and ``final_eval`` leaves the final report to the runner;
    - checkpoints are written atomically, with ``weights/welde_det.json`` (framework,
      ClassStats, resolved config, spec) beside them, so ``YOLO(path)`` and
      :func:`welde_det.integrations.registry.load_detector` (after conversion to the one schema) reload them;
    - every step's WELDE terms are averaged per epoch into ``terms.csv`` and written to
      TensorBoard (when installed) under the run folder.
    """

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        from ultralytics.cfg import DEFAULT_CFG

        from welde_det.integrations.offline import offline_worker

        offline_worker()  # a DDP worker of an offline parent stays offline (its own settings, its own process)
        self.welde_spec = trainer_spec()
        if "welde" not in self.welde_spec:
            raise ValueError(f"${SPEC_ENV} has no 'welde' entry (a WELDESpec.to_dict()); keys found: "
                             f"{sorted(self.welde_spec)}")
        self.welde = WELDESpec.from_dict(self.welde_spec["welde"])
        self.sampler_name = self.welde_spec.get("sampler")
        self.repeat_threshold = float(self.welde_spec.get("repeat_threshold", 0.1))
        if self.sampler_name not in (None, *DETECTION_SAMPLERS):
            raise ValueError(f"sampler {self.sampler_name!r} in ${SPEC_ENV} is not a detection sampler; choose one "
                             f"of {list(DETECTION_SAMPLERS)} (or None)")
        overrides = dict(overrides or {})
        if float(overrides.get("cls_pw", self.welde.cls_pw)) != self.welde.cls_pw:
            raise ValueError(f"cls_pw={overrides['cls_pw']} in Ultralytics' arguments but {self.welde.cls_pw} in the "
                             "WELDE spec: set it once, in the spec (loss.cls_pw)")
        overrides["cls_pw"] = self.welde.cls_pw
        if self.welde_spec.get("stage2") and not overrides.get("resume"):
            overrides["freeze"] = self.welde_spec["freeze"]
        super().__init__(cfg or DEFAULT_CFG, overrides, _callbacks)
        self._term_sums: dict[str, float] = {}
        self._term_steps = 0
        self._tb = None
        self._welde_meta_written = False  # weights/welde_det.json, once per trainer
        self._int_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._int_pairs_ema: nn.Module | None = None  # the EMA model they were found in
        # Ultralytics' DDP workers rebuild the trainer with the parent's callbacks, ours among them
        for event, fn in (("on_train_start", _on_train_start), ("on_train_epoch_start", _on_epoch_start),
                          ("on_train_batch_end", _on_batch_end), ("on_train_epoch_end", _on_epoch_end)):
            if fn not in self.callbacks[event]:
                self.add_callback(event, fn)

    def get_dataset(self):
        """The data YAML welde_det wrote (``datasets.resolve.yolo_view``), read without network.

        Ultralytics' ``check_det_dataset`` ends with ``check_font``, a HEAD request to GitHub
        for ``Arial.ttf`` whenever the font is not in its config folder (even with
        ``$YOLO_OFFLINE``); the font only serves plots, which welde_det does not draw. The
        same keys are checked and resolved here; anything but a local YAML is refused.
        """
        from ultralytics.data.utils import check_class_names
        from ultralytics.utils import YAML

        path = Path(str(self.args.data))
        if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
            raise FileNotFoundError(f"{path}: welde_det trains from a local data YAML (built by the run in its data/ "
                                    "folder); no dataset is downloaded")
        data = YAML.load(path, append_filename=True)
        for key in ("train", "val"):
            if not data.get(key):
                raise ValueError(f"{path}: no {key!r} entry; a YOLO data YAML needs train and val")
        if data.get("names") is None:
            raise ValueError(f"{path}: no 'names' entry")
        data["names"] = check_class_names(data["names"])
        data["nc"] = len(data["names"])
        data["channels"] = int(data.get("channels", 3))
        root = Path(data.get("path") or path.parent)
        if not root.is_absolute():
            root = (path.parent / root).resolve()
        data["path"] = root
        for key in ("train", "val", "test"):
            if data.get(key):
                entries = data[key] if isinstance(data[key], list) else [data[key]]
                resolved = [str((root / e).resolve()) for e in entries]
                missing = [e for e in resolved if not Path(e).exists()]
                if missing:
                    raise FileNotFoundError(f"{path}: {key} images not found: {missing[0]}")
                data[key] = resolved if isinstance(data[key], list) else resolved[0]
        if self.args.single_cls:
            data["names"], data["nc"] = {0: "item"}, 1
        return data

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        spec = self.welde_spec
        model = WELDEDetectionModel(cfg, ch=self.data["channels"], nc=self.data["nc"],
                                    class_counts=spec["class_counts"], verbose=False, **self.welde.model_kwargs())
        model = self.set_model_names_for_load(model)
        if weights is None and spec.get("init_weights") and not self.args.resume:
            # the previous stage / model.weights, read with weights_only=True (never Ultralytics' loader)
            weights = load_init_model(spec["init_weights"])
        if weights:
            model.load(weights, verbose=verbose)
        return model

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        """Ultralytics' dataset, or a :class:`HighBitYOLODataset` when the spec asks for 16-bit input."""
        bit_depth = int(self.welde_spec.get("bit_depth", 8))
        if bit_depth == 8:
            return super().build_dataset(img_path, mode, batch)
        gs = max(int(_core(self.model).stride.max()), 32)
        return HighBitYOLODataset(
            img_path=img_path, imgsz=self.args.imgsz, batch_size=batch, augment=mode == "train", hyp=self.args,
            rect=self.args.rect or mode == "val", cache=self.args.cache or None, single_cls=bool(self.args.single_cls),
            stride=gs, pad=0.0 if mode == "train" else 0.5, prefix=colorstr(f"{mode}: "), task=self.args.task,
            classes=self.args.classes, data=self.data,
            fraction=get_split_fraction(self.args.fraction, "train" if mode == "train" else self.args.split),
            bit_depth=bit_depth)

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """Ultralytics' loader, or for training with ``sampler="repeat_factor"`` one drawing repeat factors.

        Raises:
            ValueError: ``rect`` training (batches ordered by aspect ratio) with a sampler.
        """
        if mode != "train" or self.sampler_name in (None, "none"):
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        from ultralytics.utils.torch_utils import torch_distributed_zero_first

        with torch_distributed_zero_first(rank):  # the label cache is written once under DDP
            dataset = self.build_dataset(dataset_path, mode, batch_size)
        if getattr(dataset, "rect", False):
            raise ValueError(f"rect=True orders training batches by aspect ratio; it cannot be combined with "
                             f"sampler={self.sampler_name!r}")
        world, global_rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        sampler = build_detection_sampler(self.sampler_name, yolo_image_classes(dataset),
                                          threshold=self.repeat_threshold, seed=int(self.args.seed),
                                          num_replicas=world, rank=global_rank)
        return sampled_dataloader(dataset, sampler, batch=batch_size, workers=self.args.workers, device=self.device,
                                  seed=int(self.args.seed), drop_last=bool(self.args.compile))

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimiser, with θ in a group of its own without weight decay."""
        opt = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        theta = {id(p) for n, p in model.named_parameters() if n.endswith("objective.theta")}
        moved = []
        for group in opt.param_groups:
            moved += [p for p in group["params"] if id(p) in theta]
            group["params"] = [p for p in group["params"] if id(p) not in theta]
        if moved:
            base = opt.param_groups[0]
            opt.add_param_group({**{k: v for k, v in base.items() if k != "params"},
                                 "params": moved, "weight_decay": 0.0, "param_group": "welde"})
        return opt

    def optimizer_step(self):
        """Ultralytics' step; then the integer WELDE buffers (step counter) follow into the model EMA."""
        super().optimizer_step()
        if self.ema:
            for dst, src in self._integer_buffer_pairs():
                dst.copy_(src)

    def _integer_buffer_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(EMA buffer, model buffer) for every integer buffer, found once per EMA model (buffers are updated in
        place; Ultralytics builds a new ``ModelEMA`` only when it recovers from a NaN)."""
        ema = self.ema.ema
        if self._int_pairs_ema is not ema:
            src = dict(_core(self.model).named_buffers())
            self._int_pairs = [(buf, src[name]) for name, buf in ema.named_buffers()
                               if not buf.dtype.is_floating_point and name in src]
            self._int_pairs_ema = ema
        return self._int_pairs

    def validate(self):
        """COCO-exact mAP of the EMA model on the validation split (Ultralytics' contract)."""
        spec = self.welde_spec
        if RANK not in {-1, 0}:
            return super().validate()
        if not spec.get("val_coco"):
            # train.select=last: no split is measured while training; the last epoch is the model
            return {}, float(self.epoch)
        from welde_det.classes import ClassStats
        from welde_det.evaluation import evaluate_coco

        model = self.ema.ema if self.ema else _core(self.model)
        stats = ClassStats.from_dict(spec["class_stats"])
        dets = predict_coco_yolo(model, spec["val_coco"], spec["val_images"], stats, imgsz=self.args.imgsz,
                                 channels=self.data["channels"], conf=spec.get("conf", 0.001))
        res = evaluate_coco(spec["val_coco"], dets, class_stats=stats, device="cpu")
        fitness = float(res["stats"][0])
        map_tail = float(res["map_tail"]) if res["map_tail"] == res["map_tail"] else 0.0
        metrics = {"metrics/mAP50-95(W)": fitness, "metrics/mAP50(W)": float(res["stats"][1]),
                   "metrics/mAP_tail(W)": map_tail}
        if self.best_fitness is None or self.best_fitness < fitness:
            self.best_fitness = fitness
        return metrics, fitness

    def final_eval(self):
        """The runner writes the final report with welde_det's evaluator."""

    def save_model(self):
        """Ultralytics' checkpoints written atomically, with ``weights/welde_det.json`` beside them.

        The metadata (framework, ClassStats, resolved config, spec) does not change during a
        stage, so it is written once per trainer as a sidecar rather than added to every
        checkpoint: adding it meant re-reading and re-writing ``last.pt`` / ``best.pt`` every
        epoch, which was half the checkpoint cost of a cached frozen-stage epoch.

        Ultralytics records the git repository of the working directory in every checkpoint
        (its absolute path, branch, commit, last commit message and remote); that describes the
        user's machine and project, not the model, and a commit message can carry anything, so
        those fields are written empty (:func:`_no_git_metadata`).
        """
        last, best = self.last, self.best
        tmp_last, tmp_best = last.with_name(f".{last.name}.tmp"), best.with_name(f".{best.name}.tmp")
        self.last, self.best = tmp_last, tmp_best
        try:
            with _no_git_metadata():
                ok = super().save_model()
        finally:
            self.last, self.best = last, best
        if not self._welde_meta_written:
            from welde_det.utils.fileio import atomic_write_json

            meta = {k: self.welde_spec[k] for k in ("class_stats", "config") if k in self.welde_spec}
            meta.update(components=list(self.welde.components), mode=self.welde.mode, welde=self.welde.to_dict())
            meta["framework"] = "yolo"
            atomic_write_json(Path(self.wdir) / WELDE_META_NAME, meta)
            self._welde_meta_written = True
        for tmp, final in ((tmp_last, last), (tmp_best, best)):
            if tmp.exists():
                os.replace(tmp, final)
        return ok


class _NoGit:
    """Stands in for Ultralytics' ``GIT`` (the working directory's repository) while a checkpoint is written."""

    root = branch = commit = message = origin = None
    is_repo = False


@contextlib.contextmanager
def _no_git_metadata():
    """Ultralytics' trainer sees no git repository inside the block, so its checkpoint's ``git`` entry is empty."""
    import ultralytics.engine.trainer as trainer_module

    if "GIT" not in trainer_module.__dict__:  # an Ultralytics that records no repository
        yield
        return
    saved = trainer_module.GIT
    trainer_module.GIT = _NoGit
    try:
        yield
    finally:
        trainer_module.GIT = saved


def yolo_image_classes(dataset: YOLODataset) -> list[list[int]]:
    """Per image, in dataset order, the class indices of its boxes (Ultralytics' ``labels[i]["cls"]``)."""
    return [np.asarray(lb["cls"]).reshape(-1).astype(np.int64).tolist() for lb in dataset.labels]


def sampled_dataloader(dataset: Any, sampler: Any, *, batch: int, workers: int, device: Any, seed: int = 0,
                       drop_last: bool = False) -> Any:
    """Ultralytics' ``InfiniteDataLoader`` over ``dataset`` in the order of ``sampler``.

    The settings follow ``ultralytics.data.build.build_dataloader`` (workers per device, worker
    seeding, pinned memory on accelerators, the dataset's collate function); only the sampler
    is ours, which that function does not take.
    """
    from ultralytics.data.build import InfiniteDataLoader, seed_worker

    batch = max(1, min(batch, len(sampler)))
    device_type = getattr(device, "type", str(device).split(":")[0])
    nd = torch.cuda.device_count() if device_type == "cuda" else 0
    batches = math.ceil(len(sampler) / batch)
    nw = min((os.cpu_count() or 1) // max(nd, 1), workers, 0 if batches <= 1 else batches)
    generator = torch.Generator()
    generator.manual_seed((6148914691236517205 + RANK + seed) % (1 << 64))
    return InfiniteDataLoader(dataset=dataset, batch_size=batch, shuffle=False, num_workers=nw, sampler=sampler,
                              prefetch_factor=4 if nw > 0 else None, pin_memory=nd > 0,
                              collate_fn=getattr(dataset, "collate_fn", None), worker_init_fn=seed_worker,
                              generator=generator, drop_last=drop_last)


def _on_epoch_start(trainer: WELDEDetectionTrainer) -> None:
    _core(trainer.model).model[-1].objective.set_epoch(trainer.epoch)
    trainer._term_sums, trainer._term_steps = {}, 0


def _on_batch_end(trainer: WELDEDetectionTrainer) -> None:
    crit = getattr(_core(trainer.model), "criterion", None)
    terms = getattr(crit, "last_terms", None)
    if not terms or RANK not in {-1, 0}:
        return
    values = {k: float(v) for k, v in terms.items()}
    for k, v in values.items():
        trainer._term_sums[k] = trainer._term_sums.get(k, 0.0) + v
    trainer._term_steps += 1
    if trainer._tb is None:
        trainer._tb = _TermsBoard.open(trainer.save_dir / "tensorboard") or False
    if trainer._tb:
        trainer._tb.write(values, int(_core(trainer.model).model[-1].objective.num_steps))


class _TermsBoard:
    """The WELDE terms of every step as TensorBoard scalars ``welde/<term>``, one event per step.

    One event holding every term rather than ``SummaryWriter.add_scalar`` per term (an event
    each): 0.3 ms a step instead of 2 ms for the ~20 terms of four heads, which mattered for
    the cached frozen stage's 40 ms steps. TensorBoard reads the scalars the same way.
    """

    def __init__(self, writer: Any, summary: Any) -> None:
        self._writer, self._summary = writer, summary

    @classmethod
    def open(cls, folder: Path) -> _TermsBoard | None:
        """A writer into ``folder``; None when TensorBoard (optional) is not installed."""
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard.writer import FileWriter
        except ImportError:
            return None
        return cls(FileWriter(str(folder)), Summary)

    def write(self, values: Mapping[str, float], step: int) -> None:
        value = [self._summary.Value(tag=f"welde/{k}", simple_value=float(v)) for k, v in values.items()]
        self._writer.add_summary(self._summary(value=value), step)

    def flush(self) -> None:
        self._writer.flush()


def _on_train_start(trainer: WELDEDetectionTrainer) -> None:
    """On a resume, drop the ``terms.csv`` rows of the epochs the checkpoint does not hold (they are redone)."""
    path = trainer.save_dir / "terms.csv"
    if RANK not in {-1, 0} or not trainer.start_epoch:
        return
    from welde_det.utils.fileio import read_csv_rows, write_csv_rows

    rows = read_csv_rows(path)
    keep = [r for r in rows if int(r["epoch"]) < trainer.start_epoch]
    if len(keep) < len(rows):
        write_csv_rows(path, keep, fieldnames=list(rows[0]))


def _on_epoch_end(trainer: WELDEDetectionTrainer) -> None:
    if RANK not in {-1, 0} or not trainer._term_steps:
        return
    from welde_det.utils.fileio import append_csv_row

    row = {"epoch": trainer.epoch, "stage": 2 if trainer.welde_spec.get("stage2") else 1,
           **{k: v / trainer._term_steps for k, v in trainer._term_sums.items()}}
    append_csv_row(trainer.save_dir / "terms.csv", row)
    if trainer._tb:
        trainer._tb.flush()


def _core(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def letterbox(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A 2D slice scaled to [0, 1] (uint16 by 65535, uint8 by 255: 16-bit input is not squashed to 8 bits)
    and letterboxed to ``imgsz`` as Ultralytics' validator does (grey 114 padding, centred); returns it and
    the slice's (h, w)."""
    import cv2

    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., 0]
    scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    x = img.astype(np.float32) / scale
    h, w = x.shape
    r = min(imgsz / h, imgsz / w)
    nh, nw = round(h * r), round(w * r)
    resized = cv2.resize(x, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else x
    canvas = np.full((imgsz, imgsz), 114 / 255, dtype=np.float32)
    top, left = (imgsz - nh) // 2, (imgsz - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    return canvas, (h, w)


@torch.no_grad()
def predict_yolo_batch(model: nn.Module, images: Sequence[np.ndarray], *, imgsz: int, channels: int,
                       conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[torch.Tensor]:
    """Detections (n, 6: x1, y1, x2, y2, score, class index) per 2D slice, in each slice's own pixels.

    Every slice is letterboxed (:func:`letterbox`), given 1 or 3 channels, and the batch goes
    through the model (whose head fuses the K heads) in one forward pass and Ultralytics' own
    NMS; boxes are mapped back with ``scale_boxes``.
    """
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    if not len(images):
        return []
    boxed = [letterbox(im, imgsz) for im in images]
    p = next(model.parameters())
    t = torch.from_numpy(np.stack([b for b, _ in boxed]))[:, None].to(p.device, p.dtype)
    if channels == 3:
        t = t.expand(-1, 3, -1, -1)
    was_training = model.training
    model.eval()
    out = model(t)
    model.train(was_training)
    dets = non_max_suppression(out[0] if isinstance(out, (tuple, list)) else out, conf, iou, max_det=max_det)
    for det, (_, shape) in zip(dets, boxed):
        det[:, :4] = scale_boxes((imgsz, imgsz), det[:, :4], shape)
    return [det.float().cpu() for det in dets]


def predict_yolo(model: nn.Module, image: np.ndarray, *, imgsz: int, channels: int, conf: float = 0.25,
                 iou: float = 0.7, max_det: int = 300) -> torch.Tensor:
    """:func:`predict_yolo_batch` of one slice."""
    return predict_yolo_batch(model, [image], imgsz=imgsz, channels=channels, conf=conf, iou=iou,
                              max_det=max_det)[0]


def predict_coco_yolo(model: nn.Module, coco: Any, image_root: Any, stats: Any, *, imgsz: int, channels: int,
                      conf: float = 0.001) -> list[dict[str, Any]]:
    """COCO results of ``model`` on every image of a COCO split (category ids from ``stats``)."""
    import cv2

    from welde_det.datasets.coco import load_coco

    gt = load_coco(coco)
    root = Path(image_root)
    results = []
    for info in sorted(gt["images"], key=lambda im: im["id"]):
        path = root / info["file_name"]
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise FileNotFoundError(f"{path}: image named in {coco} cannot be read")
        for x1, y1, x2, y2, score, cls in predict_yolo(model, img, imgsz=imgsz, channels=channels,
                                                        conf=conf).tolist():
            results.append({"image_id": info["id"], "category_id": int(stats.category_ids[int(cls)]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def model_from_checkpoint(ckpt: Any) -> WELDEDetectionModel:
    """Rebuild a :class:`WELDEDetectionModel` from a loaded :class:`~welde_det.checkpoint.Checkpoint`.

    The model is built from plain values — the model YAML, the class counts and the WELDE
    spec saved in the checkpoint — and its state dict loaded strictly.
    """
    import copy

    extra = ckpt.extra or {}
    if ckpt.framework != "yolo" or "yaml" not in extra:
        raise ValueError(f"{ckpt.path}: not a welde_det YOLO checkpoint (framework {ckpt.framework!r})")
    names = list(ckpt.class_stats.names)
    counts = [float(c) for c in ckpt.class_stats.effective_counts]
    spec = WELDESpec.from_dict(ckpt.welde or {})
    model = WELDEDetectionModel(copy.deepcopy(extra["yaml"]), ch=int(extra.get("channels", 3)), nc=len(names),
                                class_counts=counts, verbose=False, **spec.model_kwargs())
    model.load_state_dict(ckpt.model_state)
    model.names = dict(enumerate(names))
    return model.float()


def load_init_model(path: str | os.PathLike) -> nn.Module:
    """The starting weights of a stage, read with ``weights_only=True``.

    A welde_det YOLO checkpoint is rebuilt with :func:`model_from_checkpoint`; an
    Ultralytics-native ``.pt`` (a user's ``yolov8n.pt``) passes the module allow-list of
    :func:`welde_det.checkpoint.safe_load` or is refused.
    """
    from welde_det.checkpoint import is_welde_checkpoint, load_checkpoint, safe_load

    if is_welde_checkpoint(path):
        return model_from_checkpoint(load_checkpoint(path))
    ckpt = safe_load(path, allow_modules=True)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path}: neither a welde_det checkpoint nor an Ultralytics model file "
                         f"(found {type(model).__name__})")
    return model

