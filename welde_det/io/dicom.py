"""DICOM series discovery and reading (pydicom), stricter than the usual readers.

- Discovery walks a folder tree; non-DICOM and unreadable files become report entries,
  not crashes. Reading is stricter: a damaged DICOM image (a truncated header, an image that
  cannot be placed in space) that belongs — or may belong — to the series read is an
  :class:`UnreadableSliceError` naming it, never a silently shorter series (a lost edge
  slice would move the mid slice).
- Files are grouped by SeriesInstanceUID and split further by orientation, matrix size,
  pixel spacing and echo (number/time), so a mixed folder never stacks into one volume.
- Slices are sorted by their position projected on the slice normal — never by file
  name; InstanceNumber is only cross-checked (disagreements are reported).
- The LPS patient frame of DICOM is converted to RAS (x → −x, y → −y).
- Rescale slope/intercept are applied per slice (float32 output).
- Missing slices and uneven spacing raise typed errors with the observed gaps, unless a
  tolerance is given; two images at one position are a :class:`DuplicateSliceError` naming both.
- Several candidate series, or several patients, in one input are an
  :class:`AmbiguousSeriesError` / :class:`MultiplePatientsError` listing them pseudonymised
  (index, modality, orientation, slice count, keyed 8-hex hashes of SeriesInstanceUID and
  PatientID), unless ``series=`` picks one — by index or by that series hash.
- The affine is checked (finite, non-singular, orthogonal: :func:`~welde_det.io.volume.check_affine`).
- Messages name files relative to the input (never an absolute path), and never print a
  raw UID, PatientID or name.
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
    AmbiguousSeriesError,
    DicomSeriesError,
    DuplicateSliceError,
    MissingSliceError,
    MultiplePatientsError,
    NoSagittalSeriesError,
    NotDicomError,
    UnevenSpacingError,
    UnreadableSliceError,
    UnsupportedTransferSyntaxError,
    WeldeIOError,
)
from welde_det.io.volume import Volume, check_affine

__all__ = ["SERIES_HASH_LENGTH", "SeriesInfo", "list_series", "read_dicom", "series_choices", "series_report"]

logger = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: hex characters of the keyed series/patient hashes shown in listings and accepted by ``series=``
SERIES_HASH_LENGTH = 8
#: file name suffixes taken as DICOM even when the file is too short to carry the "DICM" marker
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
DECODER_HINT = (
    "install a decoder: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000) or `pip install python-gdcm`"
)


@dataclass
class _Frame:
    path: Path
    name: str  # the file relative to the input, for messages
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
        damaged: for ``"unreadable"`` entries, whether the file looks like a DICOM image that
            is damaged (truncated header, unplaceable) rather than a non-DICOM/non-image file.
        duplicates: two files (relative to the input) at the same slice position, if any.

    The raw SeriesInstanceUID and PatientID are kept out of ``repr``; show
    :meth:`series_hash` / :meth:`patient_hash` instead.
    """

    key: str = field(repr=False)  # a raw UID: never in repr, logs or messages
    description: str = field(repr=False)  # free text: may name a person
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
    uid: str | None = field(default=None, repr=False)
    patient: str | None = field(default=None, repr=False)
    damaged: bool = False
    duplicates: tuple[str, str] | None = None

    @property
    def usable(self) -> bool:
        """True when nothing would make it skipped."""
        return self.skip_reason is None

    def series_hash(self, key: str | bytes) -> str:
        """Keyed 8-hex pseudonym of this series (its key), the one listings show and ``series=`` takes."""
        from welde_det.io.deid import pseudonymise

        return pseudonymise(f"series:{self.key}", key, length=SERIES_HASH_LENGTH)

    def patient_hash(self, key: str | bytes) -> str:
        """Keyed 8-hex pseudonym of the PatientID (``"none"`` when the headers carry none)."""
        from welde_det.io.deid import pseudonymise

        if not self.patient:
            return "none"
        return pseudonymise(f"patient:{self.patient}", key, length=SERIES_HASH_LENGTH)


def _pydicom():
    import pydicom

    return pydicom


def _orientation(normal: np.ndarray) -> tuple[str, float]:
    a = int(np.argmax(np.abs(normal)))
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[a]) / np.linalg.norm(normal)))))
    label = ("sagittal", "coronal", "axial")[a]
    return (label if angle <= 30.0 else "oblique"), angle


