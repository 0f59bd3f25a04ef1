"""Evaluation entry points used by ``tools/evaluate.py`` and by the trainers.

:func:`write_detection_report` evaluates detections against COCO ground truth with the
pycocotools-exact evaluator and writes ``report.json``, ``report.md`` and plots.

Inputs are checked before anything is computed or written: the ground truth is read once
(:func:`read_ground_truth`: a JSON object whose ``images`` and ``categories`` carry integer
ids; the evaluator checks the rest, pycocotools-style, so ground truth written by other
tools without ``file_name`` or image sizes is accepted), the detections (and ``compare``)
with :func:`load_detections`: a detection for an image or a category that is not in the ground
truth, or with a non-finite or negative box or score, is a
:class:`~welde_det.datasets.coco.CocoResultsError` naming the detections file and the
offending ids, never silently scored or dropped. ``device`` is checked with
:func:`eval_device` (a CUDA device on a machine without one is a ``DeviceError``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.classes import ClassStats
from welde_det.datasets.coco import CocoFormatError, CocoResultsError, load_coco
from welde_det.datasets.resolve import DataError
from welde_det.engine.config import ConfigError
from welde_det.errors import UserError
from welde_det.evaluation import DetectionArrays, evaluate_coco
from welde_det.evaluation.report import detection_analysis, write_report
from welde_det.utils.device import check_device

__all__ = [
    "eval_device",
    "evaluate_checkpoint",
    "load_detections",
    "predict_split",
    "private_ground_truth",
    "read_ground_truth",
    "write_detection_report",
]

logger = logging.getLogger(__name__)

#: how many offending ids or detection indices an error message lists (their count is given too)
_SHOWN = 8


def eval_device(device: str | None, *, flag: str = "--device") -> str | None:
    """Check an evaluation device string before any work is done (:func:`welde_det.utils.device.check_device`).

    Raises:
        DeviceError: an unknown device, or a CUDA device that this machine does not have.
    """
    return check_device(device, flag=flag)


def read_ground_truth(gt: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """COCO ground truth for evaluation (a dict or JSON path) and the name errors give it.

    Only what the detections are checked against is checked here: a JSON object with
    ``images``, ``annotations`` and ``categories`` lists, and integer ``id`` s on every image
    and category. The evaluator checks the annotations.

    Raises:
        FileNotFoundError: no such file.
        CocoFormatError: not valid JSON, or the structure above is broken (file and entry named).
    """
    from welde_det.utils.fileio import load_json

    if isinstance(gt, (str, os.PathLike)):
        source = str(gt)
        try:
            data = load_json(gt)
        except UserError:
            raise
        except ValueError as exc:
            raise CocoFormatError(str(exc)) from exc
    else:
        source, data = "<ground-truth dict>", gt
    if not isinstance(data, Mapping):
        raise CocoFormatError(f"{source}: COCO ground truth must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{source}: COCO ground truth has no {key!r} list")
    for key in ("images", "categories"):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, Mapping) or isinstance(entry.get("id"), bool) or not isinstance(
                    entry.get("id"), int):
                raise CocoFormatError(f"{source}: {key}[{i}] needs an integer 'id': {entry!r}")
    return dict(data), source


def _listed(values: Any) -> str:
    values = list(values)
    head = ", ".join(str(v) for v in values[:_SHOWN])
    return f"{head}, ..." if len(values) > _SHOWN else head


def load_detections(detections: Any, gt: Mapping[str, Any], *, name: str = "detections",
                    gt_source: str = "the ground truth") -> DetectionArrays:
    """Read COCO results and check them against their ground truth.

    Args:
        detections: a COCO results JSON path, a list of result dicts, a dict of arrays or
            a :class:`~welde_det.evaluation.DetectionArrays`.
        gt: the COCO ground truth (:func:`read_ground_truth`).
        name: what the detections are, for messages when they are not a file.
        gt_source: the ground truth's name (its file) for messages.

    Returns:
        The detections as arrays.

    Raises:
        FileNotFoundError: the file does not exist.
        CocoResultsError: malformed results, a non-finite or negative box or score, or an
            ``image_id`` / ``category_id`` that the ground truth does not have (the file,
            the first few ids and their count named).
    """
    source = str(detections) if isinstance(detections, (str, os.PathLike)) else f"<{name}>"
    try:
        d = DetectionArrays.from_any(detections)
    except UserError:
        raise
    except ValueError as exc:
        raise CocoResultsError(f"{source}: {exc}") from exc
    n = len(d.score)
    bad = ~(np.isfinite(d.bbox).all(1) & np.isfinite(d.score))
    if bad.any():
        idx = np.nonzero(bad)[0]
        raise CocoResultsError(f"{source}: {len(idx)} detection(s) have a NaN or infinite bbox or score (detection "
                               f"index {_listed(idx.tolist())}); every bbox value and score must be a finite number")
    bad = (d.bbox[:, 2:] < 0).any(1) if n else np.zeros(0, bool)
    if bad.any():
        idx = np.nonzero(bad)[0]
        raise CocoResultsError(f"{source}: {len(idx)} detection(s) have a negative width or height (detection index "
                               f"{_listed(idx.tolist())}); COCO results boxes are [x, y, w, h] with w, h >= 0")
    for field, key, known in (("image_id", "images", {int(i["id"]) for i in gt["images"]}),
                              ("category_id", "categories", {int(c["id"]) for c in gt["categories"]})):
        values = getattr(d, field)
        unknown = ~np.isin(values, np.fromiter(known, np.int64, len(known)))
        if unknown.any():
            ids = np.unique(values[unknown]).tolist()
            raise CocoResultsError(
                f"{source}: {int(unknown.sum())} detection(s) name {field} {_listed(ids)} ({len(ids)} distinct), "
                f"which the {key} of {gt_source} do not have; evaluate against the ground truth the detections "
                "were made on"
            )
    return d


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

    Raises:
        CocoFormatError: malformed ground truth (the file and entry named).
        CocoResultsError: detections (or ``compare``) for images or categories the ground
            truth does not have, or non-finite boxes/scores (the file and ids named).
        DeviceError: a ``device`` that is not available here.
        ConfigError: a ``class_stats`` file that is not a ClassStats JSON.
        FileNotFoundError: a missing input file.

        All of them before anything is written to ``out_dir``.
    """
    device = eval_device(device)
    gt, gt_source = read_ground_truth(gt)  # read once
    if class_stats is not None and not isinstance(class_stats, ClassStats):
        try:
            class_stats = ClassStats.load(class_stats)
        except UserError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{class_stats}: not a ClassStats JSON ({exc}); pass the class_stats.json "
                              "a training run wrote") from exc
    detections = load_detections(detections, gt, gt_source=gt_source)  # read once
    compare = load_detections(compare, gt, name="compare", gt_source=gt_source) if compare is not None else None
    try:
        result = evaluate_coco(gt, detections, class_stats=class_stats, device=device)
        other = evaluate_coco(gt, compare, class_stats=class_stats, device=device) if compare is not None else None
    except UserError:
        raise
    except ValueError as exc:  # the evaluator's own checks of the ground truth's annotations
        raise CocoFormatError(str(exc).replace("<ground-truth dict>", gt_source)) from exc
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
        DataError: the detector's classes are not the split's (by name and order).
    """
    from welde_det.engine.infer import read_input
    from welde_det.utils.logging import progress_enabled

    gt = load_coco(coco)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    if names != list(detector.names):
        raise DataError(f"the checkpoint was trained on {list(detector.names)}, the data has {names}: "
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
    keep_names: bool = False,
) -> dict[str, Any]:
    """Run a checkpoint over one split of any supported layout and write the full report.

    Writes ``detections.json`` (COCO results), ``ground_truth.json`` (the COCO ground truth
    used, pseudonymised by :func:`private_ground_truth`: images named ``<index>.<ext>`` in
    image-id order, technical fields only, categories named as the data names them),
    ``report.json``, ``report.md``, ``per_image.csv`` and plots into ``out_dir``. No output
    names a file of the user's data or holds an absolute path; ``keep_names`` also writes
    ``names.csv`` (``name,input``: each index name and its image's path relative to the
    data folder) — the one file that names the inputs.

    Args:
        weights: a welde_det detector checkpoint (a run's ``weights/model.pt``).
        data: the phantom is not accepted here; a COCO folder, ``tools/convert.py`` output or
            a YOLO folder / ``data.yaml``.
        split: the split to measure.
        conf: score threshold of the kept detections (0.001: the full PR curve).
        batch: slices per forward pass.
        device: ``cpu``, ``cuda``... (default CUDA when available).
        plots: write the PNG plots.
        keep_names: also write ``names.csv`` mapping the index names to the data's images.

    Returns:
        The evaluation result (see :func:`welde_det.evaluation.evaluate_coco`).

    Raises:
        DeviceError: a ``device`` that is not available here.
        DataError: a data source that cannot be resolved, or no such split.
    """
    import tempfile

    from welde_det.datasets.resolve import resolve_data
    from welde_det.integrations.registry import load_detector
    from welde_det.utils.fileio import atomic_write_json, atomic_write_text

    device = eval_device(device)
    detector = load_detector(weights, device)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="welde_eval_") as work:
        resolved = resolve_data(data, Path(work), names=None)
        if split not in resolved.splits:
            raise DataError(f"{data}: no {split!r} split (found {sorted(resolved.splits)}); pass --split one of them")
        gt_path, root = resolved.splits[split], resolved.image_roots[split]
        dets, gt = predict_split(detector, gt_path, root, conf=conf, batch=batch)
    gt, originals = private_ground_truth(gt)  # reports, per_image.csv and the worst slices name indices only
    atomic_write_json(out / "detections.json", dets)
    atomic_write_json(out / "ground_truth.json", gt)
    if keep_names:
        base = Path(data).absolute()
        base = base.parent if base.is_file() else base
        atomic_write_text(out / NAMES_FILE, _names_csv(gt, originals, Path(root).absolute(), base))
    chosen = _selection_of(weights)
    return write_detection_report(gt, dets, out, class_stats=detector.class_stats, device=device, plots=plots,
                                  title=f"{Path(weights).name} ({detector.framework}) on the {split} split",
                                  selection=f"selected on {chosen}; measured on the {split} split")


def private_ground_truth(gt: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``gt`` as an output may show it: nothing of the user's file or folder names.

    The same pseudonymisation as a run's private view
    (:func:`welde_det.engine.run.private_image_view`): images named ``<index>.<ext>`` (1-based,
    six digits, in image-id order, the extension lower-cased), only the technical image
    and annotation fields, the patient grouping (when every image has one) as ``"g<k>"``.
    Image, annotation and category ids are kept, so detections refer to it unchanged.

    Returns:
        ``(private gt, {index name: original file_name})``.
    """
    from welde_det.datasets.resolve import image_group
    from welde_det.engine.stages import KEPT_ANN_FIELDS, KEPT_IMAGE_FIELDS

    try:
        group_of = image_group(gt)
    except DataError:
        group_of = {}
    groups: dict[Any, str] = {}
    originals: dict[str, str] = {}
    images = []
    for img in sorted(gt["images"], key=lambda im: int(im["id"])):
        name = f"{len(originals) + 1:06d}{Path(str(img.get('file_name', ''))).suffix.lower()}"
        originals[name] = str(img.get("file_name", ""))
        entry = {k: img[k] for k in KEPT_IMAGE_FIELDS if k in img}
        entry["file_name"] = name
        if img["id"] in group_of:
            entry["patient_id"] = groups.setdefault(group_of[img["id"]], f"g{len(groups) + 1}")
        images.append(entry)
    anns = [{k: a[k] for k in KEPT_ANN_FIELDS if k in a} for a in gt["annotations"]]
    cats = [{k: c[k] for k in ("id", "name", "supercategory") if k in c} for c in gt["categories"]]
    return {"images": images, "annotations": anns, "categories": cats}, originals


#: with ``keep_names``: index name -> the data's image (the one output that names the user's files)
NAMES_FILE = "names.csv"


def _names_csv(gt: Mapping[str, Any], originals: Mapping[str, str], root: Path, base: Path) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "input"])
    for img in gt["images"]:
        path = root / originals[img["file_name"]]
        writer.writerow([img["file_name"], Path(os.path.relpath(path, base)).as_posix()])
    return buf.getvalue()


def _selection_of(weights: str | os.PathLike) -> str:
    """What chose a checkpoint's weights, from its saved config."""
    from welde_det.checkpoint import read_metadata

    meta = read_metadata(weights) or {}
    train = (meta.get("config") or {}).get("train", {})
    select = train.get("select", "last")
    from welde_det.engine.stages import selection_label

    return selection_label(None if select == "last" else select, train.get("select_fraction"))
