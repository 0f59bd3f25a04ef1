"""Synthetic lumbar spine MRI phantom with the public six-class set's findings and imbalance.

Public API:

* :func:`generate_study` -> :class:`Study`: one subject's sagittal T1/T2 series (volume,
  RAS affine, mid-sagittal slice), boxes with class ids on the mid-sagittal slice and the
  masks of the structures behind them.
* :func:`make_phantom_dataset` -> :class:`PhantomDataset`: DICOM, NIfTI, PNG, COCO,
  YOLO and MedMNIST-style crop exports of ``n`` studies, cached by parameters.

Modules: ``anatomy`` (column geometry in mm), ``findings`` (class-frequency solver and
severities vs difficulty), ``render`` (tissues, partial volume, coil, Rician noise),
``study`` (one study), ``writers`` (DICOM/NIfTI/PNG/crops), ``dataset`` (whole datasets).

Example:
    >>> from welde_det.datasets.phantom import generate_study, make_phantom_dataset
    >>> study = generate_study(0, difficulty=0.5, contrast="t2")  # doctest: +SKIP
    >>> ds = make_phantom_dataset("data/generated/phantom", 100)  # doctest: +SKIP
"""

from __future__ import annotations

from welde_det.datasets.phantom.dataset import (
    FORMATS,
    PHANTOM_VERSION,
    PhantomDataset,
    make_phantom_dataset,
    phantom_cache_dir,
    study_seed,
)
from welde_det.datasets.phantom.findings import (
    DEFAULT_FREQUENCIES,
    FindingPlan,
    resolve_frequencies,
    solve_plan,
)
from welde_det.datasets.phantom.study import Series, Study, generate_study

__all__ = [
    "DEFAULT_FREQUENCIES",
    "FORMATS",
    "PHANTOM_VERSION",
    "FindingPlan",
    "PhantomDataset",
    "Series",
    "Study",
    "generate_study",
    "make_phantom_dataset",
    "phantom_cache_dir",
    "resolve_frequencies",
    "solve_plan",
    "study_seed",
]