def _floats(value: Any, n: int, what: str, name: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomSeriesError(f"{name}: {what} is not numeric: {value!r}") from None
    if arr.shape != (n,):
        raise DicomSeriesError(f"{name}: {what} must have {n} values, got {value!r}")
    if not np.isfinite(arr).all():
        raise DicomSeriesError(f"{name}: {what} holds a non-finite value: {value!r}")
    return arr


def _checked_frame(fr: _Frame) -> _Frame:
    """Refuse geometry that would misplace the image: non-unit or non-orthogonal directions, bad spacing."""
    for what, d in (("row", fr.row_dir), ("column", fr.col_dir)):
        if abs(float(np.linalg.norm(d)) - 1.0) > 1e-3:
            raise DicomSeriesError(f"{fr.name}: ImageOrientationPatient {what} direction {d.tolist()} is not a unit vector")
    if abs(float(fr.row_dir @ fr.col_dir)) > 1e-3:
        raise DicomSeriesError(f"{fr.name}: ImageOrientationPatient row and column directions are not orthogonal "
                               f"(cos {float(fr.row_dir @ fr.col_dir):.4f})")
    if not all(v > 0 for v in fr.pixel_spacing):
        raise DicomSeriesError(f"{fr.name}: PixelSpacing {list(fr.pixel_spacing)} must be positive")
    if fr.rows < 1 or fr.cols < 1:
        raise DicomSeriesError(f"{fr.name}: Rows x Columns {fr.rows}x{fr.cols} is empty")
    return fr


def _frames_of(ds: Any, path: Path, name: str) -> list[_Frame]:
    """Geometry of every frame in a dataset (one for classic images); ``name`` is shown in messages."""
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
                raise DicomSeriesError(f"{name}: frame {i} lacks plane position/orientation/pixel measures")
            iop = _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
            trans = grp("PixelValueTransformationSequence")
            frames.append(_Frame(
                path, name, i, _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", name), iop[:3], iop[3:],
                tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing", name)), int(ds.Rows), int(ds.Columns),
                i + 1, float(getattr(trans, "RescaleSlope", 1.0) or 1.0) if trans is not None else 1.0,
                float(getattr(trans, "RescaleIntercept", 0.0) or 0.0) if trans is not None else 0.0,
            ))
        return [_checked_frame(f) for f in frames]
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise DicomSeriesError(f"{name}: missing {tag}; cannot place the image in patient space")
    iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
    inst = ds.get("InstanceNumber")
    try:
        number = int(inst) if inst not in (None, "") else None
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise DicomSeriesError(f"{name}: InstanceNumber/RescaleSlope/RescaleIntercept is not numeric") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise DicomSeriesError(f"{name}: non-finite RescaleSlope/RescaleIntercept ({slope}, {intercept})")
    return [_checked_frame(_Frame(
        path, name, None, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name), iop[:3], iop[3:],
        tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing", name)), int(ds.Rows), int(ds.Columns),
        number, slope, intercept,
    ))]


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the input ``root`` (a folder, or the file itself: its name)."""
    if root.is_dir():
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def _reason(exc: BaseException, path: Path, name: str) -> str:
    """An exception's message with the file's full path replaced by its relative name."""
    text = str(exc)
    for full in {str(path), str(path.absolute()), str(path.resolve())}:
        text = text.replace(full, name)
    return f"{type(exc).__name__}: {text}"


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _is_image_class(sop: str) -> bool | None:
    """True for an image storage SOP class, False for a known non-image one, None if unknown/absent."""
    if not sop:
        return None
    from pydicom.uid import UID

    name = UID(sop).name
    if name == sop:  # not in pydicom's dictionary (private class)
        return None
    return "Image Storage" in name


@dataclass
class _Skipped:
    path: Path
    name: str
    reason: str
    damaged: bool  # looks like a DICOM image that is damaged (vs. not DICOM / not an image)
    uid: str | None = None  # its SeriesInstanceUID when it could be read


def _scan(folder: Path) -> tuple[list[tuple[Path, Any]], list[_Skipped]]:
    pydicom = _pydicom()
    found: list[tuple[Path, Any]] = []
    skipped: list[_Skipped] = []
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for path in files:
        name = _shown(path, folder)
        magic = _has_dicm(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
            looks = magic or path.suffix.lower() in DICOM_SUFFIXES
            skipped.append(_Skipped(path, name, f"not a readable DICOM file ({_reason(exc, path, name)})", looks))
            continue
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        image = _is_image_class(sop)
        uid = str(ds.get("SeriesInstanceUID", "") or "") or None
        if "Rows" not in ds:
            if image or (image is None and magic and not sop):
                # an image class (or a file cut before its class) without its image header: truncated
                skipped.append(_Skipped(path, name, "damaged DICOM image: the header ends before Rows/Columns "
                                        "(the file looks truncated)", True, uid))
            else:
                skipped.append(_Skipped(path, name, "DICOM without an image (no Rows/PixelData)", False, uid))
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
    uid = str(ds0.get("SeriesInstanceUID", "") or "") or None
    patient = str(ds0.get("PatientID", "") or "") or None
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
        uid=uid,
        patient=patient,
    )
    if len(frames) > 1 and np.any(steps < 1e-3):
        i = int(np.argmax(steps < 1e-3))
        info.duplicates = (frames[i].name, frames[i + 1].name)
        info.skip_reason = (f"duplicate slice position ({info.duplicates[0]} and {info.duplicates[1]} "
                            "lie at the same place)")
    elif orient != "sagittal":
        info.skip_reason = f"not sagittal ({orient}); a mid-sagittal slice needs a sagittal series"
    return info


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Discover the DICOM series under ``folder``.

    Args:
        folder: a folder searched recursively (or a single file).

    Returns:
        One :class:`SeriesInfo` per series, sagittal first; files that are not DICOM
        appear as entries with ``orientation="unreadable"`` and a ``skip_reason``
        (``damaged`` tells a damaged DICOM image from a file that is no DICOM image at all).
        The order is the one ``series=<index>`` refers to (unreadable entries have no index).

    Raises:
        FileNotFoundError: the folder does not exist.
        WeldeIOError: the folder is empty.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        raise WeldeIOError("the DICOM input folder is empty")
    found, skipped = _scan(folder)
    groups: dict[tuple, list[_Frame]] = defaultdict(list)
    first: dict[tuple, Any] = {}
    headers: dict[tuple, list] = defaultdict(list)
    for path, ds in found:
        name = _shown(path, folder)
        try:
            frames = _frames_of(ds, path, name)
        except DicomSeriesError as exc:
            # an image that cannot be placed in patient space: damaged (checked against the series read)
            uid = str(ds.get("SeriesInstanceUID", "") or "") or None
            skipped.append(_Skipped(path, name, str(exc), True, uid))
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
    for sk in skipped:
        series.append(SeriesInfo(key=sk.name, description="", orientation="unreadable", obliquity_deg=0.0,
                                 size=(0, 0, 0), spacing=(0.0, 0.0, 0.0), num_files=1, skip_reason=sk.reason,
                                 uid=sk.uid, damaged=sk.damaged))
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


def _series_where(info: SeriesInfo) -> str:
    """The series's files for messages: 'a/IM0001.dcm .. a/IM0007.dcm' (relative to the input)."""
    names = list(dict.fromkeys(f.name for f in info.frames))
    if not names:
        return "series"
    return f"series of {names[0]}" if len(names) == 1 else f"series {names[0]} .. {names[-1]} ({len(names)} files)"


