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
from torch.autograd.function import once_differentiable

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
    "lmf_dense_sum",
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
        return self._normalise(self._total(logits, dense_targets(target, logits.shape[1])), logits.shape[0],
                               normalizer)

    def _normalise(self, total: torch.Tensor, rows: int, normalizer) -> torch.Tensor:
        norm = rows if normalizer is None else normalizer
        if isinstance(norm, torch.Tensor):
            norm = norm.float().clamp_min(1e-12)
        elif norm <= 0:
            raise ValueError(f"{type(self).__name__}: normalizer must be > 0, got {norm}")
        return total / norm

    def _total(self, logits, t):
        """Σ over rows and classes of the element-wise loss (subclasses may fuse it)."""
        return self._elementwise(logits, t).sum()

    def _elementwise(self, logits, t):  # pragma: no cover
        raise NotImplementedError


@register_loss("ce", activation="sigmoid")
class BCELoss(_DenseLoss):
    """Binary cross-entropy summed over rows and classes, divided by the normalizer.

    Background rows contribute only negative terms. ``forward(..., class_weight=w)`` multiplies
    column c (its positive and negative terms) by w_c, as Ultralytics' ``v8DetectionLoss``
    applies its ``cls_pw`` class weights.
    """

    def __init__(self, class_counts=None, *, validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, normalizer=None,
                class_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The BCE of logits (N, C) against ``target``; ``class_weight`` (C,) scales each column (None: 1)."""
        if class_weight is not None and class_weight.numel() != logits.shape[-1]:
            raise ValueError(f"BCELoss: {class_weight.numel()} class weights for {logits.shape[-1]} classes")
        return ClassLoss.forward(self, logits, target, normalizer=normalizer, class_weight=class_weight)

    def _loss(self, logits, target, normalizer=None, class_weight=None):
        if class_weight is None:
            return super()._loss(logits, target, normalizer=normalizer)
        t = dense_targets(target, logits.shape[1])
        total = (self._elementwise(logits, t) * class_weight.reshape(1, -1).to(logits)).sum()
        return self._normalise(total, logits.shape[0], normalizer)

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


def _log_sigmoid_abs(p: torch.Tensor, one_minus_p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log σ(|x|) = −log(1 + e^{−|x|}) from p = σ(x), written into ``out``: σ(|x|) = max(p, 1 − p).

    One ``log`` on [½, 1] instead of ``log1p``/``softplus`` (several times slower on CPU).
    Its absolute error is one float32 ulp of 1 — the same as
    ``F.binary_cross_entropy_with_logits``, which also evaluates log(1 + e^{−|x|}) with
    ``log`` — so softplus(x) = max(x, 0) − log σ(|x|) is as accurate as the BCE it replaces.
    """
    return torch.maximum(p, one_minus_p, out=out).log_()


def _apply_focal_modulator_(m: torch.Tensor, gamma: float, chain: torch.Tensor | None) -> torch.Tensor | None:
    """Turn m = 1 − p_t ≥ 0 into m^γ in place, and multiply ``chain`` (if given) by m^{γ−1} in place.

    Returns m^γ, or ``None`` at γ = 0 (the modulator is 1). Special-cases γ ∈ {1, 1.5, 2}
    (``sqrt``/``square``/cube instead of a general ``pow``). For γ < 1 the derivative
    m^{γ−1} is infinite at m = 0, where the full chain (· p(1 − p)) tends to 0: it is set to
    0 there so the gradient stays finite.
    """
    if gamma == 0:
        return None
    if gamma == 2:
        if chain is not None:
            chain.mul_(m)
        return m.square_()
    m.clamp_min_(0)  # rounding can leave p + t(1 − 2p) at −1 ulp (as in sigmoid_focal_term)
    if gamma == 1:
        return m
    if gamma == 1.5:
        r = m.sqrt_()
        if chain is not None:
            chain.mul_(r)
        return r.pow_(3)
    if chain is not None:
        d = m.pow(gamma - 1)
        if gamma < 1:
            d = torch.where(m > 0, d, 0.0)
        chain.mul_(d)
    return m.pow_(gamma)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ x·y over all elements, without building x·y."""
    return torch.dot(x.reshape(-1), y.reshape(-1))


def lmf_dense_sum(
    z: torch.Tensor,
    t: torch.Tensor,
    margins: torch.Tensor,
    alpha: torch.Tensor,
    *,
    s: float,
    a: float,
    b: float,
    gamma: float,
    pos_weight: torch.Tensor | None = None,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_{i,c} of the dense LMF loss and, optionally, its closed-form gradient ∂Σ/∂z.

    With u = s·(z − Δ_c·t), p = σ(z), softplus(x) = log(1 + eˣ), m = 1 − p_t = p + t(1 − 2p):

        ℓ = a·[(w_c·t + 1 − t)·softplus(u) − w_c·t·u]            (LDAM-BCE; w = 1 without DRW)
          + b·α_c·m^γ·[softplus(z) − t·z]                         (sigmoid focal)

    (with w = 1 the LDAM term is exactly BCE(u, t) = softplus(u) − t·u), and

        ∂ℓ/∂z = a·s·[(w_c·t + 1 − t)·σ(u) − w_c·t]
              + b·α_c·[γ·m^{γ−1}·(1 − 2t)·p(1 − p)·BCE(z, t) + m^γ·(p − t)],

    using ∂m/∂z = (1 − 2t)·p(1 − p) and ∂BCE(z, t)/∂z = p − t. The two sigmoids and the two
    logs are evaluated once and shared by the loss and the gradient. On a CPU the cost of
    such a loss is mostly fresh (N, C) allocations (page faults), so the code works in place
    on five temporaries (u, σ(u), one scratch buffer, p, 1 − p); the comments say what each
    holds at each step.

    Args:
        z: logits (N, C), float; t: targets (N, C) in [0, 1] (background rows all zero).
        margins: Δ_c (C,); alpha: focal α_c (C,); pos_weight: DRW weights w_c (C,) or ``None``.
        need_grad: also return ∂Σ/∂z (N, C); otherwise the second item is ``None``.

    Returns:
        (0-dim sum, gradient or ``None``).
    """
    # --- LDAM-BCE on u.
    u = torch.addcmul(z, t, margins, value=-1.0).mul_(s)
    p_u = torch.sigmoid(u)
    buf = torch.neg(p_u).add_(1)  # 1 − σ(u)
    buf = _log_sigmoid_abs(p_u, buf, out=buf)  # log σ(|u|)
    if pos_weight is None:
        ldam = -_dot(t, u)
        ldam = ldam + u.clamp_min_(0).sub_(buf).sum()  # u := softplus(u)
    else:
        coef = torch.addcmul(1 - t, t, pos_weight)  # w·t + 1 − t
        wt = t * pos_weight
        ldam = -_dot(wt, u)
        ldam = ldam + _dot(coef, u.clamp_min_(0).sub_(buf))
    # --- Sigmoid focal on z (u and buf are free from here on).
    p = torch.sigmoid(z)
    one_minus_p = torch.rsub(p, 1)
    log_q = _log_sigmoid_abs(p, one_minus_p, out=buf)  # log σ(|z|)
    bce = torch.clamp_min(z, 0, out=u).sub_(log_q).addcmul_(t, z, value=-1.0)  # softplus(z) − t·z, in u
    m = torch.sub(one_minus_p, p, out=log_q).mul_(t).add_(p)  # p + t(1 − 2p), in buf
    chain = None
    if need_grad and gamma != 0:
        chain = one_minus_p.mul_(p).mul_(bce)  # p(1 − p)·BCE, in one_minus_p
    mod = _apply_focal_modulator_(m, gamma, chain)  # m^γ in buf (None: 1); chain ·= m^{γ−1}
    focal_elem = bce if mod is None else bce.mul_(mod)  # bce is not needed after this
    focal = _dot(focal_elem.sum(0), alpha)
    total = a * ldam + b * focal
    if not need_grad:
        return total, None
    # --- ∂/∂z of the focal term; the gradient accumulates in p's storage.
    if chain is not None:
        chain.addcmul_(t, chain, value=-2.0)  # · (1 − 2t)
    grad = p.sub_(t)  # p − t = ∂BCE(z, t)/∂z
    if mod is not None:
        grad.mul_(mod)
    if chain is not None:
        grad.add_(chain, alpha=gamma)  # + γ·m^{γ−1}·(1 − 2t)·p(1 − p)·BCE
    grad.mul_(alpha * b)
    # --- ∂/∂z of the LDAM term.
    ldam_grad = p_u.sub_(t) if pos_weight is None else p_u.mul_(coef).sub_(wt)
    return total, grad.add_(ldam_grad, alpha=a * s)


class _LMFDenseSum(torch.autograd.Function):
    """Autograd wrapper of :func:`lmf_dense_sum`: the forward computes the gradient from the
    intermediates it already has and saves only that (N, C) tensor; the backward scales it."""

    @staticmethod
    def forward(ctx, z, t, margins, alpha, pos_weight, s, a, b, gamma):
        total, grad = lmf_dense_sum(z, t, margins, alpha, s=s, a=a, b=b, gamma=gamma, pos_weight=pos_weight,
                                    need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad.to(z.dtype))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None, None, None, None


@register_loss("lmf", activation="sigmoid")
class LMFBCELoss(_DenseLoss):
    """LMF for sigmoid heads: a·(dense LDAM) + b·(sigmoid focal with per-class α_c = Δ_c).

    ℓ = a·BCE(s·(z − Δ_c·t), t) + b·Δ_c·(1 − p_t)^γ·BCE(z, t), summed and divided by the
    normalizer (with DRW the LDAM term's positive part is weighted by w_c, as in
    :class:`LDAMBCELoss`). Background rows contribute only negative terms of both parts.

    The sum and its gradient are computed in one fused pass (:func:`lmf_dense_sum`, closed
    form, about 2.5x cheaper than running the two losses); it is the same formula as
    ``a·LDAMBCELoss + b·SigmoidFocalLoss``, which remains the path when the targets
    themselves require a gradient.
    """

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

    @property
    def logit_scale(self) -> float:
        """The LDAM term's scale s (the focal term's α does not change the predicted class)."""
        return self.ldam.s

    def _total(self, logits, t):
        if t.requires_grad:  # the closed form differentiates with respect to the logits only
            return super()._total(logits, t)
        pos_weight = self.ldam.drw_weight if self.ldam.drw_active else None
        return _LMFDenseSum.apply(logits, t, self.ldam.margins, self.focal.alpha, pos_weight, self.ldam.s,
                                  self.a, self.b, self.focal.gamma)

    def _elementwise(self, logits, t):
        return self.a * self.ldam._elementwise(logits, t) + self.b * self.focal._elementwise(logits, t)
