"""Converters from public archives and label formats to our COCO dataset layout.

* :func:`convert_yolo_dir` - a YOLO folder (the public six-class lumbar set);
* :func:`convert_rsna_lsdc` - the RSNA 2024 lumbar spine archive (points -> mm boxes);
* :func:`convert_masks` - NIfTI label masks (e.g. SPIDER codes) -> mid-sagittal boxes;
* :func:`convert_boxes_table` - a CSV/JSON table of boxes per volume and slice.

All write the layout described in :mod:`welde_det.datasets.sources.common` and
``data/README.md``, pseudonymise every identifier with a key kept outside the dataset, and
leave nothing behind on failure.
"""

from __future__ import annotations

from welde_det.datasets.sources.boxes_csv import convert_boxes_table
from welde_det.datasets.sources.common import (
    ConversionError,
    ConversionResult,
    MissingColumnsError,
    UnknownClassError,
)
from welde_det.datasets.sources.masks import SPIDER_LABEL_MAP, convert_masks
from welde_det.datasets.sources.rsna_lsdc import convert_rsna_lsdc
from welde_det.datasets.sources.yolo_dir import convert_yolo_dir

__all__ = [
    "SPIDER_LABEL_MAP",
    "ConversionError",
    "ConversionResult",
    "MissingColumnsError",
    "UnknownClassError",
    "convert_boxes_table",
    "convert_masks",
    "convert_rsna_lsdc",
    "convert_yolo_dir",
]
