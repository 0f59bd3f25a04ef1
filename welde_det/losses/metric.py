"""Differentiable F1 and MCC losses and their CE combinations (Scholz et al., MIDL 2024).

Soft confusion counts per class c, with p the predicted probabilities (softmax, or
sigmoid in the dense family) and y the one-hot targets::

    TP_c = Σ_i p_ic y_ic      FP_c = Σ_i p_ic (1 − y_ic)
    FN_c = Σ_i (1 − p_ic) y_ic   TN_c = Σ_i (1 − p_ic)(1 − y_ic)

``soft_f1`` = 1 − mean_c 2TP/(2TP + FP + FN + ε); ``soft_mcc`` = 1 − mean_c MCC_c with
MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN) + ε); ``ce_f1`` / ``ce_mcc`` =
CE + λ·(metric loss). These are batch-level losses: they are not a mean over samples, and
small batches give noisy counts (Scholz et al. pair them with class-aware sampling).
In the dense family, background rows (integer target −1 or C, or all-zero soft targets)
count as negatives for every class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from welde_det.losses._common import ClassLoss, dense_targets
from welde_det.losses.registry import register_loss

__all__ = ["SoftF1Loss", "SoftMCCLoss", "soft_confusion", "soft_f1_score", "soft_mcc_score"]


def soft_confusion(probs: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Soft TP, FP, FN, TN per class, each shape (C,)."""
    tp = (probs * onehot).sum(0)
    p_sum = probs.sum(0)
    y_sum = onehot.sum(0)
    fp = p_sum - tp
    fn = y_sum - tp
    tn = probs.shape[0] - p_sum - y_sum + tp
    return tp, fp, fn, tn


def soft_f1_score(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-class soft F1, shape (C,)."""
    tp, fp, fn, _ = soft_confusion(probs, onehot)
    return 2 * tp / (2 * tp + fp + fn + eps)


def soft_mcc_score(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-class one-vs-rest soft MCC, shape (C,)."""
    tp, fp, fn, tn = soft_confusion(probs, onehot)
    return (tp * tn - fp * fn) / torch.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) + eps)


class _MetricLoss(ClassLoss):
    score = staticmethod(soft_f1_score)

    def __init__(self, class_counts=None, *, eps: float = 1e-7, ce_weight: float = 0.0, lam: float = 1.0,
                 validate: bool = True) -> None:
        super().__init__(class_counts, validate=validate)
        self.eps, self.ce_weight, self.lam = float(eps), float(ce_weight), float(lam)

    def _probs_targets(self, logits, target):
        if self.activation == "softmax":
            return logits.softmax(1), F.one_hot(target, logits.shape[1]).float()
        return logits.sigmoid(), dense_targets(target, logits.shape[1])

    def _base(self, logits, target, normalizer):
        if self.activation == "softmax":
            return F.cross_entropy(logits, target)
        t = dense_targets(target, logits.shape[1])
        norm = logits.shape[0] if normalizer is None else normalizer
        return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / norm

    def _loss(self, logits, target, normalizer=None):
        probs, onehot = self._probs_targets(logits, target)
        metric = 1.0 - self.score(probs, onehot, self.eps).mean()
        if self.ce_weight == 0.0:
            return metric
        return self._base(logits, target, normalizer) + self.lam * metric


def _metric_family(name: str, score, activation: str, with_ce: bool):
    doc_metric = "F1" if score is soft_f1_score else "MCC"

    class Loss(_MetricLoss):
        __doc__ = (
            f"{'CE + λ·' if with_ce else ''}(1 − mean_c soft {doc_metric}_c), {activation} probabilities "
            "(see the module docstring for the counts).\n\n    Args:\n        eps: ε in the denominator.\n"
            + ("        lam: λ, the weight of the metric term.\n" if with_ce else "")
        )

        def __init__(self, class_counts=None, *, eps: float = 1e-7, validate: bool = True, **kw) -> None:
            lam = kw.pop("lam", 1.0)
            if kw:
                raise ValueError(f"{name}: unknown argument(s) {sorted(kw)}")
            if not with_ce and lam != 1.0:
                raise ValueError(f"{name} has no CE term; 'lam' applies to ce_f1 / ce_mcc")
            super().__init__(class_counts, eps=eps, ce_weight=1.0 if with_ce else 0.0, lam=lam, validate=validate)

    Loss.activation = activation
    Loss.score = staticmethod(score)
    Loss.__name__ = Loss.__qualname__ = (
        ("CE" if with_ce else "Soft") + doc_metric + ("Loss" if activation == "softmax" else "DenseLoss")
    )
    return register_loss(name, activation=activation)(Loss)


SoftF1Loss = _metric_family("soft_f1", soft_f1_score, "softmax", False)
SoftMCCLoss = _metric_family("soft_mcc", soft_mcc_score, "softmax", False)
CEF1Loss = _metric_family("ce_f1", soft_f1_score, "softmax", True)
CEMCCLoss = _metric_family("ce_mcc", soft_mcc_score, "softmax", True)
SoftF1DenseLoss = _metric_family("soft_f1", soft_f1_score, "sigmoid", False)
SoftMCCDenseLoss = _metric_family("soft_mcc", soft_mcc_score, "sigmoid", False)
CEF1DenseLoss = _metric_family("ce_f1", soft_f1_score, "sigmoid", True)
CEMCCDenseLoss = _metric_family("ce_mcc", soft_mcc_score, "sigmoid", True)
