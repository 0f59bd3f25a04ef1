"""Classification metrics of the LMF, Scholz et al. and WELDE papers (METHOD.md §4).

Accuracy, macro precision / recall / F1, per-class precision / recall / F1, balanced
accuracy, multi-class MCC (Gorodkin's R_K, as ``sklearn.metrics.matthews_corrcoef``),
one-vs-rest average precision per class (the step-wise AP of
``sklearn.metrics.average_precision_score``: Σ_n (R_n − R_{n−1}) P_n), their mean (mAP) and
the mean over the tail classes (mAP_tail, the WELDE paper's DermaMNIST metric).
Classes absent from ``y_true`` get AP −1 and are left out of the means (reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from welde_det.classes import ClassStats

__all__ = ["average_precision_ovr", "classification_metrics", "confusion"]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """C×C counts, rows = true class, columns = predicted."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def average_precision_ovr(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class one-vs-rest AP (−1 where a class has no positives). scores (N, C)."""
    n, c = scores.shape
    out = np.full(c, -1.0)
    for k in range(c):
        pos = y_true == k
        if not pos.any():
            continue
        order = np.argsort(-scores[:, k], kind="mergesort")
        s = scores[order, k]
        p = pos[order]
        # thresholds at distinct scores (ties are one step, as in sklearn)
        last = np.r_[np.nonzero(np.diff(s))[0], n - 1]
        tp = np.cumsum(p)[last]
        fp = (last + 1) - tp
        precision = tp / (tp + fp)
        recall = tp / pos.sum()
        out[k] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    *,
    class_stats: ClassStats | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All classification metrics from labels and predicted probabilities.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) class probabilities (or scores; argmax is the prediction).
        class_stats: training ClassStats for the tail set (default: derived from ``y_true``).
        names: class names (default from ``class_stats`` or ``class<k>``).

    Raises:
        ValueError: shapes that disagree, or labels outside 0..C-1.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]}, got {p.shape}")
    c = p.shape[1]
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in 0..{c - 1}, got min {y.min()} max {y.max()}")
    names = list(names or (class_stats.names if class_stats else [f"class{k}" for k in range(c)]))
    pred = p.argmax(1)
    cm = confusion(y, pred, c)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        rec = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    present = support > 0
    # MCC (Gorodkin), as sklearn
    t_k, p_k, n_total, correct = support, predicted, cm.sum(), np.trace(cm)
    cov_ytyp = correct * n_total - float(np.dot(t_k, p_k))
    cov_ypyp = n_total**2 - float(np.dot(p_k, p_k))
    cov_ytyt = n_total**2 - float(np.dot(t_k, t_k))
    mcc = cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp) if cov_ytyt * cov_ypyp > 0 else 0.0
    ap = average_precision_ovr(y, p)
    if class_stats is None:
        counts = np.bincount(y, minlength=c)
        class_stats = ClassStats(names, counts.tolist(), floor=1)
    tail = [k for k in class_stats.tail if ap[k] > -1]
    return {
        "accuracy": float(correct / n_total) if n_total else 0.0,
        "balanced_accuracy": float(rec[present].mean()) if present.any() else 0.0,
        "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()),
        "macro_f1": float(f1.mean()),
        "mcc": float(mcc),
        "per_class_precision": prec.tolist(),
        "per_class_recall": rec.tolist(),
        "per_class_f1": f1.tolist(),
        "per_class_ap": ap.tolist(),
        "map": float(ap[ap > -1].mean()) if (ap > -1).any() else -1.0,
        "map_tail": float(np.mean(ap[tail])) if tail else -1.0,
        "tail_classes": [names[k] for k in class_stats.tail],
        "tail_rule": class_stats.tail_rule,
        "tail_excluded": [names[k] for k in class_stats.tail if ap[k] == -1],
        "support": support.astype(int).tolist(),
        "confusion": cm.tolist(),
        "class_names": names,
    }
