"""Readers → :class:`Volume` (voxels + RAS affine + provenance), mid-sagittal slices, de-identification.

Public entry points: :func:`list_series`, :func:`read_volume`, :func:`mid_sagittal`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from welde_det.io.dicom import SeriesInfo, list_series, read_dicom, series_choices, series_report
from welde_det.io.errors import (
    AmbiguousSeriesError,
    DicomSeriesError,
    DuplicateSliceError,
    InvalidAffineError,
    MissingSliceError,
    MultiplePatientsError,
    NoSagittalSeriesError,
    NotDicomError,
    UnevenSpacingError,
    UnreadableSliceError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    WeldeIOError,
)
from welde_det.io.image2d import is_image2d, read_image2d
from welde_det.io.nifti import is_nifti, read_nifti
from welde_det.io.volume import SagittalSlice, Volume, check_affine, mid_sagittal, window_image

__all__ = [
    "AmbiguousSeriesError",
    "DicomSeriesError",
    "DuplicateSliceError",
    "InvalidAffineError",
    "MissingSliceError",
    "MultiplePatientsError",
    "NoSagittalSeriesError",
    "NotDicomError",
    "SagittalSlice",
    "SeriesInfo",
    "UnevenSpacingError",
    "UnreadableSliceError",
    "UnsupportedFormatError",
    "UnsupportedTransferSyntaxError",
    "Volume",
    "WeldeIOError",
    "check_affine",
    "list_series",
    "mid_sagittal",
    "read_volume",
    "series_choices",
    "series_report",
    "window_image",
]


def read_volume(
    path: str | os.PathLike, series: Any = None, *, deid_key: str | bytes | None = None, **kw: Any
) -> Volume:
    """Read a DICOM folder/file, a NIfTI file or a 2D image as a :class:`Volume`.

    Args:
        path: a DICOM folder (searched recursively), a DICOM file, ``.nii``/``.nii.gz``,
            or PNG/JPEG/TIFF.
        series: for DICOM, which series: None (the one sagittal series — several, or
            several patients, raise :class:`AmbiguousSeriesError` /
            :class:`MultiplePatientsError` listing them pseudonymised), an index (``int`` or
            digits) or the 8-hex series hash from that listing (see :func:`read_dicom`).
            Given for a NIfTI file or 2D image it is an error (they hold one volume).
        deid_key: DICOM only (ignored otherwise): key of the pseudonymised UID in the
            provenance and of the series/patient hashes (see :func:`read_dicom`).
        **kw: reader options (``volume_index`` for 4D NIfTI, ``spacing_tolerance`` for
            DICOM, ``pixel_spacing`` for 2D images).

    Raises:
        FileNotFoundError: the path does not exist.
        WeldeIOError: and its subclasses (:class:`InvalidAffineError` for a non-finite,
            singular or sheared affine), naming the file relative to ``path``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        return read_dicom(p, series, deid_key=deid_key, **kw)
    if is_nifti(p) or is_image2d(p):
        if series is not None:
            raise WeldeIOError(f"{p.name}: series= applies to DICOM input only; this file holds one volume")
        return read_nifti(p, **kw) if is_nifti(p) else read_image2d(p, **kw)
    return read_dicom(p, series, deid_key=deid_key, **kw)
