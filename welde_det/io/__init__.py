"""Readers → :class:`Volume` (voxels + RAS affine + provenance), mid-sagittal slices, de-identification.

Public entry points: :func:`list_series`, :func:`read_volume`, :func:`mid_sagittal`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from welde_det.io.dicom import SeriesInfo, list_series, read_dicom, series_report
from welde_det.io.errors import (
    DicomSeriesError,
    MissingSliceError,
    NoSagittalSeriesError,
    NotDicomError,
    UnevenSpacingError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    WeldeIOError,
)
from welde_det.io.image2d import is_image2d, read_image2d
from welde_det.io.nifti import is_nifti, read_nifti
from welde_det.io.volume import SagittalSlice, Volume, mid_sagittal, window_image

__all__ = [
    "DicomSeriesError",
    "MissingSliceError",
    "NoSagittalSeriesError",
    "NotDicomError",
    "SagittalSlice",
    "SeriesInfo",
    "UnevenSpacingError",
    "UnsupportedFormatError",
    "UnsupportedTransferSyntaxError",
    "Volume",
    "WeldeIOError",
    "list_series",
    "mid_sagittal",
    "read_volume",
    "series_report",
    "window_image",
]


def read_volume(path: str | os.PathLike, series: Any = None, **kw: Any) -> Volume:
    """Read a DICOM folder/file, a NIfTI file or a 2D image as a :class:`Volume`.

    Args:
        path: a DICOM folder (searched recursively), a DICOM file, ``.nii``/``.nii.gz``,
            or PNG/JPEG/TIFF.
        series: for DICOM folders, which series (see :func:`read_dicom`).
        **kw: reader options (``volume_index`` for 4D NIfTI, ``spacing_tolerance`` and
            ``deid_key`` for DICOM, ``pixel_spacing`` for 2D images).

    Raises:
        FileNotFoundError: the path does not exist.
        WeldeIOError: and its subclasses, naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        return read_dicom(p, series, **kw)
    if is_nifti(p):
        return read_nifti(p, **kw)
    if is_image2d(p):
        return read_image2d(p, **kw)
    return read_dicom(p, series, **kw)
