"""Converter (d): a plain CSV/JSON table of boxes per volume and slice -> COCO.

One row per box. Columns (CSV header or JSON keys; a JSON file is a list of such objects
or ``{"boxes": [...]}``):

=========  ========  =================================================================
column     required  meaning
=========  ========  =================================================================
volume     yes       DICOM series folder, NIfTI file or 2D image, relative to ``root``
class      yes       class name (must be in ``class_names`` when that is given)
x, y, w, h yes [*]_  box in pixels of the displayed slice (top-left corner and size)
x0 .. y1   [*]_      alternatively the corners ``x0, y0, x1, y1``
slice      no        index along the sagittal axis; empty or ``mid`` = mid-sagittal
series     no        series to pick in a DICOM folder with several: its index or 8-hex series hash
                     as the reader's listing shows them (``read_volume(series=)``); default:
                     the converter's ``series`` argument (``--series``), else the one sagittal series
patient    no        patient identifier (default: the volume path); pseudonymised
=========  ========  =================================================================

.. [*] either ``x, y, w, h`` or ``x0, y0, x1, y1``.

Coordinates refer to the slice as :func:`welde_det.io.mid_sagittal` shows it: superior up,
anterior left, ``x`` along columns, pixel-edge convention (pixel ``i`` covers
``[i, i + 1)``). A 2D image is its own single slice. Every (volume, series, slice) becomes
one PNG carrying all its boxes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.datasets.coco import MIN_BOX_SIDE
from welde_det.datasets.sources.common import (
    BoxRecord,
    ConversionError,
    ConversionResult,
    ImageRecord,
    MissingColumnsError,
    UnknownClassError,
    map_items,
    pseudonym,
    slice_like,
    slice_world_x,
    staging_dir,
    window_png,
    write_dataset,
    write_png,
)

__all__ = ["convert_boxes_table", "read_box_table"]

logger = logging.getLogger(__name__)

SOURCE = "box_table"


@dataclass(frozen=True)
class BoxRow:
    """One parsed table row: where it came from and the box."""

    where: str
    volume: str
    series: str | None
    slice: int | None
    patient: str | None
    class_name: str
    bbox: tuple[float, float, float, float]


def _records_from(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise ConversionError(f"{path}: box table not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, Mapping):
            data = data.get("boxes")
        if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
            raise ConversionError(f"{path}: JSON must be a list of box objects or {{'boxes': [...]}}")
        return [(i, dict(r)) for i, r in enumerate(data)]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ConversionError(f"{path}: empty table (no header)")
        return [(lineno, {(k or "").strip(): (v or "").strip() for k, v in row.items()})
                for lineno, row in enumerate(reader, 2)]


def read_box_table(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> list[BoxRow]:
    """Parse and check a box table (see the module docstring for the columns).

    Raises:
        MissingColumnsError: required columns absent (the file and the columns named).
        UnknownClassError: a class outside ``class_names`` (file:line named).
        ConversionError: a non-numeric, non-finite or negative-size box, or a bad slice.
    """
    path = Path(path)
    rows = _records_from(path)
    if not rows:
        raise ConversionError(f"{path}: the table has no rows")
    is_json = path.suffix.lower() == ".json"
    columns = set().union(*(r.keys() for _, r in rows))
    corner_style = {"x0", "y0", "x1", "y1"} <= columns
    need = ["volume", "class"] + (["x0", "y0", "x1", "y1"] if corner_style else ["x", "y", "w", "h"])
    missing = [c for c in need if c not in columns]
    if missing:
        raise MissingColumnsError(
            f"{path}: missing column(s) {missing}; need volume, class and x,y,w,h (or x0,y0,x1,y1); found {sorted(columns)}"
        )
    out = []
    for lineno, row in rows:
        # the table's name only: messages carry no absolute path
        where = f"{path.name}[{lineno}]" if is_json else f"{path.name}:{lineno}"
        absent = [c for c in need if row.get(c) in (None, "")]
        if absent:
            raise MissingColumnsError(f"{where}: empty value(s) for {absent}")
        cls = str(row["class"])
        if class_names is not None and cls not in class_names:
            raise UnknownClassError(f"{where}: class {cls!r} is not one of {list(class_names)}")
        try:
            vals = [float(row[c]) for c in need[2:]]
        except (TypeError, ValueError):
            raise ConversionError(f"{where}: box coordinates must be numbers, got {[row[c] for c in need[2:]]}") from None
        if corner_style:
            vals = [vals[0], vals[1], vals[2] - vals[0], vals[3] - vals[1]]
        if not all(math.isfinite(v) for v in vals) or vals[2] <= MIN_BOX_SIDE or vals[3] <= MIN_BOX_SIDE:
            raise ConversionError(f"{where}: box {vals} must be finite with width and height > {MIN_BOX_SIDE} px "
                                  "(zero-area boxes are refused); fix or remove the row")
        slice_raw = row.get("slice")
        slice_index = None
        if slice_raw not in (None, "") and str(slice_raw).lower() != "mid":
            try:
                slice_index = int(str(slice_raw))
            except ValueError:
                raise ConversionError(f"{where}: slice must be an integer index or 'mid', got {slice_raw!r}") from None
        series = row.get("series")
        patient = row.get("patient")
        out.append(BoxRow(where, str(row["volume"]), str(series) if series not in (None, "") else None,
                          slice_index, str(patient) if patient not in (None, "") else None, cls,
                          (vals[0], vals[1], vals[2], vals[3])))
    return out


@dataclass(frozen=True)
class _VolumeJob:
    path: Path
    series: str | None
    rows: tuple[BoxRow, ...]
    out_images: Path
    patient: str
    volume_id: str
    bit_depth: int
    key: bytes | str | None = None


def _convert_volume(job: _VolumeJob) -> list[ImageRecord]:
    from welde_det.io import mid_sagittal, read_volume

    volume_name = job.rows[0].volume  # as the table gives it (relative to root), never an absolute path
    if not job.path.exists():
        raise ConversionError(f"{job.rows[0].where}: volume {volume_name} not found")
    try:
        volume = read_volume(job.path, series=job.series, deid_key=job.key)
    except (OSError, ValueError) as exc:
        # the row names the volume; its folder name (often a patient's name) is not repeated here
        raise ConversionError(f"{job.rows[0].where}: cannot read the row's volume: {exc}") from exc
    sag = mid_sagittal(volume)
    array = np.asarray(volume.array)
    axis = int(sag.axis)
    by_slice: dict[int, list[BoxRow]] = {}
    for row in job.rows:
        index = int(sag.index) if row.slice is None else row.slice
        if not 0 <= index < array.shape[axis]:
            raise ConversionError(f"{row.where}: slice {index} is outside 0..{array.shape[axis] - 1} of {volume_name}")
        by_slice.setdefault(index, []).append(row)
    records = []
    for index, rows in sorted(by_slice.items()):
        image2d = sag.image if index == sag.index else slice_like(array, sag, index)
        height, width = image2d.shape
        boxes = []
        for row in rows:
            x, y, w, h = row.bbox
            if x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5:
                raise ConversionError(f"{row.where}: box {list(row.bbox)} lies outside the {width}x{height} slice")
            boxes.append(BoxRecord(row.class_name, row.bbox))
        png = window_png(image2d, bit_depth=job.bit_depth, window=sag.window)
        file_name = f"{job.patient}/{job.volume_id}_{index:03d}.png"
        write_png(job.out_images / file_name, png)
        fields = {
            "pixel_spacing": [float(v) for v in sag.pixel_spacing],
            "patient_id": job.patient,
            "series_id": job.volume_id,
            "slice_index": index,
            "slice_axis": axis,
            "world_x": slice_world_x(sag, index),
            "source": SOURCE,
        }
        records.append(ImageRecord(file_name, int(width), int(height), tuple(boxes), fields))
    return records


def convert_boxes_table(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str | bytes,
    root: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    bit_depth: int = 8,
    fractions: Mapping[str, float] | Sequence[float] | None = (0.70, 0.15, 0.15),
    seed: int = 0,
    yolo: bool = False,
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
    series: str | int | None = None,
) -> ConversionResult:
    """Convert a CSV/JSON box table plus its volumes to a COCO dataset.

    Args:
        source: the table (``.csv`` or ``.json``).
        out_dir: dataset folder to create.
        key: de-identification key (kept outside the dataset).
        root: folder the ``volume`` paths are relative to (default: the table's folder).
        class_names: class order and the allowed classes (default: order of appearance).
        bit_depth: 8 or 16-bit PNGs.
        fractions: patient-level split fractions; ``None`` for no splits.
        seed: split seed.
        yolo: also write a YOLO export.
        workers: processes (one volume per task).
        progress: show a progress bar.
        overwrite: replace an existing ``out_dir``.
        series: for DICOM volumes whose row gives no ``series``: the series index or 8-hex
            series hash (as the reader's ambiguity error lists them, keyed with ``key``);
            None reads the one sagittal series and refuses several.

    Raises:
        MissingColumnsError, UnknownClassError, ConversionError: with the file and line.
        OutputLockedError: another process is writing ``out_dir``.
        Nothing is written on error.
    """
    source = Path(source)
    rows = read_box_table(source, class_names)
    names = list(class_names) if class_names is not None else list(dict.fromkeys(r.class_name for r in rows))
    base = Path(root) if root is not None else source.parent
    groups: dict[tuple[str, str | None], list[BoxRow]] = {}
    default_series = None if series is None else str(series)
    for row in rows:
        groups.setdefault((row.volume, row.series if row.series is not None else default_series), []).append(row)
    final_dir = Path(out_dir).absolute()
    with staging_dir(final_dir, overwrite=overwrite) as staging:
        jobs = []
        for (volume, which), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            patients = {r.patient for r in group}
            if len(patients) > 1:
                raise ConversionError(f"{group[0].where}: volume {volume!r} is given {len(patients)} different patients")
            patient_raw = group[0].patient if group[0].patient is not None else volume
            jobs.append(_VolumeJob(
                base / volume, which, tuple(group), staging / "images",
                pseudonym(f"patient:{patient_raw}", key), pseudonym(f"volume:{volume}|{which}", key), bit_depth,
                key,
            ))
        records: list[ImageRecord] = []
        for _job, result in map_items(_convert_volume, jobs, workers=workers, progress=progress, desc="volumes"):
            if isinstance(result, BaseException):
                raise result
            records.extend(result)
        report = {
            "table_rows": len(rows),
            "volumes": len(jobs),
            "patient_grouping": "the table's patient column" if any(r.patient for r in rows)
            else "one patient per volume (no patient column)",
        }
        return write_dataset(staging, records, names, final_dir=final_dir, source=SOURCE,
                             fractions=fractions, seed=seed, yolo=yolo, report=report)
