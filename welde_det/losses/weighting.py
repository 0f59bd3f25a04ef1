"""Per-class weights and margins computed from training class counts.

Every function takes instance counts ``n_c`` (one per class, from
:class:`welde_det.classes.ClassStats`) and returns a float32 tensor of shape ``(C,)``.
These are public so that users can inspect what a loss will do before training.

Example:
    >>> ldam_margins([100, 10, 1], max_m=0.5)
    tensor([0.1581, 0.2812, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "bwcce_weights",
    "check_class_counts",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "ldam_margins",
]


def check_class_counts(counts: Sequence[int | float] | torch.Tensor | None, *, name: str = "loss") -> torch.Tensor | None:
    """Validate class counts and return them as a float64 CPU tensor (or None).

    Raises:
        ValueError: counts that are not a 1-D sequence, negative, non-finite or zero.
    """
    if counts is None:
        return None
    t = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
    if t.ndim != 1 or t.numel() < 1:
        raise ValueError(f"{name}: class_counts must be a 1-D sequence with one count per class, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: class_counts must be finite, got {t.tolist()}")
    if (t < 0).any():
        bad = [i for i, v in enumerate(t.tolist()) if v < 0]
        raise ValueError(f"{name}: class_counts must not be negative, got {t.tolist()} (classes {bad})")
    if (t == 0).any():
        bad = [i for i, v in enumerate(t.tolist()) if v == 0]
        raise ValueError(
            f"{name}: class(es) {bad} have zero training instances; a loss cannot weight a class "
            "it never sees. Build ClassStats with floor=1 (ClassStats.effective_counts) to substitute a minimum."
        )
    return t


def inverse_frequency_weights(counts: Sequence[int | float] | torch.Tensor) -> torch.Tensor:
    """w_c = (N_total / n_c) / C — weighted CE's inverse-frequency weights (METHOD.md §2)."""
    n = check_class_counts(counts, name="inverse_frequency_weights")
    return ((n.sum() / n) / n.numel()).float()


def bwcce_weights(counts: Sequence[int | float] | torch.Tensor) -> torch.Tensor:
    """w_c = (1 / (C − 1)) · (1 − n_c / Σ n) — the LMF paper's Eq. 3 (needs C ≥ 2)."""
    n = check_class_counts(counts, name="bwcce_weights")
    if n.numel() < 2:
        raise ValueError("bwcce_weights needs at least two classes")
    return ((1.0 - n / n.sum()) / (n.numel() - 1)).float()


def class_balanced_weights(counts: Sequence[int | float] | torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al.'s effective-number weights w_c = (1 − β) / (1 − β^{n_c}), rescaled so Σ_c w_c = C.

    Args:
        counts: instance counts per class.
        beta: in [0, 1); β → 1 approaches inverse frequency, β = 0 gives uniform weights.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class_balanced_weights: beta must be in [0, 1), got {beta}")
    n = check_class_counts(counts, name="class_balanced_weights")
    effective = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)
    w = (1.0 - beta) / effective
    return (w / w.sum() * n.numel()).float()


def ldam_margins(counts: Sequence[int | float] | torch.Tensor, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins Δ_c = max_m · n_c^{−1/4} / max_j n_j^{−1/4} (the rarest class gets ``max_m``)."""
    if max_m < 0:
        raise ValueError(f"ldam_margins: max_m must be >= 0, got {max_m}")
    n = check_class_counts(counts, name="ldam_margins")
    m = n.pow(-0.25)
    return (m * (max_m / m.max())).float()
