"""The WELDE objective: EMA-normalised components, learnable weights, relaxed sum-to-one, diversity.

For K component losses ℓ_k (each on its own head's logits), METHOD.md §3:

- EMA normalisation: m_k ← μ·m_k + (1−μ)·ℓ_k.detach(), bias-corrected m̂_k = m_k / (1 − μ^t);
  ℓ̂_k = ℓ_k / (m̂_k + 1e-8). Every component then contributes gradients of comparable
  size whatever its raw scale (property 1).
- Weights: w_k = softplus(θ_k), θ initialised so w_k = 1/K; the effective weight is
  max(w_k, weight_floor). The floor is applied with a straight-through gradient, so a
  weight at the floor still receives the gradient that can lift it. Until
  ``warmup_steps`` training steps have passed the weights are held at 1/K (θ gets no
  gradient), so the EMA statistics settle before the weights start to move.
- Relaxed sum-to-one penalty λ_s(Σ_k w_k − 1)²: with ℓ̂ ≈ 1 the weights settle at
  Σw ≈ 1 − 1/(2λ_s) (0.95 at λ_s = 10) and move apart only as components progress at
  different rates relative to their own history (property 2).
- Diversity D: mean over pairs k < l of the Jensen–Shannon divergence between the heads'
  predictive distributions — softmax distributions per sample, or per-class Bernoulli
  distributions for sigmoid heads on foreground samples only; bounded by log 2. A head's
  predictive distribution is that of s_k·z_k, with s_k its loss's ``logit_scale`` (the
  scale of a margin loss on a cosine head, 1 otherwise); :meth:`WELDEObjective.predictive_logits`
  gives the same logits to inference-time fusion.
- Total: Σ_k w_k·ℓ̂_k + λ_s(Σw − 1)² − λ_d·D.

θ is an ``nn.Parameter`` of this module: give the objective's parameters to the same
optimiser as the heads. The EMA statistics and step counter are buffers, so they are
saved and restored with ``state_dict``. Statistics update only in training mode.
Under DDP each rank keeps its own EMA of its own batches' losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WELDEObjective", "js_diversity", "single_loss_objective"]


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """p·log p with 0·log 0 = 0, for p ∈ [0, 1].

    Computed as p·log(max(p, 2^−126)): the value equals ``torch.special.xlogy(p, p)`` (it
    differs only for 0 < p < 2^−126, by less than 1e−36), about 2.5x faster forward and
    backward on CPU, and its gradient at p = 0 is finite (log 2^−126) where xlogy's is NaN
    (0/0) — which made the diversity gradient NaN as soon as a softmax probability
    underflowed or a sigmoid saturated (|z| ≳ 17) on some head.
    """
    return p * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def _entropy_softmax(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -_xlogx(p).sum(dim)


def _entropy_bernoulli(p: torch.Tensor) -> torch.Tensor:
    return -(_xlogx(p) + _xlogx(1 - p))


def js_diversity(probs: Sequence[torch.Tensor], activation: str = "softmax") -> torch.Tensor:
    """Mean pairwise Jensen–Shannon divergence between K heads' distributions.

    JS(p, q) = H((p + q)/2) − (H(p) + H(q))/2, in nats, in [0, log 2].

    Args:
        probs: K tensors (N, C) of probabilities (softmax rows, or per-class sigmoid).
        activation: ``"softmax"`` (rows are distributions) or ``"sigmoid"`` (each entry is a
            Bernoulli; divergences are averaged over classes).

    Returns:
        0-dim tensor; 0 when K < 2 or N = 0.
    """
    if len(probs) < 2 or probs[0].shape[0] == 0:
        return probs[0].sum() * 0
    return _js_stacked(torch.stack(list(probs)), activation, class_dim=-1)


def _js_stacked(p: torch.Tensor, activation: str, class_dim: int) -> torch.Tensor:
    """:func:`js_diversity` of stacked probabilities p (K, ...) with the classes on ``class_dim``.

    All K(K − 1)/2 pairs at once: with the (pairs × K) mixing matrix A (½ at the pair's two
    heads), the pairwise means are one matmul A·p and the mean of their entropies A·H, so
    there are two entropy evaluations (heads, pair means) whatever K. Per sample the
    divergence is H(mean) − (H_k + H_l)/2, as in the pairwise definition; its mean over
    samples (and classes for Bernoulli heads) is averaged over the pairs.
    """
    k = p.shape[0]
    i, j = torch.triu_indices(k, k, 1, device=p.device)
    pairs = torch.arange(i.numel(), device=p.device)
    mix = p.new_zeros(i.numel(), k)
    mix[pairs, i] = 0.5
    mix[pairs, j] = 0.5
    mean = (mix @ p.reshape(k, -1)).reshape(-1, *p.shape[1:])
    if activation == "softmax":
        h, h_mean = _entropy_softmax(p, class_dim), _entropy_softmax(mean, class_dim)
    else:
        h, h_mean = _entropy_bernoulli(p), _entropy_bernoulli(mean)
    js = h_mean - (mix @ h.reshape(k, -1)).reshape(h_mean.shape)  # (pairs, N[, C])
    return js.reshape(js.shape[0], -1).mean(1).sum() / (k * (k - 1) / 2)


def _unique_names(names: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}_{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return tuple(out)


class WELDEObjective(nn.Module):
    """Combine K component losses into the WELDE objective.

    Args:
        losses: the K component losses, as a mapping name → module or (name, module) pairs
            (duplicate names get suffixes: ce, ce_1, ce_2, ...).
        ema_momentum: μ of the EMA normalisation.
        sum_penalty: λ_s of the relaxed sum-to-one penalty.
        diversity: λ_d of the diversity term (0 switches it off).
        weight_floor: lower bound of each effective weight.
        warmup_steps: training steps during which the weights are held at 1/K.
        activation: ``"softmax"`` or ``"sigmoid"`` — how heads' logits become distributions
            for the diversity term.
        normalize: divide each component by its EMA (WELDE). ``False`` keeps raw losses —
            with K = 1, no penalty and no diversity the objective is exactly the plain loss,
            which is how single-loss baselines run through the same code path.

    Example:
        >>> from welde_det.losses import build_loss
        >>> obj = WELDEObjective({"ce": build_loss("ce"), "focal": build_loss("focal")})
        >>> out = obj([torch.randn(8, 3), torch.randn(8, 3)], torch.randint(0, 3, (8,)))
        >>> sorted(out)[:3]
        ['diversity', 'loss', 'loss_ce']
    """

    def __init__(
        self,
        losses: Mapping[str, nn.Module] | Sequence[tuple[str, nn.Module]],
        *,
        ema_momentum: float = 0.99,
        sum_penalty: float = 10.0,
        diversity: float = 0.1,
        weight_floor: float = 0.05,
        warmup_steps: int = 50,
        activation: str = "softmax",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        items = list(losses.items()) if isinstance(losses, Mapping) else list(losses)
        if not items:
            raise ValueError("WELDEObjective needs at least one component loss")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {ema_momentum}")
        if sum_penalty < 0 or diversity < 0 or warmup_steps < 0:
            raise ValueError("sum_penalty, diversity and warmup_steps must be >= 0")
        k = len(items)
        if not 0.0 <= weight_floor < 1.0 / k + 1e-12:
            raise ValueError(f"weight_floor must be in [0, 1/K] = [0, {1 / k:.3f}], got {weight_floor}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.names = _unique_names([n for n, _ in items])
        self.losses = nn.ModuleList(m for _, m in items)
        self.ema_momentum = float(ema_momentum)
        self.sum_penalty = float(sum_penalty)
        self.diversity = float(diversity)
        self.weight_floor = float(weight_floor)
        self.warmup_steps = int(warmup_steps)
        self.activation = activation
        self.normalize = bool(normalize)
        theta0 = math.log(math.expm1(1.0 / k))  # softplus(theta0) = 1/K
        self.theta = nn.Parameter(torch.full((k,), theta0))
        self.register_buffer("ema", torch.zeros(k))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @property
    def num_components(self) -> int:
        """K."""
        return len(self.names)

    @property
    def in_warmup(self) -> bool:
        """Whether the weights are still held at 1/K."""
        return int(self.num_steps) <= self.warmup_steps

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to components that use it (deferred re-weighting)."""
        for loss in self.losses:
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(epoch)

    @property
    def logit_scales(self) -> tuple[float, ...]:
        """s_k per head: its loss's ``logit_scale`` (1 for losses without a scale)."""
        return tuple(float(getattr(loss, "logit_scale", 1.0)) for loss in self.losses)

    def predictive_logits(self, logits_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """s_k·z_k per head: the logits whose softmax/sigmoid is head k's prediction.

        Cosine heads give cosines in [−1, 1]; their margin loss trains softmax(s·z), so
        fusing the unscaled cosines would cap every probability near 1/C (0.55 at C = 7).
        Use this before :func:`~welde_det.welde.fuse`.
        """
        if len(logits_list) != self.num_components:
            raise ValueError(f"WELDEObjective has {self.num_components} components but got {len(logits_list)} "
                             "logit tensors")
        return [z if s == 1.0 else z * s for z, s in zip(logits_list, self.logit_scales)]

    def raw_weights(self) -> torch.Tensor:
        """w_k = softplus(θ_k) (differentiable)."""
        return F.softplus(self.theta)

    def effective_weights(self) -> torch.Tensor:
        """max(w_k, floor) with a straight-through gradient; 1/K (constant) during warm-up."""
        return self._effective_weights(int(self.num_steps))

    def _effective_weights(self, steps: int) -> torch.Tensor:
        """:meth:`effective_weights` at a step count the caller already holds on the host."""
        if steps <= self.warmup_steps:
            return torch.full_like(self.theta, 1.0 / self.num_components)
        w = self.raw_weights()
        return w + (w.clamp_min(self.weight_floor) - w).detach()

    @torch.no_grad()
    def fusion_weights(self) -> torch.Tensor:
        """ŵ = w / Σ w of the effective weights (detached), for :func:`welde_det.welde.fuse`."""
        w = self.effective_weights().detach()
        return w / w.sum()

    def ema_estimate(self) -> torch.Tensor:
        """Bias-corrected EMA m̂_k (zeros before the first step)."""
        t = int(self.num_steps)
        if t == 0:
            return torch.zeros_like(self.ema)
        return self.ema / (1.0 - self.ema_momentum**t)

    def forward(self, logits_list: Sequence[torch.Tensor], target: torch.Tensor, **loss_kwargs) -> dict[str, torch.Tensor]:
        """Compute the objective.

        Args:
            logits_list: K logit tensors (N, C), one per head, in component order.
            target: the targets every component loss takes (integer or soft).
            **loss_kwargs: passed to every component (e.g. ``normalizer=`` for sigmoid losses).

        Returns:
            ``loss`` (differentiable total) and detached scalars ``loss_<name>``,
            ``norm_<name>``, ``weight_<name>``, ``diversity``, ``penalty``.
        """
        k = self.num_components
        if len(logits_list) != k:
            raise ValueError(f"WELDEObjective has {k} components {list(self.names)} but got {len(logits_list)} logit tensors")
        raw = torch.stack([loss(z, target, **loss_kwargs).float() for loss, z in zip(self.losses, logits_list)])
        detached = raw.detach()
        # One host transfer per step for both the finiteness check and the step counter.
        finite, steps = torch.stack([torch.isfinite(detached).all().to(self.num_steps.dtype), self.num_steps]).tolist()
        if not finite:
            bad = [n for n, v in zip(self.names, detached.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(f"WELDE component loss(es) {bad} are not finite: {detached.tolist()}")
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.ema.mul_(self.ema_momentum).add_((1 - self.ema_momentum) * detached)
                self.num_steps.add_(1)
            steps += 1
        if self.normalize:
            m_hat = detached if steps == 0 else self.ema / (1.0 - self.ema_momentum**steps)
            normed = raw / (m_hat + 1e-8)
        else:
            normed = raw
        w = self._effective_weights(steps)
        penalty = self.sum_penalty * (w.sum() - 1.0) ** 2
        div = self._diversity(logits_list, target) if self.diversity > 0 and k > 1 else raw.new_zeros(())
        total = (w * normed).sum() + penalty - self.diversity * div
        out: dict[str, torch.Tensor] = {"loss": total}
        for name, r, n, wk in zip(self.names, detached.unbind(), normed.detach().unbind(), w.detach().unbind()):
            out[f"loss_{name}"] = r
            out[f"norm_{name}"] = n
            out[f"weight_{name}"] = wk
        out["diversity"] = div.detach()
        out["penalty"] = penalty.detach()
        return out

    def _diversity(self, logits_list: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        z = torch.stack([t.float() for t in self.predictive_logits(logits_list)])  # (K, N, C)
        if self.activation == "softmax":
            if z.shape[1] == 0:
                return z.sum() * 0
            # Softmax over the classes with the classes on a middle axis, (K, C, N): CPU
            # kernels are several times faster there than along a short last axis.
            return _js_stacked(z.transpose(1, 2).contiguous().softmax(1), "softmax", class_dim=1)
        c = z.shape[2]
        if target.dtype.is_floating_point:
            fg = target.max(1).values > 0
        else:
            fg = (target >= 0) & (target < c)
        p = z[:, fg].sigmoid()
        if p.shape[1] == 0:
            return p.sum() * 0
        return _js_stacked(p, "sigmoid", class_dim=-1)

    def extra_repr(self) -> str:
        return (
            f"components={list(self.names)}, ema_momentum={self.ema_momentum}, sum_penalty={self.sum_penalty}, "
            f"diversity={self.diversity}, weight_floor={self.weight_floor}, warmup_steps={self.warmup_steps}, "
            f"activation={self.activation!r}, normalize={self.normalize}"
        )


def single_loss_objective(name: str, loss: nn.Module) -> WELDEObjective:
    """A K = 1 objective that returns exactly ``loss`` (no EMA, penalty, diversity): baselines."""
    return WELDEObjective([(name, loss)], diversity=0.0, sum_penalty=0.0, warmup_steps=2**62, weight_floor=0.0,
                          normalize=False)