def _check_spacing(info: SeriesInfo, tolerance: float | None) -> None:
    frames = info.frames
    if len(frames) < 3:
        return
    normal = np.cross(frames[0].row_dir, frames[0].col_dir)
    steps = np.diff([float(f.position @ normal) for f in frames])
    med = float(np.median(steps))
    tol = 0.01 * med if tolerance is None else tolerance
    where = _series_where(info)
    if np.all(np.abs(steps - med) <= max(tol, 1e-3)):
        return
    gaps = [float(s) for s in steps if s > 1.5 * med]
    if gaps:
        around = [f"{frames[i].name} | {frames[i + 1].name}" for i, s in enumerate(steps) if s > 1.5 * med]
        raise MissingSliceError(
            f"{where}: slice positions have gap(s) of {[round(g, 3) for g in gaps]} mm where the spacing is "
            f"{med:.3f} mm (between {'; '.join(around)}) — a slice is missing. "
            "Pass spacing_tolerance= to read it anyway.", gaps)
    if tolerance is None or np.any(np.abs(steps - med) > tolerance):
        raise UnevenSpacingError(
            f"{where}: uneven slice spacing {[round(float(s), 3) for s in steps]} mm (median {med:.3f}). "
            "Pass spacing_tolerance= (mm) to accept it.", [float(s) for s in steps])


