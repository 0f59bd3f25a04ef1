"""DICOM series discovery and reading (pydicom), stricter than the usual readers.

- Discovery walks a folder tree; non-DICOM and unreadable files become report entries,
  not crashes.
- Files are grouped by SeriesInstanceUID and split further by orientation, matrix size,
  pixel spacing and echo (number/time), so a mixed folder never stacks into one volume.
- Slices are sorted by their position projected on the slice normal — never by file
  name; InstanceNumber is only cross-checked (disagreements are reported).
- The LPS patient frame of DICOM is converted to RAS (x → −x, y → −y).
- Rescale slope/intercept are applied per slice (float32 output).
- Missing slices and uneven spacing raise typed errors with the observed gaps, unless a
  tolerance is given.
- Enhanced multi-frame MR (per-frame functional groups) is read frame by frame.
- Compressed transfer syntaxes decode when a decoder is installed; otherwise the error
  says which package to install.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.io.errors import (
    DicomSeriesError,
    MissingSliceError,
    NoSagittalSeriesError,
    NotDicomError,
    UnevenSpacingError,
    UnsupportedTransferSyntaxError,
    WeldeIOError,
)
from welde_det.io.volume import Volume

__all__ = ["SeriesInfo", "list_series", "read_dicom", "series_report"]

logger = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DECODER_HINT = (
    "install a decoder: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000) or `pip install python-gdcm`"
)


@dataclass
class _Frame:
    path: Path
    frame: int | None  # frame index in an enhanced multi-frame file
    position: np.ndarray  # IPP (LPS)
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    instance: int | None
    slope: float
    intercept: float


@dataclass
class SeriesInfo:
    """One series found by :func:`list_series`.

    Attributes:
        key: identifier to pass as ``read_volume(folder, series=key)``.
        description: SeriesDescription (free text; for display only, never written out).
        orientation: ``"sagittal"``, ``"coronal"``, ``"axial"`` or ``"oblique"``.
        obliquity_deg: angle between the slice normal and the nearest patient axis.
        size: (rows, cols, slices).
        spacing: (row, col, slice) spacing in mm (slice spacing from positions).
        num_files: files contributing.
        skip_reason: why it would not be used for a mid-sagittal slice (None if usable).
        warnings: non-fatal findings (InstanceNumber disagreements, ...).
    """

    key: str
    description: str
    orientation: str
    obliquity_deg: float
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_files: int
    skip_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    echo: str = ""
    modality: str = ""
    frames: list[_Frame] = field(default_factory=list, repr=False)
    headers: Any = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        """True when nothing would make it skipped."""
        return self.skip_reason is None


def _pydicom():
    import pydicom

    return pydicom


def _orientation(normal: np.ndarray) -> tuple[str, float]:
    a = int(np.argmax(np.abs(normal)))
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[a]) / np.linalg.norm(normal)))))
    label = ("sagittal", "coronal", "axial")[a]
    return (label if angle <= 30.0 else "oblique"), angle


def _floats(value: Any, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomSeriesError(f"{path}: {what} is not numeric: {value!r}") from None
    if arr.shape != (n,):
        raise DicomSeriesError(f"{path}: {what} must have {n} values, got {value!r}")
    return arr


def _frames_of(ds: Any, path: Path) -> list[_Frame]:
    """Geometry of every frame in a dataset (one for classic images)."""
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
        frames = []
        for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def grp(name, per=per):
                for src in (per, shared):
                    if src is not None and name in src:
                        return src[name][0]
                return None

            pos = grp("PlanePositionSequence")
            ori = grp("PlaneOrientationSequence")
            meas = grp("PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise DicomSeriesError(f"{path}: frame {i} lacks plane position/orientation/pixel measures")
            iop = _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", path)
            trans = grp("PixelValueTransformationSequence")
            frames.append(_Frame(
                path, i, _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", path), iop[:3], iop[3:],
                tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing", path)), int(ds.Rows), int(ds.Columns),
                i + 1, float(getattr(trans, "RescaleSlope", 1.0) or 1.0) if trans is not None else 1.0,
                float(getattr(trans, "RescaleIntercept", 0.0) or 0.0) if trans is not None else 0.0,
            ))
        return frames
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise DicomSeriesError(f"{path}: missing {tag}; cannot place the image in patient space")
    iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path)
    inst = ds.get("InstanceNumber")
    return [_Frame(
        path, None, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path), iop[:3], iop[3:],
        tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing", path)), int(ds.Rows), int(ds.Columns),
        int(inst) if inst not in (None, "") else None,
        float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0),
    )]


def _scan(folder: Path) -> tuple[list[tuple[Path, Any]], list[tuple[Path, str]]]:
    pydicom = _pydicom()
    found, skipped = [], []
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
            skipped.append((path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        if "SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds:
            skipped.append((path, "DICOM without an image (no Rows/PixelData)"))
            continue
        found.append((path, ds))
    return found, skipped


def _group_key(ds: Any, frame: _Frame) -> tuple:
    normal = np.cross(frame.row_dir, frame.col_dir)
    return (
        str(ds.get("SeriesInstanceUID", "no-series-uid")),
        tuple(np.round(np.concatenate([frame.row_dir, frame.col_dir]), 3)),
        frame.rows,
        frame.cols,
        tuple(np.round(frame.pixel_spacing, 4)),
        str(ds.get("EchoNumbers", "")),
        str(round(float(ds.get("EchoTime", 0) or 0), 3)),
        tuple(np.round(normal, 3)),
    )


def _build_series(key: str, ds0: Any, frames: list[_Frame], headers: list) -> SeriesInfo:
    f0 = frames[0]
    normal = np.cross(f0.row_dir, f0.col_dir)
    orient, angle = _orientation(normal)
    proj = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[i] for i in order]
    proj = proj[order]
    warnings = []
    steps = np.diff(proj)
    slice_spacing = float(np.median(steps)) if len(steps) else float(ds0.get("SliceThickness", 1.0) or 1.0)
    inst = [f.instance for f in frames]
    if all(i is not None for i in inst) and len(inst) > 1:
        d = np.diff(inst)
        if not (np.all(d > 0) or np.all(d < 0)):
            warnings.append("InstanceNumber does not follow slice position; positions were used")
    info = SeriesInfo(
        key=key,
        description=str(ds0.get("SeriesDescription", "")),
        orientation=orient,
        obliquity_deg=round(angle, 2),
        size=(f0.rows, f0.cols, len(frames)),
        spacing=(f0.pixel_spacing[0], f0.pixel_spacing[1], round(slice_spacing, 4)),
        num_files=len({f.path for f in frames}),
        warnings=warnings,
        echo=str(ds0.get("EchoTime", "")),
        modality=str(ds0.get("Modality", "")),
        frames=frames,
        headers=headers,
    )
    if len(frames) > 1 and np.any(steps < 1e-3):
        info.skip_reason = "duplicate slice positions (two images at the same place)"
    elif orient != "sagittal":
        info.skip_reason = f"not sagittal ({orient}); a mid-sagittal slice needs a sagittal series"
    return info


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Discover the DICOM series under ``folder``.

    Args:
        folder: a folder searched recursively (or a single file).

    Returns:
        One :class:`SeriesInfo` per series, sagittal first; files that are not DICOM
        appear as entries with ``orientation="unreadable"`` and a ``skip_reason``.

    Raises:
        FileNotFoundError: the folder does not exist.
        WeldeIOError: the folder is empty.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        raise WeldeIOError(f"{folder}: the folder is empty")
    found, skipped = _scan(folder)
    groups: dict[tuple, list[_Frame]] = defaultdict(list)
    first: dict[tuple, Any] = {}
    headers: dict[tuple, list] = defaultdict(list)
    for path, ds in found:
        try:
            frames = _frames_of(ds, path)
        except DicomSeriesError as exc:
            skipped.append((path, str(exc)))
            continue
        for fr in frames:
            k = _group_key(ds, fr)
            groups[k].append(fr)
            first.setdefault(k, ds)
        headers[_group_key(ds, frames[0])].append(ds)
    series = []
    uid_count: dict[str, int] = defaultdict(int)
    for k in sorted(groups, key=lambda g: (g[0], g[2], g[3], g[5], g[6], g[1])):
        uid_count[k[0]] += 1
        key = k[0] if uid_count[k[0]] == 1 else f"{k[0]}#{uid_count[k[0]]}"
        series.append(_build_series(key, first[k], groups[k], headers[k]))
    for path, reason in skipped:
        series.append(SeriesInfo(key=str(path), description="", orientation="unreadable", obliquity_deg=0.0,
                                 size=(0, 0, 0), spacing=(0.0, 0.0, 0.0), num_files=1, skip_reason=reason))
    series.sort(key=lambda s: (s.orientation == "unreadable", s.skip_reason is not None, -s.size[2]))
    return series


def series_report(series: list[SeriesInfo]) -> str:
    """A readable table of what :func:`list_series` found and what would be skipped, and why."""
    lines = [f"{'#':>2} {'orientation':<11} {'size':<14} {'spacing (mm)':<20} {'files':>5}  status"]
    for i, s in enumerate(series):
        size = "x".join(str(v) for v in s.size)
        sp = "x".join(f"{v:.2f}" for v in s.spacing)
        status = "ok" if s.usable else f"skipped: {s.skip_reason}"
        lines.append(f"{i:>2} {s.orientation:<11} {size:<14} {sp:<20} {s.num_files:>5}  {status}")
        lines.extend(f"{'':>3} warning: {w}" for w in s.warnings)
    return "\n".join(lines)


def _check_spacing(info: SeriesInfo, tolerance: float | None) -> None:
    frames = info.frames
    if len(frames) < 3:
        return
    normal = np.cross(frames[0].row_dir, frames[0].col_dir)
    steps = np.diff([float(f.position @ normal) for f in frames])
    med = float(np.median(steps))
    tol = 0.01 * med if tolerance is None else tolerance
    where = str(frames[0].path.parent)
    if np.all(np.abs(steps - med) <= max(tol, 1e-3)):
        return
    gaps = [float(s) for s in steps if s > 1.5 * med]
    if gaps:
        raise MissingSliceError(
            f"{where}: slice positions have gap(s) of {[round(g, 3) for g in gaps]} mm where the spacing is "
            f"{med:.3f} mm — a slice is missing. Pass spacing_tolerance= to read it anyway.", gaps)
    if tolerance is None or np.any(np.abs(steps - med) > tolerance):
        raise UnevenSpacingError(
            f"{where}: uneven slice spacing {[round(float(s), 3) for s in steps]} mm (median {med:.3f}). "
            "Pass spacing_tolerance= (mm) to accept it.", [float(s) for s in steps])


def _pixels(ds: Any, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        if ts is not None and getattr(ts, "is_compressed", False):
            raise UnsupportedTransferSyntaxError(
                f"{path}: pixel data is compressed ({name}) and no installed decoder handles it; {DECODER_HINT}"
            ) from exc
        raise NotDicomError(f"{path}: cannot decode pixel data ({exc})") from exc
    except AttributeError as exc:
        raise NotDicomError(f"{path}: no pixel data ({exc})") from exc


def _select(series: list[SeriesInfo], which: Any, folder: Path) -> SeriesInfo:
    real = [s for s in series if s.orientation != "unreadable"]
    if which is None:
        usable = [s for s in real if s.usable]
        if usable:
            return usable[0]
        if not real:
            reasons = "; ".join(f"{s.key}: {s.skip_reason}" for s in series[:5])
            raise NotDicomError(f"{folder}: no readable DICOM series ({reasons})")
        found = ", ".join(f"{s.orientation} {s.size}" for s in real)
        raise NoSagittalSeriesError(
            f"{folder}: no sagittal series to take a mid-sagittal slice from (found: {found}). "
            "Pass series=<key> from list_series() to read another one.")
    if isinstance(which, SeriesInfo):
        return which
    if isinstance(which, int):
        if not 0 <= which < len(real):
            raise WeldeIOError(f"{folder}: series index {which} is outside 0..{len(real) - 1}")
        return real[which]
    for s in real:
        if s.key == str(which):
            return s
    raise WeldeIOError(f"{folder}: no series {which!r}; available keys: {[s.key for s in real]}")


def read_dicom(
    path: str | os.PathLike,
    series: Any = None,
    *,
    spacing_tolerance: float | None = None,
    deid_key: str | bytes | None = None,
) -> Volume:
    """Read one DICOM series into a :class:`Volume` (RAS affine).

    Args:
        path: a folder (searched recursively) or one DICOM file.
        series: which series — None (the first usable sagittal one), an index or key
            from :func:`list_series`, or a :class:`SeriesInfo`.
        spacing_tolerance: accept slice-spacing deviations up to this many mm.
        deid_key: key for the pseudonymised series UID in the provenance (else the
            ``WELDE_DEID_KEY`` environment variable; without either, no UID is recorded).

    Raises:
        NotDicomError, DicomSeriesError, MissingSliceError, UnevenSpacingError,
        UnsupportedTransferSyntaxError, NoSagittalSeriesError.
    """
    path = Path(path)
    infos = list_series(path)
    info = _select(infos, series, path)
    if info.skip_reason and info.skip_reason.startswith("duplicate"):
        raise DicomSeriesError(f"{path}: series {info.key}: {info.skip_reason}")
    _check_spacing(info, spacing_tolerance)
    pydicom = _pydicom()
    frames = info.frames
    cache: dict[Path, np.ndarray] = {}
    slices = []
    for fr in frames:
        if fr.path not in cache:
            try:
                ds = pydicom.dcmread(fr.path)
            except Exception as exc:  # corrupt after the header was read
                raise NotDicomError(f"{fr.path}: cannot read ({exc})") from exc
            cache[fr.path] = _pixels(ds, fr.path)
        px = cache[fr.path]
        img = px[fr.frame] if fr.frame is not None else px
        if img.ndim == 3:  # colour
            raise DicomSeriesError(f"{fr.path}: colour pixel data ({img.shape}); expected a grey MR image")
        if img.shape != (fr.rows, fr.cols):
            raise DicomSeriesError(f"{fr.path}: pixel data {img.shape} does not match Rows x Columns {(fr.rows, fr.cols)}")
        slices.append(img.astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept))
    # array[i, j, k]: i along columns, j along rows, k along the sorted slices
    array = np.stack(slices, axis=-1).transpose(1, 0, 2)
    f0 = frames[0]
    row_sp, col_sp = f0.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = f0.row_dir * col_sp
    lps[:3, 1] = f0.col_dir * row_sp
    if len(frames) > 1:
        lps[:3, 2] = (frames[-1].position - f0.position) / (len(frames) - 1)
    else:
        thick = float(getattr(info.headers[0], "SliceThickness", 1.0) or 1.0) if info.headers else 1.0
        lps[:3, 2] = np.cross(f0.row_dir, f0.col_dir) * thick
    lps[:3, 3] = f0.position
    affine = LPS_TO_RAS @ lps
    ds0 = info.headers[0] if info.headers else None
    from welde_det.io.deid import burned_in_annotation, key_from_env, pseudonymise

    key = deid_key if deid_key is not None else key_from_env()
    window = None
    if ds0 is not None and "WindowCenter" in ds0 and "WindowWidth" in ds0:
        wc, ww = ds0.WindowCenter, ds0.WindowWidth
        wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        window = (wc, ww)
    provenance = {
        "format": "dicom",
        "source_files": [str(p) for p in dict.fromkeys(f.path for f in frames)],
        "series_uid": pseudonymise(info.key, key) if key else None,
        "orientation": info.orientation,
        "modality": info.modality,
        "description": info.description,
        "window": window,
        "burned_in_annotation": bool(ds0 is not None and burned_in_annotation(ds0)),
        "warnings": list(info.warnings),
        "num_series_found": sum(1 for s in infos if s.orientation != "unreadable"),
    }
    return Volume(array=array, affine=affine, provenance=provenance)
