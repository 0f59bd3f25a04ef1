"""Metrics: the COCO-exact detection evaluator and classification metrics (METHOD.md §4).

``evaluate_coco(gt, detections, *, class_stats=None, device=None)`` is the public entry
point; plotting and reports live in :mod:`welde_det.evaluation.report` (imported lazily,
so importing this package does not import matplotlib).
"""

from __future__ import annotations

from welde_det.evaluation.coco_eval import (
    CocoEvaluator,
    DetectionArrays,
    evaluate_coco,
    summary_lines,
)

__all__ = ["CocoEvaluator", "DetectionArrays", "classification_metrics", "evaluate_coco", "summary_lines"]
