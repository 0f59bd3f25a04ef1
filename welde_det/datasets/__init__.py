"""Datasets: COCO JSON as the one internal format, YOLO export, converters and splits.

``coco`` reads, validates and writes COCO detection files and exports YOLO folders;
``splits`` makes patient-level stratified train/val/test splits; ``sources`` converts
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
from welde_det.datasets.splits import (
    SplitError,
    split_coco,
    split_image_ids,
    split_summary,
    subset_coco,
)

__all__ = [
    "CocoFormatError",
    "SplitError",
    "YoloFormatError",
    "coco_to_yolo",
    "load_coco",
    "make_annotation",
    "make_categories",
    "make_image_entry",
    "save_coco",
    "split_coco",
    "split_image_ids",
    "split_summary",
    "subset_coco",
    "validate_coco",
    "yolo_to_coco",
]
