"""Converter (b): the RSNA 2024 Lumbar Spine Degenerative Classification archive -> COCO.

Archive layout read::

    <root>/train_images/<study_id>/<series_id>/<instance_number>.dcm
    <root>/train_label_coordinates.csv   study_id, series_id, instance_number, condition, level, x, y
    <root>/train_series_descriptions.csv study_id, series_id, series_description
    <root>/train.csv                     study_id, <condition>_<level> severities (only for
                                         the severity class schemes)

Each labelled point ``(x, y)`` (column, row in pixels of the instance it was placed on)
becomes a box of ``box_mm`` millimetres centred on it, converted to pixels with the
instance's ``PixelSpacing`` (``[row_mm, col_mm]``: the box is ``box_mm / col_mm`` pixels
wide and ``box_mm / row_mm`` pixels high) and clipped to the image. Every labelled instance
is written once (all its points become boxes on it), as stored in the DICOM (rows top to
bottom, the pixel grid the points were placed on).

Instance numbers are only labels: they are looked up in the headers of the series, and the
slice index written to COCO (``slice_index``) is the instance's rank by position along the
slice normal (``ImagePositionPatient`` projected on ``row x col`` of
``ImageOrientationPatient``) among the instances of that orientation, so it is right even
when instance numbers run backwards or have gaps. ``world_x`` (RAS, mm) is written for
sagittal series.

Class schemes (``class_by``), documented because RSNA labels are (condition, level) pairs
with a per-study severity, not object classes:

* ``"condition"`` (default): the five conditions, e.g. ``Spinal Canal Stenosis``;
* ``"level"``: the five disc levels ``L1/L2`` ... ``L5/S1`` (a disc-level detector);
* ``"condition_level"``: the 25 pairs, e.g. ``Spinal Canal Stenosis L4/L5``;
* ``"severity"``: ``Normal/Mild``, ``Moderate``, ``Severe`` from ``train.csv``;
* ``"condition_severity"``: the 15 pairs, e.g. ``Spinal Canal Stenosis Severe``.

``class_map`` then renames or merges these keys (a key mapped to ``None`` is dropped);
a key the scheme does not know, or the map does not cover, is an
:class:`~welde_det.datasets.sources.common.UnknownClassError` naming the CSV file and line.
Patient ids come from the DICOM ``PatientID`` when present, else from the study id (RSNA
releases one study per patient); all identifiers pass through the keyed pseudonym.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.datasets.sources.common import (
    BoxRecord,
    ConversionError,
    ConversionResult,
    ImageRecord,
    MissingColumnsError,
    UnknownClassError,
    map_items,
    pseudonym,
    staging_dir,
    window_png,
    write_dataset,
    write_png,
)

__all__ = ["CLASS_SCHEMES", "RSNA_CONDITIONS", "RSNA_LEVELS", "RSNA_SEVERITIES", "convert_rsna_lsdc"]

logger = logging.getLogger(__name__)

SOURCE = "rsna_lsdc"
RSNA_CONDITIONS: tuple[str, ...] = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
RSNA_LEVELS: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
RSNA_SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
RSNA_SERIES_TYPES: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
CLASS_SCHEMES: dict[str, tuple[str, ...]] = {
    "condition": RSNA_CONDITIONS,
    "level": RSNA_LEVELS,
    "condition_level": tuple(f"{c} {lv}" for c in RSNA_CONDITIONS for lv in RSNA_LEVELS),
    "severity": RSNA_SEVERITIES,
    "condition_severity": tuple(f"{c} {s}" for c in RSNA_CONDITIONS for s in RSNA_SEVERITIES),
}
_COORD_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
_SERIES_COLUMNS = ("study_id", "series_id", "series_description")


@dataclass(frozen=True)
class _Point:
    instance_number: int
    x: float
    y: float
    class_name: str
    condition: str
    level: str


@dataclass(frozen=True)
class _SeriesJob:
    study: str
    series: str
    folder: Path
    description: str | None
    points: tuple[_Point, ...]
    out_images: Path
    key: str | bytes
    box_mm: tuple[float, float]
    bit_depth: int
    percentiles: tuple[float, float]


# ---------------------------------------------------------------------------- CSV reading
def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found (the RSNA archive needs it)")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise MissingColumnsError(f"{path}: missing column(s) {missing}; found {header}")
        return [(lineno, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for lineno, row in
                enumerate(reader, 2)]


def _severity_table(path: Path) -> dict[str, dict[str, str]]:
    rows = _read_csv(path, ("study_id",))
    return {row["study_id"]: row for _, row in rows}


def _severity_column(condition: str, level: str) -> str:
    return f"{condition.lower().replace(' ', '_')}_{level.lower().replace('/', '_')}"


def _class_key(
    scheme: str, condition: str, level: str, study: str, severities: Mapping[str, Mapping[str, str]] | None,
    where: str,
) -> str:
    if condition not in RSNA_CONDITIONS:
        raise UnknownClassError(f"{where}: unknown condition {condition!r}; RSNA conditions are {list(RSNA_CONDITIONS)}")
    if level not in RSNA_LEVELS:
        raise UnknownClassError(f"{where}: unknown level {level!r}; RSNA levels are {list(RSNA_LEVELS)}")
    if scheme == "condition":
        return condition
    if scheme == "level":
        return level
    if scheme == "condition_level":
        return f"{condition} {level}"
    assert severities is not None  # checked by the caller: the severity schemes load train.csv
    column = _severity_column(condition, level)
    severity = severities.get(study, {}).get(column, "")
    if severity not in RSNA_SEVERITIES:
        raise UnknownClassError(
            f"{where}: study {study} has severity {severity!r} in train.csv column {column!r}; "
            f"expected one of {list(RSNA_SEVERITIES)}"
        )
    return severity if scheme == "severity" else f"{condition} {severity}"


# ---------------------------------------------------------------------------- per-series work
def _read_header(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ConversionError(f"{path}: not a readable DICOM file ({exc})") from exc


def _geometry(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        spacing = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConversionError(
            f"{path}: missing or malformed geometry (ImageOrientationPatient, ImagePositionPatient, "
            f"PixelSpacing, Rows, Columns): {exc}"
        ) from None
    finite = all(np.isfinite(v).all() for v in (iop, ipp, spacing))
    if iop.shape != (6,) or ipp.shape != (3,) or spacing.shape != (2,) or not finite or not np.all(spacing > 0):
        raise ConversionError(f"{path}: malformed geometry values (IOP {iop}, IPP {ipp}, spacing {spacing})")
    return iop, ipp, spacing, rows, cols


def _pixels(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ConversionError(f"{path}: not a readable DICOM file ({exc})") from exc
    try:
        arr = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for corrupt or undecodable pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and syntax.is_compressed:
            hint = f" (compressed transfer syntax {syntax.name}: install pylibjpeg or python-gdcm to decode it)"
        raise ConversionError(f"{path}: cannot decode pixel data: {exc}{hint}") from None
    if arr.ndim != 2:
        raise ConversionError(f"{path}: expected a single-frame 2D image, got pixel array shape {arr.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept


def _convert_series(job: _SeriesJob) -> dict[str, Any]:
    from welde_det.io.deid import burned_in_annotation

    if not job.folder.is_dir():
        raise ConversionError(f"{job.folder}: series folder not found (labelled in train_label_coordinates.csv)")
    files = sorted(p for p in job.folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not files:
        raise ConversionError(f"{job.folder}: no .dcm files")
    headers = {}
    by_instance: dict[int, Path] = {}
    for path in files:
        ds = _read_header(path)
        if "InstanceNumber" not in ds or ds.InstanceNumber in (None, ""):
            raise ConversionError(f"{path}: no InstanceNumber")
        number = int(ds.InstanceNumber)
        if number in by_instance:
            raise ConversionError(f"{path}: InstanceNumber {number} also in {by_instance[number].name}")
        by_instance[number] = path
        headers[path] = ds
    patient_raw = next((str(ds.PatientID) for ds in headers.values() if str(getattr(ds, "PatientID", "") or "")), None)
    patient = pseudonym(f"patient:{patient_raw}" if patient_raw is not None else f"patient:rsna-study:{job.study}", job.key)
    study = pseudonym(f"study:{job.study}", job.key)
    series = pseudonym(f"series:{job.study}/{job.series}", job.key)
    burned = any(burned_in_annotation(ds) for ds in headers.values())

    geometry = {p: _geometry(ds, p) for p, ds in headers.items()}
    records = []
    points_by_instance: dict[int, list[_Point]] = {}
    for pt in job.points:
        points_by_instance.setdefault(pt.instance_number, []).append(pt)
    for number, points in sorted(points_by_instance.items()):
        if number not in by_instance:
            raise ConversionError(
                f"{job.folder}: labelled instance_number {number} is not in the series headers "
                f"(instances found: {sorted(by_instance)[:5]}... {len(by_instance)} in all)"
            )
        path = by_instance[number]
        iop, ipp, spacing, rows, cols = geometry[path]
        normal = np.cross(iop[:3], iop[3:])
        same = [p for p, g in geometry.items() if np.allclose(g[0], iop, atol=1e-3)]
        positions = sorted((float(np.dot(geometry[p][1], normal)), p.name) for p in same)
        slice_index = positions.index((float(np.dot(ipp, normal)), path.name))
        image = _pixels(path)
        if image.shape != (rows, cols):
            raise ConversionError(f"{path}: pixel array {image.shape} disagrees with Rows/Columns {(rows, cols)}")
        png = window_png(image, bit_depth=job.bit_depth, percentiles=job.percentiles)
        file_name = f"{patient}/{study}_{series}_{slice_index:03d}.png"
        write_png(job.out_images / file_name, png)
        box_w = job.box_mm[1] / spacing[1]
        box_h = job.box_mm[0] / spacing[0]
        boxes = []
        for pt in points:
            if not (0 <= pt.x <= cols and 0 <= pt.y <= rows):
                raise ConversionError(
                    f"{path}: point ({pt.x}, {pt.y}) for {pt.condition} {pt.level} lies outside the "
                    f"{cols}x{rows} image"
                )
            x0, x1 = max(pt.x - box_w / 2, 0.0), min(pt.x + box_w / 2, float(cols))
            y0, y1 = max(pt.y - box_h / 2, 0.0), min(pt.y + box_h / 2, float(rows))
            boxes.append(BoxRecord(
                pt.class_name,
                (round(x0, 4), round(y0, 4), round(x1 - x0, 4), round(y1 - y0, 4)),
                {"rsna_condition": pt.condition, "rsna_level": pt.level, "point": [pt.x, pt.y]},
            ))
        fields: dict[str, Any] = {
            "pixel_spacing": [float(spacing[0]), float(spacing[1])],
            "patient_id": patient,
            "study_id": study,
            "series_id": series,
            "slice_index": slice_index,
            "source": SOURCE,
            "instance_number": number,
        }
        if job.description in RSNA_SERIES_TYPES:
            fields["series_description"] = job.description
        if abs(normal[0]) >= max(abs(normal[1]), abs(normal[2])):
            fields["world_x"] = -float(ipp[0])  # LPS -> RAS flips x; the slice plane's x
        records.append(ImageRecord(file_name, cols, rows, tuple(boxes), fields))
    return {"records": records, "burned_in": burned, "series": series}


# ---------------------------------------------------------------------------- driver
def convert_rsna_lsdc(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str | bytes,
    class_by: str = "condition",
    class_map: Mapping[str, str | None] | None = None,
    series_types: Sequence[str] | None = None,
    box_mm: float | Sequence[float] = 10.0,
    bit_depth: int = 8,
    percentiles: tuple[float, float] = (0.5, 99.5),
    fractions: Mapping[str, float] | Sequence[float] | None = (0.70, 0.15, 0.15),
    seed: int = 0,
    yolo: bool = False,
    skip_bad: bool = False,
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert the RSNA 2024 lumbar archive (layout in the module docstring) to COCO.

    Args:
        root: archive folder.
        out_dir: dataset folder to create.
        key: de-identification key (kept outside the dataset).
        class_by: class scheme (``condition``, ``level``, ``condition_level``,
            ``severity``, ``condition_severity``).
        class_map: renames/merges scheme keys to class names; ``None`` values drop a key.
            Class order is the order of first appearance of each name in the map.
        series_types: keep only these series descriptions (e.g. ``["Sagittal T2/STIR"]``).
        box_mm: box side in mm, or ``(height_mm, width_mm)``.
        bit_depth: 8 or 16-bit PNGs.
        percentiles: intensity window per slice (low, high percentile).
        fractions: patient-level split fractions; ``None`` for no splits.
        seed: split seed.
        yolo: also write a YOLO export.
        skip_bad: report and skip a series that cannot be read, instead of stopping.
        workers: processes (one series per task).
        progress: show a progress bar.
        overwrite: replace an existing ``out_dir``.

    Raises:
        MissingColumnsError: a CSV lacks a required column.
        UnknownClassError: a condition/level/severity outside the scheme or map (CSV line named).
        ConversionError: an unreadable series (unless ``skip_bad``), a labelled instance
            missing from the headers, or nothing to convert. Nothing is written on error.
    """
    root = Path(root)
    if class_by not in CLASS_SCHEMES:
        raise ConversionError(f"class_by={class_by!r}; choose one of {list(CLASS_SCHEMES)}")
    box = (float(box_mm), float(box_mm)) if np.isscalar(box_mm) else tuple(float(v) for v in box_mm)  # type: ignore[arg-type]
    if len(box) != 2 or not all(np.isfinite(v) and v > 0 for v in box):
        raise ConversionError(f"box_mm must be a positive size in mm or (height_mm, width_mm), got {box_mm!r}")
    if not root.is_dir():
        raise ConversionError(f"{root}: RSNA archive folder not found")
    coord_csv = root / "train_label_coordinates.csv"
    series_csv = root / "train_series_descriptions.csv"
    coords = _read_csv(coord_csv, _COORD_COLUMNS)
    descriptions = {(r["study_id"], r["series_id"]): r["series_description"] for _, r in _read_csv(series_csv, _SERIES_COLUMNS)}
    severities = _severity_table(root / "train.csv") if "severity" in class_by else None
    scheme_keys = CLASS_SCHEMES[class_by]
    if class_map is not None:
        unknown = [k for k in class_map if k not in scheme_keys]
        if unknown:
            raise UnknownClassError(f"class_map keys {unknown} are not {class_by!r} keys; valid keys: {list(scheme_keys)}")
        class_names = list(dict.fromkeys(v for v in class_map.values() if v is not None))
    else:
        class_names = list(scheme_keys)
    if series_types is not None:
        bad = [s for s in series_types if s not in RSNA_SERIES_TYPES]
        if bad:
            raise ConversionError(f"series_types {bad} unknown; RSNA series types are {list(RSNA_SERIES_TYPES)}")

    grouped: dict[tuple[str, str], list[_Point]] = {}
    dropped = 0
    for lineno, row in coords:
        where = f"{coord_csv}:{lineno}"
        study, series = row["study_id"], row["series_id"]
        if (study, series) not in descriptions:
            raise ConversionError(f"{where}: series {study}/{series} is not in {series_csv.name}")
        if series_types is not None and descriptions[(study, series)] not in series_types:
            continue
        try:
            number = int(float(row["instance_number"]))
            x, y = float(row["x"]), float(row["y"])
        except ValueError:
            raise ConversionError(f"{where}: instance_number, x and y must be numbers: {row}") from None
        key_name = _class_key(class_by, row["condition"], row["level"], study, severities, where)
        if class_map is not None:
            if key_name not in class_map:
                raise UnknownClassError(f"{where}: {key_name!r} is not covered by class_map {dict(class_map)}")
            if class_map[key_name] is None:
                dropped += 1
                continue
            key_name = class_map[key_name]  # type: ignore[assignment]
        grouped.setdefault((study, series), []).append(
            _Point(number, x, y, key_name, row["condition"], row["level"])
        )
    if not grouped:
        raise ConversionError(f"{coord_csv}: no labelled points left to convert (series_types={series_types})")

    final_dir = Path(out_dir).absolute()
    with staging_dir(final_dir, overwrite=overwrite) as staging:
        jobs = [
            _SeriesJob(study, series, root / "train_images" / study / series, descriptions[(study, series)],
                       tuple(points), staging / "images", key, box, bit_depth, tuple(percentiles))
            for (study, series), points in sorted(grouped.items())
        ]
        records: list[ImageRecord] = []
        skipped, burned = [], 0
        for job, result in map_items(_convert_series, jobs, workers=workers, progress=progress, desc="series"):
            if isinstance(result, ConversionError) and skip_bad:
                # the report names the pseudonymised series only; the log names the file
                logger.warning("skipping series: %s", result)
                skipped.append({
                    "series_id": pseudonym(f"series:{job.study}/{job.series}", key),
                    "reason": "unreadable or inconsistent series (details in the conversion log)",
                })
                continue
            if isinstance(result, BaseException):
                raise result
            records.extend(result["records"])
            burned += int(result["burned_in"])
        report = {
            "class_scheme": class_by,
            "class_map": dict(class_map) if class_map is not None else None,
            "box_mm": list(box),
            "series_types": list(series_types) if series_types is not None else None,
            "series_converted": len(jobs) - len(skipped),
            "series_skipped": skipped,
            "points_dropped_by_class_map": dropped,
            "series_with_burned_in_annotation": burned,
            "patient_key": "DICOM PatientID when present, else study_id (pseudonymised)",
        }
        return write_dataset(
            staging, records, class_names, final_dir=final_dir, source=SOURCE,
            fractions=fractions, seed=seed, yolo=yolo, report=report,
        )
