"""Typed errors of the readers. All subclass ``WeldeIOError`` (a ``ValueError``) and name the file."""

from __future__ import annotations

from welde_det.errors import UserError

__all__ = [
    "AmbiguousSeriesError",
    "DicomSeriesError",
    "DuplicateSliceError",
    "InvalidAffineError",
    "MissingSliceError",
    "MultiplePatientsError",
    "NoSagittalSeriesError",
    "NotDicomError",
    "UnevenSpacingError",
    "UnreadableSliceError",
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


class DuplicateSliceError(DicomSeriesError):
    """Two images of one series at the same slice position (``files`` names them, relative to the input)."""

    def __init__(self, message: str, files: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.files = files


class UnreadableSliceError(NotDicomError):
    """A DICOM file in the input cannot be read, or holds an image that cannot be placed in space.

    Raised instead of reading the series without it: a lost edge slice would move the mid slice
    silently. ``file`` names it relative to the input.
    """

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class AmbiguousSeriesError(DicomSeriesError):
    """Several series an input could mean; none is picked silently.

    ``choices`` lists them pseudonymised (index, modality, orientation, slices, series and
    patient hashes): pass ``series=<index or series hash>`` to pick one.
    """

    def __init__(self, message: str, choices: list[dict] | None = None) -> None:
        super().__init__(message)
        self.choices = choices or []


class MultiplePatientsError(AmbiguousSeriesError):
    """One input holds series of more than one patient (PatientID), listed pseudonymised."""


class InvalidAffineError(WeldeIOError):
    """A voxel-to-world matrix that is non-finite, singular or sheared (columns not orthogonal)."""


class UnsupportedTransferSyntaxError(WeldeIOError):
    """Compressed pixel data with no installed decoder; the message says what to install."""


class NoSagittalSeriesError(WeldeIOError):
    """A folder holds no series that a mid-sagittal slice can be taken from."""


class UnsupportedFormatError(WeldeIOError):
    """A path that is neither DICOM, NIfTI nor a 2D image."""
