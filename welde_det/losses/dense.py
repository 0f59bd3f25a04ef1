"""Dense (sigmoid, one-vs-all) losses — the family that plugs into YOLO (METHOD.md §2).

Logits (N, C); targets either integer (N,) where −1 or C means **background** (the row's
targets are all zero: every class column is a negative), or soft (N, C) in [0, 1] as
Ultralytics' TaskAlignedAssigner produces (an all-zero row is background). The forward
``forward(logits, target, normalizer=None)`` sums over rows and classes and divides by
``normalizer`` (default N); the YOLO criterion passes the sum of target scores, as
Ultralytics does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from welde_det.losses._common import ClassLoss, MarginMixin, dense_targets
from welde_det.losses.registry import register_loss
from welde_det.losses.weighting import (
    bwcce_weights,
    class_balanced_weights,
    inverse_frequency_weights,
    ldam_margins,
)

__all__ = [
    "BCELoss",
    "ClassBalancedBCELoss",
    "LDAMBCELoss",
    "LMFBCELoss",
    "SigmoidFocalLoss",
    "sigmoid_focal_term",
]


def sigmoid_focal_term(logits: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise (1 − p_t)^γ · BCE with p = σ(z) and 1 − p_t = p + t·(1 − 2p).

    That form equals t·(1 − p) + (1 − t)·p for soft targets, needs one sigmoid, and stays
    finite for any logit: at |z| → ∞ the modulator tends to exactly 0 or 1 (no NaN from
    ``1 − sigmoid`` cancellation reaching a log, since the BCE is computed from the logits).
    """
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if gamma == 0:
        return bce
    p = torch.sigmoid(logits)
    one_minus_pt = p + t * (1 - 2 * p)
    return (one_minus_pt.square() if gamma == 2.0 else one_minus_pt.clamp_min(0).pow(gamma)) * bce


class _DenseLoss(ClassLoss):
    activation = "sigmoid"

    def forward(self, logits: torch.Tensor, target: torch.Tensor, normalizer=None) -> torch.Tensor:
        return super().forward(logits, target, normalizer=normalizer)

    def _loss(self, logits, target, normalizer=None):
        t = dense_targets(target, logits.shape[1])
        total = self._elementwise(logits, t).sum()
        norm = logits.shape[0] if normalizer is None else normalizer
        if isinstance(norm, torch.Tensor):
            norm = norm.float().clamp_min(1e-12)
        elif norm <= 0:
            raise ValueError(f"{type(self).__name__}: normalizer must be > 0, got {norm}")
        return total / norm

    def _elementwise(self, logits, t):  # pragma: no cover
        raise NotImplementedError


@register_loss("ce", activation="sigmoid")
class BCELoss(_DenseLoss):
    """Binary cross-entropy summed over rows and classes, divided by the normalizer.

    Background rows contribute only negative terms.
    """

    def __init__(self, class_counts=None, *, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)

    def _elementwise(self, logits, t):
        return F.binary_cross_entropy_with_logits(logits, t, reduction="none")


