"""Softmax-family losses (integer targets, logits (N, C)) — METHOD.md §2.

"mean" always divides by the batch size N (the seeds' Eq. 2), never by the sum of the
per-sample weights as ``torch.nn.CrossEntropyLoss(weight=...)`` does. All losses compute
in float32 for half inputs and return ``logits.sum() * 0`` on an empty batch.

Two-stage detectors use this family with background as an extra class; the RoI-head
integration decides its count (and so its CB weight and LDAM margin) and documents it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from welde_det.losses._common import ClassLoss, MarginMixin
from welde_det.losses.registry import register_loss
from welde_det.losses.weighting import (
    bwcce_weights,
    class_balanced_weights,
    inverse_frequency_weights,
    ldam_margins,
)

__all__ = [
    "BWCCELoss",
    "ClassBalancedLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LDAMLoss",
    "LMFLoss",
    "WeightedCrossEntropyLoss",
    "focal_term",
]


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample −log p_{i,y_i}, shape (N,)."""
    return F.cross_entropy(logits, target, reduction="none")


def focal_term(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample −(1 − p_t)^γ log p_t, shape (N,) (no α)."""
    logp_t = -_nll(logits, target)
    if gamma == 0:
        return -logp_t
    # 1 - p_t via -expm1(log p_t): accurate when p_t is close to 1.
    one_minus = (-torch.expm1(logp_t)).clamp_min(0.0)
    return -(one_minus.square() if gamma == 2.0 else one_minus.pow(gamma)) * logp_t


class _SoftmaxLoss(ClassLoss):
    activation = "softmax"


@register_loss("ce")
class CrossEntropyLoss(_SoftmaxLoss):
    """mean_i −log p_{i,y_i}.

    Shape:
        logits (N, C), target (N,) int64 → scalar.
    """

    def __init__(self, class_counts: torch.Tensor | None = None, *, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)

    def _loss(self, logits, target):
        return _nll(logits, target).mean()


class _WeightedCE(_SoftmaxLoss):
    needs_counts = True

    def __init__(self, class_counts: torch.Tensor | None, weights: torch.Tensor, *, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        self.register_buffer("weight", weights.float())

    def _loss(self, logits, target):
        return (self.weight[target] * _nll(logits, target)).sum() / logits.shape[0]


@register_loss("wce")
class WeightedCrossEntropyLoss(_WeightedCE):
    """mean_i −w_{y_i} log p_{i,y_i} with w_c = (N_total / n_c) / C (divides by N)."""

    def __init__(self, class_counts: torch.Tensor | None = None, *, validate: bool = True) -> None:
        if class_counts is None:
            raise ValueError("WeightedCrossEntropyLoss needs class_counts")
        super().__init__(class_counts, inverse_frequency_weights(class_counts), validate=validate)


@register_loss("bwcce")
class BWCCELoss(_WeightedCE):
    """Balanced weighted CE: w_c = (1 / (C − 1)) · (1 − n_c / Σ n) (LMF Eq. 3; divides by N)."""

    def __init__(self, class_counts: torch.Tensor | None = None, *, validate: bool = True) -> None:
        if class_counts is None:
            raise ValueError("BWCCELoss needs class_counts")
        super().__init__(class_counts, bwcce_weights(class_counts), validate=validate)


def _alpha_vector(alpha, class_counts, max_m: float) -> torch.Tensor | None:
    if alpha is None:
        return None
    if isinstance(alpha, str):
        if alpha != "ldam":
            raise ValueError(f"focal alpha must be None, 'ldam', a number or one value per class; got {alpha!r}")
        if class_counts is None:
            raise ValueError("focal with alpha='ldam' needs class_counts")
        return ldam_margins(class_counts, max_m)
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if a.ndim == 0:
        return a.reshape(1)
    if class_counts is not None and a.numel() != class_counts.numel():
        raise ValueError(f"focal alpha has {a.numel()} values but there are {class_counts.numel()} classes")
    return a


@register_loss("focal")
class FocalLoss(_SoftmaxLoss):
    """mean_i −α_{y_i} (1 − p_{i,y_i})^γ log p_{i,y_i}.

    Args:
        gamma: focusing parameter (γ = 0 gives CE).
        alpha: ``None`` (α = 1), a number, one value per class, or ``"ldam"`` for
            α_c = Δ_c, the LDAM margins (the LMF paper's choice).
        max_m: largest margin when ``alpha="ldam"``.
    """

    def __init__(
        self,
        class_counts: torch.Tensor | None = None,
        *,
        gamma: float = 2.0,
        alpha: float | str | Sequence[float] | None = None,
        max_m: float = 0.5,
        validate: bool = True,
    ) -> None:
        super().__init__(class_counts, validate=validate)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        a = _alpha_vector(alpha, class_counts, max_m)
        self.register_buffer("alpha", a) if a is not None else setattr(self, "alpha", None)

    def _loss(self, logits, target):
        loss = focal_term(logits, target, self.gamma)
        if self.alpha is not None:
            loss = loss * (self.alpha if self.alpha.numel() == 1 else self.alpha[target])
        return loss.mean()


@register_loss("cb")
class ClassBalancedLoss(_SoftmaxLoss):
    """Class-balanced loss (Cui et al.): CE or focal weighted by w_c = (1−β)/(1−β^{n_c}), Σ w = C.

    Args:
        beta: effective-number hyper-parameter.
        base: ``"ce"`` or ``"focal"``.
        gamma: focusing parameter when ``base="focal"``.
    """

    needs_counts = True

    def __init__(
        self,
        class_counts: torch.Tensor | None = None,
        *,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float = 2.0,
        validate: bool = True,
    ) -> None:
        super().__init__(class_counts, validate=validate)
        if base not in ("ce", "focal"):
            raise ValueError(f"cb base must be 'ce' or 'focal', got {base!r}")
        self.base, self.gamma = base, float(gamma)
        self.register_buffer("weight", class_balanced_weights(class_counts, beta))

    def _loss(self, logits, target):
        per = _nll(logits, target) if self.base == "ce" else focal_term(logits, target, self.gamma)
        return (self.weight[target] * per).sum() / logits.shape[0]


@register_loss("ldam")
class LDAMLoss(MarginMixin, _SoftmaxLoss):
    """LDAM: mean_i CE(s·(z_i − Δ_{y_i} e_{y_i}), y_i), Δ_c = max_m · n_c^{−1/4} / max_j n_j^{−1/4}.

    The loss does not normalise the logits: pair it with a cosine classifier (normalised
    features and weights) as in the reference, so ``s = 30`` is meaningful; with raw logits
    pass ``s = 1``.

    Deferred re-weighting (DRW): with ``drw_epoch >= 0``, from that epoch on (see
    :meth:`set_epoch`) each sample is weighted by the class-balanced weight of its class
    (β = ``drw_beta``, Σ w = C); the mean still divides by N.
    """

    needs_counts = True

    def __init__(
        self,
        class_counts: torch.Tensor | None = None,
        *,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int = -1,
        drw_beta: float = 0.9999,
        validate: bool = True,
    ) -> None:
        super().__init__(class_counts, validate=validate)
        self._init_margins(class_counts, max_m, s, drw_epoch, drw_beta)

    def margin_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """s·(z − Δ_y e_y): the logits CE is applied to."""
        return logits.scatter_add(1, target[:, None], -self.margins[target][:, None]) * self.s

    def _loss(self, logits, target):
        per = _nll(self.margin_logits(logits, target), target)
        if self.drw_active:
            per = per * self.drw_weight[target]
        return per.sum() / logits.shape[0]


@register_loss("lmf")
class LMFLoss(_SoftmaxLoss):
    """LMF (LMF Eq. 8): a·LDAM + b·Focal with α_c = Δ_c (the LDAM margins).

    The focal term is computed on the logits as given (not s-scaled), exactly as
    ``build_loss("focal", alpha="ldam", gamma=gamma, max_m=max_m)`` would. DRW options are
    those of :class:`LDAMLoss` (applied to the LDAM term).
    """

    needs_counts = True

    def __init__(
        self,
        class_counts: torch.Tensor | None = None,
        *,
        a: float = 1.0,
        b: float = 1.0,
        gamma: float = 1.5,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int = -1,
        drw_beta: float = 0.9999,
        validate: bool = True,
    ) -> None:
        super().__init__(class_counts, validate=validate)
        self.a, self.b = float(a), float(b)
        self.ldam = LDAMLoss(class_counts, max_m=max_m, s=s, drw_epoch=drw_epoch, drw_beta=drw_beta, validate=False)
        self.focal = FocalLoss(class_counts, gamma=gamma, alpha="ldam", max_m=max_m, validate=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.ldam.set_epoch(epoch)

    @property
    def logit_scale(self) -> float:
        """The LDAM term's scale s (the focal term's α does not change the predicted class)."""
        return self.ldam.s

    def _loss(self, logits, target):
        return self.a * self.ldam._loss(logits, target) + self.b * self.focal._loss(logits, target)
