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
from welde_det.evaluation import DetectionArrays, evaluate_coco
from welde_det.evaluation.report import detection_analysis, write_report

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
    selection: str | None = None,
    analysis: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
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
        selection: what chose the model and what measures it (``"selected on …; measured on …"``),
            printed at the top of the report.
        analysis: add bootstrap intervals, TIDE errors, FROC, per-image counts, the worst
            slices, GT co-location and (with ``compare``) the paired difference.
        n_resamples, seed: bootstrap resamples and seed.

    Returns:
        The ``evaluate_coco`` result of ``detections`` (with ``report_dir`` added, and
        ``analysis``: :func:`~welde_det.evaluation.report.detection_analysis`'s output).
    """
    if class_stats is not None and not isinstance(class_stats, ClassStats):
        class_stats = ClassStats.load(class_stats)
    detections = DetectionArrays.from_any(detections)  # read once; gt stays a path so errors name the file
    compare = DetectionArrays.from_any(compare) if compare is not None else None
    result = evaluate_coco(gt, detections, class_stats=class_stats, device=device)
    other = evaluate_coco(gt, compare, class_stats=class_stats, device=device) if compare is not None else None
    extra = (detection_analysis(gt, detections, result, compare=compare, n_resamples=n_resamples, seed=seed,
                                device=device) if analysis else None)
    out = write_report(result, out_dir, title=title, label=label, compare=other, compare_label=compare_label,
                       plots=plots, analysis=extra, selection=selection)
    if extra is not None:
        result["analysis"] = extra
    logger.info("mAP %.3f  mAP_tail %.3f  (tail: %s) -> %s", result["stats"][0], result["map_tail"],
                ", ".join(result["tail_classes"]), out)
    result["report_dir"] = str(Path(out))
    return result


# ----------------------------------------------------------------------------- checkpoints on a split
def predict_split(detector: Any, coco: str | os.PathLike | dict, image_root: str | os.PathLike, *,
                  conf: float = 0.001, batch: int = 16, progress: bool | None = None,
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """COCO results of ``detector`` on every image of a COCO split, and the ground truth they refer to.

    Images are read with :func:`welde_det.engine.infer.read_input` and predicted with
    :meth:`~welde_det.integrations.base.Detector.predict_batch` in batches of ``batch`` —
    exactly what ``tools/infer.py`` does — so both give the same detections. Category ids
    are the ground truth's own, matched by class name.

    Raises:
        ValueError: the detector's classes are not the split's (by name and order).
    """
    from welde_det.datasets.coco import load_coco
    from welde_det.engine.infer import read_input
    from welde_det.utils.logging import progress_enabled

    gt = load_coco(coco)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    if names != list(detector.names):
        raise ValueError(f"the checkpoint was trained on {list(detector.names)}, the data has {names}: "
                         "evaluate on data with the same classes in the same order")
    cat_id = [int(c["id"]) for c in cats]
    images = sorted(gt["images"], key=lambda im: im["id"])
    root = Path(image_root)
    dets: list[dict[str, Any]] = []
    progress = progress_enabled() if progress is None else progress
    steps = range(0, len(images), max(1, int(batch)))
    if progress and len(images) > batch:
        from tqdm import tqdm

        steps = tqdm(steps, desc="predicting", unit="batch", leave=False)
    for start in steps:
        chunk = images[start:start + max(1, int(batch))]
        arrays = [read_input(root / info["file_name"]).image for info in chunk]
        for info, rows in zip(chunk, detector.predict_batch(arrays, conf)):
            for d in rows:
                x1, y1, x2, y2 = d["bbox"]
                dets.append({"image_id": int(info["id"]), "category_id": cat_id[d["class_index"]],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(d["score"])})
    return dets, gt


def evaluate_checkpoint(
    weights: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "val",
    conf: float = 0.001,
    batch: int = 16,
    device: str | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Run a checkpoint over one split of any supported layout and write the full report.

    Writes ``detections.json`` (COCO results), ``ground_truth.json`` (the COCO ground truth
    used; ``file_name`` relative to the split's image folder, categories named as the data
    names them), ``report.json``, ``report.md`` and plots into ``out_dir``.

    Args:
        weights: a welde_det detector checkpoint (a run's ``weights/model.pt``).
        data: the phantom is not accepted here; a COCO folder, ``tools/convert.py`` output or
            a YOLO folder / ``data.yaml``.
        split: the split to measure.
        conf: score threshold of the kept detections (0.001: the full PR curve).
        batch: slices per forward pass.
        device: ``cpu``, ``cuda``... (default CUDA when available).

    Returns:
        The evaluation result (see :func:`welde_det.evaluation.evaluate_coco`).
    """
    import tempfile

    from welde_det.datasets.resolve import resolve_data
    from welde_det.integrations.registry import load_detector
    from welde_det.utils.fileio import atomic_write_json

    detector = load_detector(weights, device)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="welde_eval_") as work:
        resolved = resolve_data(data, Path(work), names=None)
        if split not in resolved.splits:
            raise ValueError(f"{data}: no {split!r} split (found {sorted(resolved.splits)})")
        gt_path, root = resolved.splits[split], resolved.image_roots[split]
        dets, gt = predict_split(detector, gt_path, root, conf=conf, batch=batch)
    atomic_write_json(out / "detections.json", dets)
    atomic_write_json(out / "ground_truth.json", gt)
    chosen = _selection_of(weights)
    return write_detection_report(gt, dets, out, class_stats=detector.class_stats, device=device, plots=plots,
                                  title=f"{Path(weights).name} ({detector.framework}) on the {split} split",
                                  selection=f"selected on {chosen}; measured on the {split} split")


def _selection_of(weights: str | os.PathLike) -> str:
    """What chose a checkpoint's weights, from its saved config."""
    from welde_det.checkpoint import read_metadata

    meta = read_metadata(weights) or {}
    train = (meta.get("config") or {}).get("train", {})
    select = train.get("select", "last")
    from welde_det.engine.stages import selection_label

    return selection_label(None if select == "last" else select, train.get("select_fraction"))
