"""Inference-time fusion of the K heads: p = Σ_k ŵ_k·p_k with ŵ = w / Σ w (METHOD.md §3).

The fused probabilities feed NMS and AP ranking. Softmax heads fuse into a distribution
over classes; sigmoid heads fuse per class into [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fuse", "normalised_weights"]


def normalised_weights(weights: torch.Tensor | Sequence[float] | None, k: int, *, like: torch.Tensor) -> torch.Tensor:
    """ŵ = w / Σ w as a tensor on ``like``'s device (uniform 1/K when ``weights`` is None)."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float32, device=like.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=like.device).reshape(-1)
    if w.numel() != k:
        raise ValueError(f"fuse: {w.numel()} weights for {k} heads")
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise ValueError(f"fuse: weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def fuse(
    logits_list: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float] | None = None,
    activation: str = "softmax",
    dim: int = 1,
) -> torch.Tensor:
    """Weighted fusion of the heads' probabilities.

    Args:
        logits_list: K logit tensors of one shape.
        weights: K non-negative weights (normalised here); None = 1/K each.
        activation: ``"softmax"`` (over ``dim``) or ``"sigmoid"`` (element-wise).
        dim: the class dimension for softmax.

    Returns:
        Probabilities with the logits' shape (float32 or wider).

    Example:
        >>> p = fuse([torch.zeros(2, 3), torch.ones(2, 3)], [0.5, 0.5])
        >>> p.sum(1)
        tensor([1., 1.])
    """
    if not logits_list:
        raise ValueError("fuse needs at least one logit tensor")
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"fuse activation must be 'softmax' or 'sigmoid', got {activation!r}")
    shape = logits_list[0].shape
    if any(t.shape != shape for t in logits_list):
        raise ValueError(f"fuse: heads disagree on shape {[tuple(t.shape) for t in logits_list]}")
    w = normalised_weights(weights, len(logits_list), like=logits_list[0])
    stacked = torch.stack([t.float() for t in logits_list])
    probs = stacked.softmax(dim + 1 if dim >= 0 else dim) if activation == "softmax" else stacked.sigmoid()
    return torch.tensordot(w, probs, dims=1)
