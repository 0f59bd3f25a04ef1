"""Metrics: the COCO-exact detection evaluator, its analyses, and classification metrics (METHOD.md §4).

``evaluate_coco(gt, detections, *, class_stats=None, device=None)`` is the public entry
point. Built on one matching (:func:`match_detections`): per-image counts
(:mod:`~welde_det.evaluation.per_image`), bootstrap intervals and paired differences
(:mod:`~welde_det.evaluation.intervals`), FROC (:mod:`~welde_det.evaluation.froc`) and
TIDE-style error analysis with the GT co-location table (:mod:`~welde_det.evaluation.errors`).
Plotting and reports live in :mod:`welde_det.evaluation.report` (matplotlib is imported
only when plotting, so importing this package does not import it).
"""

from __future__ import annotations

from welde_det.evaluation.classification import classification_metrics
from welde_det.evaluation.coco_eval import (
    CocoEvaluator,
    DetectionArrays,
    evaluate_coco,
    summary_lines,
)
from welde_det.evaluation.errors import ERROR_TYPES, colocation_table, tide_errors
from welde_det.evaluation.froc import FROC_RATES, froc_analysis
from welde_det.evaluation.intervals import bootstrap_difference, bootstrap_metrics
from welde_det.evaluation.per_image import (
    Matching,
    match_detections,
    per_image_counts,
    worst_slices,
    write_per_image_csv,
)

__all__ = [
    "ERROR_TYPES",
    "FROC_RATES",
    "CocoEvaluator",
    "DetectionArrays",
    "Matching",
    "bootstrap_difference",
    "bootstrap_metrics",
    "classification_metrics",
    "colocation_table",
    "evaluate_coco",
    "froc_analysis",
    "match_detections",
    "per_image_counts",
    "summary_lines",
    "tide_errors",
    "worst_slices",
    "write_per_image_csv",
]
