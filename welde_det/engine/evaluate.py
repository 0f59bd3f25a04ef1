"""Evaluation entry points used by ``tools/evaluate.py`` and by the trainers.

:func:`write_detection_report` evaluates detections against COCO ground truth with the
pycocotools-exact evaluator and writes ``report.json``, ``report.md`` and plots.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from welde_det.classes import ClassStats
from welde_det.evaluation import evaluate_coco
from welde_det.evaluation.report import write_report

__all__ = ["write_detection_report"]

logger = logging.getLogger(__name__)


def write_detection_report(
    gt: str | os.PathLike | dict,
    detections: Any,
    out_dir: str | os.PathLike,
    *,
    class_stats: ClassStats | str | os.PathLike | None = None,
    compare: Any = None,
    compare_label: str = "baseline",
    label: str = "this run",
    title: str = "",
    device: str | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate and write a report folder.

    Args:
        gt: COCO ground truth (dict or path).
        detections: COCO results (list, path, or dict of arrays).
        out_dir: report folder (created).
        class_stats: the training split's ClassStats (or its JSON path) for the tail set.
        compare: detections of a second run (same forms) to put beside this one.
        compare_label, label: column names of the two runs.
        title: report title.
        device: evaluation device (default CUDA when available).
        plots: write the PNG plots.

    Returns:
        The ``evaluate_coco`` result of ``detections`` (with ``report_dir`` added).
    """
    if class_stats is not None and not isinstance(class_stats, ClassStats):
        class_stats = ClassStats.load(class_stats)
    result = evaluate_coco(gt, detections, class_stats=class_stats, device=device)
    other = evaluate_coco(gt, compare, class_stats=class_stats, device=device) if compare is not None else None
    out = write_report(result, out_dir, title=title, label=label, compare=other, compare_label=compare_label,
                       plots=plots)
    logger.info("mAP %.3f  mAP_tail %.3f  (tail: %s) -> %s", result["stats"][0], result["map_tail"],
                ", ".join(result["tail_classes"]), out)
    result["report_dir"] = str(Path(out))
    return result
