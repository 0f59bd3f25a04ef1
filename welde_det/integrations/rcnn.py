"""torchvision Faster R-CNN with WELDE RoI heads.

The clean way in (torchvision's ``fastrcnn_loss`` hard-codes cross-entropy) is a
:class:`~torchvision.models.detection.roi_heads.RoIHeads` subclass built from an existing
model's parts: :meth:`WELDERoIHeads.from_roi_heads` keeps the RoI pooler, the shared
TwoMLPHead, the proposal sampler and the post-processing, and swaps the box predictor
for :class:`WELDEBoxPredictor` — K classification heads (adapter + classifier each, on
the 1024-d box feature) and one shared box regressor. The classification term is a
:class:`~welde_det.welde.WELDEObjective` over softmax losses with **background as class
0**; at inference the heads' softmax probabilities are fused (:func:`~welde_det.welde.fuse`)
and handed to torchvision's standard ``postprocess_detections`` unchanged.

The WELDE settings arrive as the plain keyword arguments of
:meth:`~welde_det.welde.WELDESpec.model_kwargs` (``components``, ``mode``, ``activation``,
``heads``, ``loss_params``, ``objective_kw``, ``hidden``) and are checked by
:func:`~welde_det.welde.build_spec`: an ``ldam``/``lmf`` head is cosine with s = 30 (its
probabilities are those of s·cos, :meth:`WELDERoIHeads.class_probabilities`) or linear with
s = 1; a cosine head with s = 1, capped near p = 0.55, cannot be built.

Background statistics (they set its class-balanced weight and LDAM margin): the RoI
sampler draws ``positive_fraction`` foreground RoIs, so background is counted as
``(1 − f) / f`` times the foreground instances (3× at torchvision's 0.25). Background is
therefore the most frequent class: it gets the **smallest** LDAM margin and the
**smallest** class-balanced weight, and a K = 1 ``ce`` predictor is exactly torchvision's
classification loss.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads

from welde_det.welde import WELDEHeads, WELDEObjective, WELDESpec, build_spec, fuse
from welde_det.welde.transfer import load_matching, loaded_heads

logger = logging.getLogger(__name__)

__all__ = [
    "RCNN_ARCHS",
    "WELDEBoxPredictor",
    "WELDERoIHeads",
    "background_count",
    "build_faster_rcnn",
    "build_rcnn_model",
    "freeze_for_stage2",
    "rcnn_class_counts",
    "train_frozen",
]

RCNN_ARCHS = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn")


def background_count(foreground_counts: Sequence[int], positive_fraction: float = 0.25) -> int:
    """Background 'instances' implied by the RoI sampler: Σ fg · (1 − f) / f."""
    if not 0 < positive_fraction < 1:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
    return max(1, round(sum(foreground_counts) * (1 - positive_fraction) / positive_fraction))


def rcnn_class_counts(foreground_counts: Sequence[int], positive_fraction: float = 0.25) -> list[int]:
    """Counts for the C + 1 softmax classes: background first, then the foreground classes."""
    return [background_count(foreground_counts, positive_fraction), *(int(c) for c in foreground_counts)]


class WELDEBoxPredictor(nn.Module):
    """K classification heads and one shared box regressor on the box-head feature.

    Args:
        in_channels: box-head feature size (1024 for torchvision's TwoMLPHead).
        num_classes: C + 1 (background included).
        components: registry names of the K heads.
        heads: ``"linear"`` or ``"cosine"`` per head (a :class:`~welde_det.welde.WELDESpec`'s
            ``heads``; None: :class:`~welde_det.welde.WELDEHeads`' default).
        hidden: adapter bottleneck width.

    Shape:
        x (N, D) or (N, D, 1, 1) → (K × (N, C + 1), (N, 4 (C + 1))).
    """

    def __init__(self, in_channels: int, num_classes: int, components: Sequence[str], *,
                 heads: Sequence[str] | None = None, hidden: int | None = None) -> None:
        super().__init__()
        self.heads = WELDEHeads(in_channels, num_classes, components, heads=heads, hidden=hidden)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.heads(x), self.bbox_pred(x)


def _box_loss(box_regression: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor) -> torch.Tensor:
    """torchvision's box term of ``fastrcnn_loss`` (smooth L1 on positives, / number of RoIs)."""
    pos = torch.where(labels > 0)[0]
    n = labels.numel()
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    loss = F.smooth_l1_loss(box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9, reduction="sum")
    return loss / n


class WELDERoIHeads(RoIHeads):
    """RoI heads whose classification loss is a WELDE objective (or one registry loss).

    Build it with :meth:`from_roi_heads`. The loss dict keeps torchvision's names
    (``loss_classifier``, ``loss_box_reg``); the detached WELDE terms of the last step are
    in :attr:`last_terms` for logging; :attr:`welde_spec` is the checked spec it was built from.
    """

    objective: WELDEObjective
    welde_spec: WELDESpec

    @classmethod
    def from_roi_heads(
        cls,
        roi_heads: RoIHeads,
        *,
        components: Sequence[str],
        foreground_counts: Sequence[int],
        mode: str = "welde",
        activation: str = "softmax",
        heads: Sequence[str] | None = None,
        loss_params: Mapping[str, Mapping[str, Any]] | None = None,
        objective_kw: Mapping[str, Any] | None = None,
        hidden: int | None = None,
    ) -> WELDERoIHeads:
        """Reuse ``roi_heads``' pooler, box head, sampler and post-processing; new predictor.

        Args:
            roi_heads: an existing model's ``roi_heads``.
            components: registry names of the heads (one for baselines).
            foreground_counts: training instances per foreground class (ClassStats order).
            mode: ``"single"`` (plain loss), ``"ce_ensemble"`` or ``"welde"``.
            activation: must be ``"softmax"`` (the RoI classifier includes background).
            heads: ``"linear"``/``"cosine"`` per head; None chooses as ``build_spec(head="auto")``.
            loss_params: extra keyword arguments per registry name.
            objective_kw: :class:`WELDEObjective` settings (not in mode ``"single"``).
            hidden: adapter width.

        Raises:
            ValueError: a spec :func:`~welde_det.welde.build_spec` refuses (e.g. a cosine head
                with s = 1), a sigmoid activation, mask/keypoint heads, or counts that do not
                match the model's classes.
        """
        spec = build_spec(components=components, mode=mode, activation=activation, head=heads or "auto",
                          loss_params=loss_params, objective_kw=objective_kw, hidden=hidden)
        if spec.activation != "softmax":
            raise ValueError(f"Faster R-CNN's RoI classifier is a softmax over background + classes; the WELDE spec "
                             f"says activation={spec.activation!r}; build the spec with activation='softmax'")
        if roi_heads.has_mask() or roi_heads.has_keypoint():
            raise ValueError("WELDERoIHeads supports box detection only (no mask/keypoint heads)")
        old = roi_heads.box_predictor
        in_channels = old.cls_score.in_features
        num_classes = old.cls_score.out_features
        if len(foreground_counts) != num_classes - 1:
            raise ValueError(f"{len(foreground_counts)} foreground class counts for a model with "
                             f"{num_classes - 1} foreground classes")
        counts = rcnn_class_counts(foreground_counts, roi_heads.fg_bg_sampler.positive_fraction)
        objective = spec.build_objective(counts)
        new = cls(
            roi_heads.box_roi_pool,
            roi_heads.box_head,
            WELDEBoxPredictor(in_channels, num_classes, spec.components, heads=spec.heads, hidden=spec.hidden),
            roi_heads.proposal_matcher.high_threshold,
            roi_heads.proposal_matcher.low_threshold,
            roi_heads.fg_bg_sampler.batch_size_per_image,
            roi_heads.fg_bg_sampler.positive_fraction,
            roi_heads.box_coder.weights,
            roi_heads.score_thresh,
            roi_heads.nms_thresh,
            roi_heads.detections_per_img,
        )
        with torch.no_grad():  # start from the old regressor and classifier where shapes allow
            new.box_predictor.bbox_pred.load_state_dict(old.bbox_pred.state_dict())
            for clf in new.box_predictor.heads.classifiers:
                if isinstance(clf, nn.Linear):
                    clf.load_state_dict(old.cls_score.state_dict())
        new.objective = objective
        new.welde_spec = spec
        new.class_counts = counts
        new.last_terms = {}
        return new

    def class_probabilities(self, logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused softmax probabilities (N, C + 1) of the K heads' logits.

        Each head's logits are first scaled by its loss's s (cosine heads: s·cos, see
        :meth:`~welde_det.welde.WELDEObjective.predictive_logits`), then fused with the
        objective's weights.
        """
        weights = self.objective.fusion_weights().to(logits_list[0].device)
        return fuse(self.objective.predictive_logits(logits_list), weights, activation="softmax")

    def forward(self, features, proposals, image_shapes, targets=None):
        if targets is not None:
            for t in targets:
                if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                    raise TypeError(f"target boxes must be of float type, instead got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must be of int64 type, instead got {t['labels'].dtype}")
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        logits_list, box_regression = self.box_predictor(box_features)
        if self.training:
            labels_cat = torch.cat(labels, dim=0)
            out = self.objective(logits_list, labels_cat)
            self.last_terms = {k: v for k, v in out.items() if k != "loss"}
            losses = {"loss_classifier": out["loss"],
                      "loss_box_reg": _box_loss(box_regression, labels_cat, torch.cat(regression_targets, dim=0))}
            return [], losses
        probs = self.class_probabilities(logits_list)
        # postprocess_detections applies softmax: log-probabilities give back the fused p exactly
        boxes, scores, labels = self.postprocess_detections(torch.log(probs.clamp_min(1e-30)), box_regression,
                                                            proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)], {}


def _adapt_channels(model: nn.Module, in_channels: int) -> None:
    if in_channels == 3:
        return
    if in_channels != 1:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    t = model.transform
    t.image_mean = [float(sum(t.image_mean) / 3)]
    t.image_std = [float(sum(t.image_std) / 3)]
    for name, module in model.backbone.body.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(1, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.weight.sum(1, keepdim=True))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent = model.backbone.body
            *path, last = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, last, new)
            return


def build_faster_rcnn(
    arch: str,
    *,
    foreground_counts: Sequence[int],
    components: Sequence[str] = ("ce",),
    mode: str = "single",
    activation: str = "softmax",
    heads: Sequence[str] | None = None,
    loss_params: Mapping[str, Mapping[str, Any]] | None = None,
    objective_kw: Mapping[str, Any] | None = None,
    hidden: int | None = None,
    in_channels: int = 3,
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    min_size: int = 384,
    max_size: int = 640,
) -> nn.Module:
    """A torchvision Faster R-CNN (random init or a local checkpoint) with WELDE RoI heads.

    Example:
        >>> spec = build_spec(components=("ce", "ldam"), mode="welde", activation="softmax")
        >>> model = build_faster_rcnn("fasterrcnn_mobilenet_v3_large_fpn", foreground_counts=[5, 3],
        ...                           **spec.model_kwargs())  # doctest: +SKIP

    Args:
        arch: one of :data:`RCNN_ARCHS`.
        foreground_counts: training instances per class (C classes; background is added).
        components, mode, activation, heads, loss_params, objective_kw, hidden: a
            :class:`~welde_det.welde.WELDESpec`'s ``model_kwargs()``; see
            :meth:`WELDERoIHeads.from_roi_heads`.
        in_channels: 1 (grayscale) or 3.
        weights: a local torchvision Faster R-CNN state dict or welde_det checkpoint, read
            with :func:`welde_det.checkpoint.safe_load` (e.g.
            the CE baseline as the start of the frozen stage), or a state dict in memory
            — never a download. Entries
            are loaded where name and shape match; a K = 1 welde_det head starts all K
            heads (:meth:`~welde_det.welde.WELDEHeads.spread_first_head`).
        min_size, max_size: GeneralizedRCNNTransform resizing.

    Raises:
        ValueError: unknown arch, a weights name that is not a local file, a WELDE spec
            :func:`~welde_det.welde.build_spec` refuses.
        welde_det.checkpoint.UnsafeCheckpointError: a weights file that would run code when loaded.
    """
    import torchvision

    if arch not in RCNN_ARCHS:
        raise ValueError(f"unknown Faster R-CNN arch {arch!r}; choose one of {list(RCNN_ARCHS)}")
    # the WELDE settings are checked before anything is built or loaded
    spec = build_spec(components=components, mode=mode, activation=activation, head=heads or "auto",
                      loss_params=loss_params, objective_kw=objective_kw, hidden=hidden)
    builder = getattr(torchvision.models.detection, arch)
    model = builder(weights=None, weights_backbone=None, num_classes=len(foreground_counts) + 1,
                    min_size=min_size, max_size=max_size)
    state = None
    if isinstance(weights, Mapping):
        state = weights
    elif weights is not None:
        if not os.path.isfile(weights):
            raise ValueError(f"weights {weights!r} is not a local file; welde_det never downloads weights — pass "
                             "the path of a saved state dict, or leave it unset for random initialisation")
        from welde_det.checkpoint import SCHEMA, safe_load

        state = safe_load(weights)  # weights_only: a file that needs arbitrary unpickling is refused
        if isinstance(state, dict):
            state = state["model_state"] if state.get("schema") == SCHEMA else state.get("model", state)
        if not isinstance(state, Mapping):
            raise ValueError(f"weights {weights}: expected a Faster R-CNN state dict or welde_det checkpoint, "
                             f"found a {type(state).__name__}")
        # a plain torchvision state dict: its box predictor seeds every WELDE head below
        load_matching(model, state, _not_objective)
    _adapt_channels(model, in_channels)
    model.roi_heads = WELDERoIHeads.from_roi_heads(model.roi_heads, foreground_counts=foreground_counts,
                                                   **spec.model_kwargs())
    if state:
        # a welde_det checkpoint (1-channel stem, K heads): what matches the final model
        loaded = load_matching(model, state, _not_objective)
        if not any(k.startswith("backbone.body.") for k in loaded):
            raise ValueError(f"weights {weights}: no backbone entry matches {arch} (a checkpoint of another "
                             "architecture?); pass weights of the same arch, or none for random initialisation")
        heads = model.roi_heads.box_predictor.heads
        if loaded_heads(loaded, ".box_predictor.heads.") == {0} and len(heads) > 1:
            heads.spread_first_head()
        logger.info("loaded %d of %d entries from %s", len(loaded), len(model.state_dict()),
                    weights if not isinstance(weights, Mapping) else "a state dict")
    return model


def build_rcnn_model(arch: str, foreground_counts: Sequence[int], welde: Mapping[str, Any], *, channels: int,
                     imgsz: int, weights: Any = None) -> nn.Module:
    """The Faster R-CNN of a stage or a checkpoint, from plain values: the arch, the training counts,
    a :class:`~welde_det.welde.WELDESpec` dict, the input channels and size (``min_size = max_size``)."""
    spec = WELDESpec.from_dict(welde)
    return build_faster_rcnn(arch, foreground_counts=list(foreground_counts), in_channels=channels, weights=weights,
                             min_size=imgsz, max_size=imgsz, **spec.model_kwargs())


def _not_objective(name: str) -> bool:
    """Initialising from weights keeps this model's objective (loss buffers, θ, EMA, step counter):
    its warm-up and bias correction start afresh, from this run's class counts. Resuming a run
    restores the whole state dict instead."""
    return ".objective." not in name


def freeze_for_stage2(model: nn.Module) -> list[nn.Parameter]:
    """Freeze backbone, FPN, RPN, box head and box regressor; return what still trains.

    Only the K adapters and classifiers and the WELDE weights θ stay trainable.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*model.roi_heads.box_predictor.heads.parameters(), *model.roi_heads.objective.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def train_frozen(model: nn.Module) -> None:
    """Training mode for the frozen stage: RPN and RoI heads train (training proposal counts, RoI
    sampling); backbone and FPN stay in eval mode, so their BatchNorm layers use — and keep — the
    statistics of the model the stage starts from (``Stage.frozen``: BatchNorm statistics included).
    Without it a frozen stage normalised by each batch's statistics and rewrote the running ones."""
    model.train()
    model.backbone.eval()