def _pixels(ds: Any, fr: _Frame) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        if ts is not None and getattr(ts, "is_compressed", False):
            raise UnsupportedTransferSyntaxError(
                f"{fr.name}: pixel data is compressed ({name}) and no installed decoder handles it; {DECODER_HINT}"
            ) from exc
        raise UnreadableSliceError(
            f"{fr.name}: cannot decode the pixel data of this slice ({_reason(exc, fr.path, fr.name)}); the file "
            "looks truncated or damaged — repair it or remove it from the input", fr.name) from exc
    except AttributeError as exc:
        raise UnreadableSliceError(f"{fr.name}: no pixel data in this slice ({type(exc).__name__}); the file looks "
                                   "truncated — repair it or remove it from the input", fr.name) from exc


def _deid_key(deid_key: str | bytes | None) -> bytes:
    """The key for the hashes in listings: ``deid_key``, else ``$WELDE_DEID_KEY``, else the user's key file.

    The same key chain as the converters (:func:`welde_det.io.deid.obtain_key`), so a hash shown
    once is accepted by the next call; the user's key file is created on first use.
    """
    from welde_det.io.deid import obtain_key

    found = obtain_key(deid_key)
    if found.origin == "created":
        logger.warning(found.describe())
    return found.key


def series_choices(series: list[SeriesInfo], key: str | bytes) -> list[dict[str, Any]]:
    """The readable series as ``series=`` sees them, pseudonymised (never a raw UID, PatientID or name).

    Returns:
        One dict per series: ``index`` (for ``series=<index>``), ``series`` (keyed 8-hex hash,
        also accepted by ``series=``), ``patient`` (keyed hash of the PatientID), ``modality``,
        ``orientation``, ``slices``, ``status`` (``"ok"`` or why it is not mid-sagittal material).
    """
    out = []
    for i, s in enumerate(x for x in series if x.orientation != "unreadable"):
        out.append({
            "index": i,
            "series": s.series_hash(key),
            "patient": s.patient_hash(key),
            "modality": s.modality or "?",
            "orientation": s.orientation,
            "slices": int(s.size[2]),
            "status": "ok" if s.usable else str(s.skip_reason),
        })
    return out


def _format_choices(choices: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"#{c['index']} {c['modality']} {c['orientation']} {c['slices']} slices series={c['series']} "
        f"patient={c['patient']}" + ("" if c["status"] == "ok" else " (not usable: " + c["status"].split(" (")[0] + ")")
        for c in choices)


_PICK = ("pick one with series=<index or series hash> (tools: --series INDEX|HASH); "
         "the hashes are keyed with your de-identification key")


