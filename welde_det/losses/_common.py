"""Shared plumbing of the loss families: input checks, float32 upcast, dense targets."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassLoss", "MarginMixin", "check_inputs", "dense_targets"]


def check_inputs(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int | None, name: str, *, background: bool = False
) -> None:
    """Shape/range/finiteness checks shared by every loss (one synchronising reduction).

    Args:
        background: integer targets may be −1 or C (background) — the dense family.

    Raises:
        ValueError: wrong shapes, a class count that does not match the logits, targets out
            of range, or non-finite logits.
    """
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must have shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if num_classes is not None and num_classes != c:
        raise ValueError(
            f"{name}: class_counts has {num_classes} entries but the logits have {c} classes"
        )
    if target.shape[0] != n:
        raise ValueError(f"{name}: {n} logit rows but {target.shape[0]} targets")
    if n == 0:
        return
    # Cheap reductions instead of element-wise masks: a floating-point sum is finite only if
    # every term is (NaN and ±inf propagate), so a finite sum proves the logits finite; a
    # non-finite sum (NaN/inf, or a finite overflow) is re-checked element-wise below.
    # aminmax gives the target range in one pass; NaN targets make it NaN, which fails the
    # (negated) comparisons.
    maybe_bad_logits = ~torch.isfinite(logits.sum())
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(f"{name}: soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        t_min, t_max = torch.aminmax(target)
        bad_target = ~((t_min >= 0) & (t_max <= 1))
    else:
        if target.ndim != 1:
            raise ValueError(f"{name}: integer targets must have shape (N,), got {tuple(target.shape)}")
        lo, hi = (-1, c) if background else (0, c - 1)
        t_min, t_max = torch.aminmax(target)
        bad_target = (t_min < lo) | (t_max > hi)
    flags = torch.stack([maybe_bad_logits, bad_target]).cpu()
    if flags[0] and not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name}: logits contain NaN or inf; check the learning rate and the inputs")
    if flags[1]:
        if target.dtype.is_floating_point:
            raise ValueError(f"{name}: soft targets must lie in [0, 1]")
        extra = f" or background (-1 or {c})" if background else ""
        raise ValueError(
            f"{name}: target values must be class indices in 0..{c - 1}{extra} "
            f"(got min {int(target.min())}, max {int(target.max())})"
        )


def dense_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) float targets from integer labels (−1 or C = background: all zeros) or soft targets."""
    if target.dtype.is_floating_point:
        return target.float()
    # One scatter (no boolean indexing, hence no host sync): background rows scatter a 0.
    fg = (target >= 0) & (target < num_classes)
    out = torch.zeros(target.shape[0], num_classes, dtype=torch.float32, device=target.device)
    return out.scatter_(1, target.clamp(0, num_classes - 1).unsqueeze(1), fg.unsqueeze(1).float())


class ClassLoss(nn.Module):
    """Base class: holds the class counts, validates inputs, upcasts to float32.

    Subclasses implement ``_loss(logits_float32, target, **kw)``.
    """

    needs_counts = False
    activation = "softmax"

    def __init__(self, class_counts: torch.Tensor | None = None, *, validate: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if self.needs_counts and class_counts is None:
            raise ValueError(f"{name} needs class_counts (e.g. ClassStats.effective_counts)")
        self.num_classes = None if class_counts is None else int(class_counts.numel())
        self.validate = validate
        self.epoch = 0
        if class_counts is not None:
            self.register_buffer("class_counts", class_counts.float(), persistent=True)
        else:
            self.class_counts = None

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current epoch (used by deferred re-weighting)."""
        self.epoch = int(epoch)

    @property
    def logit_scale(self) -> float:
        """s such that the head's predictive distribution is softmax/sigmoid(s · logits).

        1 for most losses; a margin loss's scale s (LDAM, LMF), which a cosine head needs
        at inference too: its logits are cosines in [−1, 1].
        """
        return 1.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
        if self.activation == "softmax" and target.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: softmax losses take integer class targets, got {target.dtype}")
        if self.validate:
            check_inputs(
                logits, target, self.num_classes, type(self).__name__, background=self.activation == "sigmoid"
            )
        if logits.shape[0] == 0:
            return logits.sum() * 0
        return self._loss(logits.float(), target, **kw)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class MarginMixin:
    """LDAM margins and deferred re-weighting shared by the softmax and dense LDAM losses."""

    def _init_margins(self, class_counts: torch.Tensor, max_m: float, s: float, drw_epoch: int,
                      drw_beta: float) -> None:
        from welde_det.losses.weighting import class_balanced_weights, ldam_margins

        if s <= 0:
            raise ValueError(f"ldam scale s must be > 0, got {s}")
        self.s, self.drw_epoch = float(s), int(drw_epoch)
        self.register_buffer("margins", ldam_margins(class_counts, max_m))
        self.register_buffer("drw_weight", class_balanced_weights(class_counts, drw_beta))

    @property
    def logit_scale(self) -> float:
        """The scale s: the loss's predictive distribution is that of s · logits."""
        return self.s

    @property
    def drw_active(self) -> bool:
        """Whether deferred re-weighting is on at the current epoch."""
        return 0 <= self.drw_epoch <= self.epoch
