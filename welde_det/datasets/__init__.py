"""Datasets: COCO JSON as the one internal format, YOLO export, converters and splits.

``coco`` reads, validates and writes COCO detection files and exports YOLO folders;
``splits`` makes patient-level stratified train/val/test splits; ``resolve`` turns every
supported layout into COCO splits (:func:`resolve_data`), builds Ultralytics' view of them
(:func:`yolo_view`) and carves selection splits (:func:`carve_split`); ``sources`` converts
public archives and label formats (YOLO folders, RSNA 2024 lumbar, NIfTI masks, box
tables) to COCO. Nothing here imports a detection model.
"""

from __future__ import annotations

from welde_det.datasets.coco import (
    CocoFormatError,
    YoloFormatError,
    coco_to_yolo,
    load_coco,
    make_annotation,
    make_categories,
    make_image_entry,
    save_coco,
    validate_coco,
    yolo_to_coco,
)
from welde_det.datasets.resolve import (
    DataError,
    ResolvedData,
    carve_split,
    resolve_data,
    yolo_view,
)
from welde_det.datasets.splits import (
    SplitError,
    split_coco,
    split_image_ids,
    split_summary,
    subset_coco,
)

__all__ = [
    "CocoFormatError",
    "DataError",
    "ResolvedData",
    "SplitError",
    "YoloFormatError",
    "carve_split",
    "coco_to_yolo",
    "load_coco",
    "make_annotation",
    "make_categories",
    "make_image_entry",
    "resolve_data",
    "save_coco",
    "split_coco",
    "split_image_ids",
    "split_summary",
    "subset_coco",
    "validate_coco",
    "yolo_to_coco",
    "yolo_view",
]