def _select(series: list[SeriesInfo], which: Any, key_of: Any) -> SeriesInfo:
    """The series ``which`` names (None: the one mid-sagittal candidate, if there is exactly one)."""
    real = [s for s in series if s.orientation != "unreadable"]
    if not real:
        reasons = "; ".join(f"{s.key}: {s.skip_reason}" for s in series[:5])
        raise NotDicomError(f"no readable DICOM series in the input ({reasons})")
    if which is None:
        patients = {s.patient for s in real}
        if len(patients) > 1:
            choices = series_choices(series, key_of())
            raise MultiplePatientsError(
                f"the DICOM input holds series of {len(patients)} different patients (PatientID): "
                f"{_format_choices(choices)}; a folder should hold one patient's study — {_PICK}", choices)
        candidates = [s for s in real if s.usable or (s.duplicates is not None and s.orientation == "sagittal")]
        if len(candidates) > 1:
            choices = series_choices(series, key_of())
            raise AmbiguousSeriesError(
                f"the DICOM input holds {len(candidates)} sagittal series that could be read: "
                f"{_format_choices(choices)}; {_PICK}", choices)
        if candidates:
            return candidates[0]
        found = ", ".join(f"#{i} {s.orientation} {s.size}" for i, s in enumerate(real))
        raise NoSagittalSeriesError(
            f"no sagittal series to take a mid-sagittal slice from in the DICOM input (found: {found}). "
            "Pass series=<index> (tools: --series) to read another one.")
    if isinstance(which, SeriesInfo):
        return which
    if isinstance(which, str) and which.strip().isdigit() and len(which.strip()) < SERIES_HASH_LENGTH:
        which = int(which.strip())
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if not 0 <= which < len(real):
            raise WeldeIOError(f"series index {which} is outside 0..{len(real) - 1} "
                               f"(the DICOM input holds {len(real)} series)")
        return real[int(which)]
    text = str(which).strip()
    key = None
    if len(text) == SERIES_HASH_LENGTH and all(c in "0123456789abcdef" for c in text.lower()):
        key = key_of()
        for s in real:
            if s.series_hash(key) == text.lower():
                return s
    for s in real:
        if s.key == text:  # the full key from list_series() (a UID): accepted, never printed
            return s
    choices = series_choices(series, key if key is not None else key_of())
    raise WeldeIOError(f"no series {'matches ' + repr(text) if key is not None else 'matches the given key'} in "
                       f"the DICOM input; available: {_format_choices(choices)}")


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
        series: which series — None (the one sagittal series; several, or several patients,
            are an error listing them), an index into :func:`list_series` (readable entries;
            an ``int`` or a string of digits), the 8-hex series hash shown by that error and
            :func:`series_choices`, the full ``SeriesInfo.key``, or a :class:`SeriesInfo`.
        spacing_tolerance: accept slice-spacing deviations up to this many mm.
        deid_key: key for the pseudonymised series UID in the provenance and for the series
            and patient hashes (else ``WELDE_DEID_KEY``; for the hashes, else the user's key
            file, as the converters use; without a key no UID is recorded in the provenance).

    Raises:
        NotDicomError: no readable series.
        UnreadableSliceError: a damaged DICOM image that is, or may be, part of the series.
        DuplicateSliceError: two images at one slice position.
        AmbiguousSeriesError, MultiplePatientsError: several candidates and ``series`` is None.
        DicomSeriesError, MissingSliceError, UnevenSpacingError, UnsupportedTransferSyntaxError,
        NoSagittalSeriesError, InvalidAffineError: as their names say.
        Every message names files relative to ``path`` and holds no raw UID or PatientID.
    """
    path = Path(path)
    infos = list_series(path)
    cached: list[bytes] = []

    def key_of() -> bytes:
        if not cached:
            cached.append(_deid_key(deid_key))
        return cached[0]

    info = _select(infos, series, key_of)
    damaged = [s for s in infos if s.orientation == "unreadable" and s.damaged and s.uid in (None, info.uid)]
    if damaged:
        bad = damaged[0]
        more = f" (and {len(damaged) - 1} more damaged file(s))" if len(damaged) > 1 else ""
        reason = str(bad.skip_reason).removeprefix(f"{bad.key}: ")
        raise UnreadableSliceError(
            f"{bad.key}: {reason}{more}; it is, or may be, a slice of the series read, which would "
            "be read without it (a lost slice moves the mid slice) — repair or remove the file", bad.key)
    if info.duplicates is not None:
        a, b = info.duplicates
        raise DuplicateSliceError(
            f"duplicate slice position: {a} and {b} lie at the same position of one series; remove the "
            "duplicate (or separate the two acquisitions into their own folders)", (a, b))
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
                raise UnreadableSliceError(
                    f"{fr.name}: cannot read this slice ({_reason(exc, fr.path, fr.name)}); repair it or remove it "
                    "from the input", fr.name) from exc
            cache[fr.path] = _pixels(ds, fr)
        px = cache[fr.path]
        img = px[fr.frame] if fr.frame is not None else px
        if img.ndim == 3:  # colour
            raise DicomSeriesError(f"{fr.name}: colour pixel data ({img.shape}); expected a grey MR image")
        if img.shape != (fr.rows, fr.cols):
            raise DicomSeriesError(f"{fr.name}: pixel data {img.shape} does not match Rows x Columns {(fr.rows, fr.cols)}")
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
        try:
            thick = float(getattr(info.headers[0], "SliceThickness", 1.0) or 1.0) if info.headers else 1.0
        except (TypeError, ValueError):
            thick = float("nan")
        if not (np.isfinite(thick) and thick > 0):
            raise DicomSeriesError(f"{f0.name}: a single slice needs a positive SliceThickness to place it, "
                                   f"got {getattr(info.headers[0], 'SliceThickness', None)!r}")
        lps[:3, 2] = np.cross(f0.row_dir, f0.col_dir) * thick
    lps[:3, 3] = f0.position
    affine = check_affine(LPS_TO_RAS @ lps, _series_where(info))
    ds0 = info.headers[0] if info.headers else None
    from welde_det.io.deid import burned_in_annotation, key_from_env, pseudonymise

    key = deid_key if deid_key is not None else key_from_env()
    window = None
    if ds0 is not None and "WindowCenter" in ds0 and "WindowWidth" in ds0:
        wc, ww = ds0.WindowCenter, ds0.WindowWidth
        try:
            wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
            ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        except (TypeError, ValueError):
            wc = ww = float("nan")
        window = (wc, ww) if np.isfinite(wc) and np.isfinite(ww) and ww >= 1 else None
        if window is None:  # a damaged window is not propagated; percentile windowing is used (and said)
            info.warnings.append("WindowCenter/WindowWidth unusable (non-numeric, non-finite or width < 1); "
                                 "percentile windowing is used")
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
