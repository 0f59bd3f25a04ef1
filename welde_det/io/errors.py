"""Typed errors of the readers. All subclass ``WeldeIOError`` (a ``ValueError``) and name the file."""

from __future__ import annotations

from welde_det.errors import UserError

__all__ = [
    "DicomSeriesError",
    "MissingSliceError",
    "NoSagittalSeriesError",
    "NotDicomError",
    "UnevenSpacingError",
    "UnsupportedFormatError",
    "UnsupportedTransferSyntaxError",
    "WeldeIOError",
]


class WeldeIOError(UserError):
    """Base class: a file or folder that cannot be read as asked."""


class NotDicomError(WeldeIOError):
    """The file is not DICOM (or is truncated/corrupt)."""


class DicomSeriesError(WeldeIOError):
    """A series is inconsistent: mixed geometry, duplicate positions, missing tags."""


class MissingSliceError(DicomSeriesError):
    """A gap in slice positions larger than the regular spacing (``gaps`` holds them, mm)."""

    def __init__(self, message: str, gaps: list[float] | None = None) -> None:
        super().__init__(message)
        self.gaps = gaps or []


class UnevenSpacingError(DicomSeriesError):
    """Slice spacing varies beyond the tolerance (``spacings`` holds them, mm)."""

    def __init__(self, message: str, spacings: list[float] | None = None) -> None:
        super().__init__(message)
        self.spacings = spacings or []


class UnsupportedTransferSyntaxError(WeldeIOError):
    """Compressed pixel data with no installed decoder; the message says what to install."""


class NoSagittalSeriesError(WeldeIOError):
    """A folder holds no series that a mid-sagittal slice can be taken from."""


class UnsupportedFormatError(WeldeIOError):
    """A path that is neither DICOM, NIfTI nor a 2D image."""