@register_loss("focal", activation="sigmoid")
class SigmoidFocalLoss(_DenseLoss):
    """Sigmoid focal loss: α-weighting × (1 − p_t)^γ × BCE, with the stable modulator.

    Args:
        gamma: focusing parameter (γ = 0 gives BCE).
        alpha: ``None`` (no α), a number in [0, 1] (RetinaNet's α_t: α on positives, 1 − α
            on negatives), one value per class (weights the class's column), or ``"ldam"``
            (per-class α_c = Δ_c, the LMF choice).
        max_m: largest margin when ``alpha="ldam"``.

    Background rows contribute only negative (down-weighted) terms.
    """

    def __init__(self, class_counts=None, *, gamma: float = 2.0,
                 alpha: float | str | Sequence[float] | None = None, max_m: float = 0.5,
                 validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.alpha_t: float | None = None
        col = None
        if isinstance(alpha, str):
            if alpha != "ldam":
                raise ValueError(f"focal alpha must be None, 'ldam', a number or one value per class; got {alpha!r}")
            if class_counts is None:
                raise ValueError("focal with alpha='ldam' needs class_counts")
            col = ldam_margins(class_counts, max_m)
        elif alpha is not None:
            a = torch.as_tensor(alpha, dtype=torch.float32)
            if a.ndim == 0:
                if not 0 <= float(a) <= 1:
                    raise ValueError(f"sigmoid focal alpha must be in [0, 1], got {float(a)}")
                self.alpha_t = float(a)
            else:
                col = a
        if col is not None:
            self.register_buffer("alpha", col)
        else:
            self.alpha = None

    def _elementwise(self, logits, t):
        loss = sigmoid_focal_term(logits, t, self.gamma)
        if self.alpha_t is not None:
            loss = loss * (self.alpha_t * t + (1 - self.alpha_t) * (1 - t))
        if self.alpha is not None:
            loss = loss * self.alpha
        return loss


class _PositiveWeightedBCE(_DenseLoss):
    """BCE with a per-class weight on the positive term only: −(w_c t log p + (1 − t) log(1 − p))."""

    needs_counts = True

    def __init__(self, class_counts, weights: torch.Tensor, *, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        self.register_buffer("weight", weights.float())

    def _elementwise(self, logits, t):
        # −(w t log σ(z) + (1−t) log σ(−z)) = (w t + 1 − t)·softplus(−z) + (1 − t)·z: one softplus.
        return (self.weight * t + 1 - t) * F.softplus(-logits) + (1 - t) * logits


@register_loss("cb", activation="sigmoid")
class ClassBalancedBCELoss(_PositiveWeightedBCE):
    """Class-balanced BCE: w_c = (1−β)/(1−β^{n_c}) (Σ w = C) on the **positive** term only.

    Negatives (including every background row) keep weight 1, so the weights re-balance
    the foreground classes against each other without changing how hard background is pushed.
    """

    def __init__(self, class_counts=None, *, beta: float = 0.9999, validate: bool = True) -> None:
        if class_counts is None:
            raise ValueError("ClassBalancedBCELoss needs class_counts")
        super().__init__(class_counts, class_balanced_weights(class_counts, beta), validate=validate)


@register_loss("wce", activation="sigmoid")
class WeightedBCELoss(_PositiveWeightedBCE):
    """Inverse-frequency weights w_c = (N_total / n_c) / C on the positive term only."""

    def __init__(self, class_counts=None, *, validate: bool = True) -> None:
        if class_counts is None:
            raise ValueError("WeightedBCELoss needs class_counts")
        super().__init__(class_counts, inverse_frequency_weights(class_counts), validate=validate)


@register_loss("bwcce", activation="sigmoid")
class BWCCEBCELoss(_PositiveWeightedBCE):
    """BWCCE weights (LMF Eq. 3) on the positive term only."""

    def __init__(self, class_counts=None, *, validate: bool = True) -> None:
        if class_counts is None:
            raise ValueError("BWCCEBCELoss needs class_counts")
        super().__init__(class_counts, bwcce_weights(class_counts), validate=validate)


@register_loss("ldam", activation="sigmoid")
class LDAMBCELoss(MarginMixin, _DenseLoss):
    """LDAM for sigmoid heads: BCE on s·(z − Δ_c·t_c).

    The margin is applied where the target is positive (scaled by the soft target, so a
    target score of 0.3 gets 0.3·Δ_c); background rows and negative columns are unchanged.
    With raw (non-cosine) logits pass ``s = 1``. DRW: from ``drw_epoch`` on, the positive
    term is weighted by the class-balanced weights (β = ``drw_beta``).
    """

    needs_counts = True

    def __init__(self, class_counts=None, *, max_m: float = 0.5, s: float = 30.0, drw_epoch: int = -1,
                 drw_beta: float = 0.9999, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        self._init_margins(class_counts, max_m, s, drw_epoch, drw_beta)

    def _elementwise(self, logits, t):
        z = self.s * (logits - self.margins * t)
        if not self.drw_active:
            return F.binary_cross_entropy_with_logits(z, t, reduction="none")
        return (self.drw_weight * t + 1 - t) * F.softplus(-z) + (1 - t) * z


@register_loss("lmf", activation="sigmoid")
class LMFBCELoss(_DenseLoss):
    """LMF for sigmoid heads: a·(dense LDAM) + b·(sigmoid focal with per-class α_c = Δ_c)."""

    needs_counts = True

    def __init__(self, class_counts=None, *, a: float = 1.0, b: float = 1.0, gamma: float = 1.5,
                 max_m: float = 0.5, s: float = 30.0, drw_epoch: int = -1, drw_beta: float = 0.9999,
                 validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        self.a, self.b = float(a), float(b)
        self.ldam = LDAMBCELoss(class_counts, max_m=max_m, s=s, drw_epoch=drw_epoch, drw_beta=drw_beta,
                                validate=False)
        self.focal = SigmoidFocalLoss(class_counts, gamma=gamma, alpha="ldam", max_m=max_m, validate=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.ldam.set_epoch(epoch)

    def _elementwise(self, logits, t):
        return self.a * self.ldam._elementwise(logits, t) + self.b * self.focal._elementwise(logits, t)
