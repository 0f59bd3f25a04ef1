"""Converter (c): NIfTI label masks (e.g. SPIDER vertebra/disc codes) -> boxes on the mid-sagittal slice.

Folder layout read (case names match after removing ``.nii``/``.nii.gz``)::

    <source>/images/<case>.nii.gz     the MR volume
    <source>/masks/<case>.nii.gz      integer label volume on the same voxel grid
                                      (a folder named labels/ is accepted too)

For every case the image's mid-sagittal slice is chosen by :func:`welde_det.io.mid_sagittal`
and the mask is cut at the same index across the same axis, both shown superior up and
anterior left. Each label value present on that slice becomes one box (``per="label"``:
the bounding box of all its pixels) or one box per 8-connected component
(``per="component"``, components under ``min_pixels`` ignored). Boxes use pixel-edge
coordinates: a label covering columns ``c0..c1`` gives ``x = c0``, ``w = c1 - c0 + 1``.

``label_map`` maps label values to class names: keys are integers or inclusive ranges
``"a-b"``; a value ``None`` ignores that label. A label value on the slice that the map does
not cover is an :class:`UnknownClassError` naming the mask file and the value.
:data:`SPIDER_LABEL_MAP` is the SPIDER lumbar set's coding (vertebrae 1-25, spinal canal
100, discs 201-225).

Patients are the case names, or the ``patient_pattern`` group (SPIDER's ``12_t1`` and
``12_t2`` share patient 12 with ``patient_pattern=r"^(\\d+)_"``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
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
    UnknownClassError,
    map_items,
    pseudonym,
    slice_like,
    staging_dir,
    window_png,
    write_dataset,
    write_png,
)

__all__ = ["SPIDER_LABEL_MAP", "convert_masks", "mask_boxes", "parse_label_map"]

logger = logging.getLogger(__name__)

SOURCE = "nifti_masks"
#: SPIDER lumbar MRI label coding: vertebrae 1-25, spinal canal 100, intervertebral discs 201-225.
SPIDER_LABEL_MAP: dict[str, str | None] = {"1-25": "vertebra", "100": "spinal_canal", "201-225": "disc"}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def parse_label_map(label_map: Mapping[Any, str | None] | str) -> tuple[dict[int, str | None], list[str]]:
    """Expand a label map into ``{value: class or None}`` and the class order.

    Args:
        label_map: ``"spider"`` or a mapping whose keys are integers, integer strings or
            inclusive ranges ``"a-b"`` and whose values are class names or ``None``.

    Returns:
        The per-value map and the class names in order of first appearance.

    Raises:
        ConversionError: a malformed key, an empty range, or a value mapped twice.
    """
    if isinstance(label_map, str):
        if label_map.lower() != "spider":
            raise ConversionError(f"label_map {label_map!r}: give 'spider' or a mapping of label values to classes")
        label_map = SPIDER_LABEL_MAP
    values: dict[int, str | None] = {}
    for raw_key, cls in label_map.items():
        key = str(raw_key).strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", key)
        try:
            lo, hi = (int(match.group(1)), int(match.group(2))) if match else (int(key), int(key))
        except ValueError:
            raise ConversionError(f"label_map key {raw_key!r} is not an integer or a range 'a-b'") from None
        if hi < lo:
            raise ConversionError(f"label_map range {raw_key!r} is empty")
        if cls is not None and (not isinstance(cls, str) or not cls):
            raise ConversionError(f"label_map value for {raw_key!r} must be a class name or null, got {cls!r}")
        for v in range(lo, hi + 1):
            if v in values:
                raise ConversionError(f"label value {v} is mapped twice in label_map (key {raw_key!r})")
            values[v] = cls
    if 0 in values:
        raise ConversionError("label value 0 is the background and cannot be mapped")
    names = list(dict.fromkeys(c for c in values.values() if c is not None))
    if not names:
        raise ConversionError("label_map maps no label to a class")
    return values, names


def mask_boxes(
    mask: np.ndarray,
    value_to_class: Mapping[int, str | None],
    *,
    per: str = "label",
    min_pixels: int = 1,
    source: str = "<mask>",
) -> list[BoxRecord]:
    """Boxes of the labels on a 2D mask slice.

    Args:
        mask: integer label image.
        value_to_class: from :func:`parse_label_map`.
        per: ``"label"`` (one box per value) or ``"component"`` (per 8-connected component).
        min_pixels: components (or labels) with fewer pixels are ignored.
        source: file named in errors.

    Returns:
        Boxes sorted by label value, then by position; ``extra`` holds the label value.

    Shape:
        mask: ``(rows, cols)``.
    """
    from scipy import ndimage

    if per not in ("label", "component"):
        raise ConversionError(f"per={per!r}; choose 'label' or 'component'")
    boxes = []
    for value in np.unique(mask):
        value = int(value)
        if value == 0:
            continue
        if value not in value_to_class:
            known = sorted(value_to_class)
            raise UnknownClassError(
                f"{source}: label value {value} is not in the label map (mapped values: "
                f"{known[:10]}{'...' if len(known) > 10 else ''})"
            )
        cls = value_to_class[value]
        if cls is None:
            continue
        region = mask == value
        if per == "label":
            parts = [region]
        else:
            labelled, count = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
            parts = [labelled == i for i in range(1, count + 1)]
        for part in parts:
            if int(part.sum()) < min_pixels:
                continue
            rows, cols = np.nonzero(part)
            r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
            boxes.append(BoxRecord(cls, (float(c0), float(r0), float(c1 - c0 + 1), float(r1 - r0 + 1)),
                                   {"label_value": value}))
    return boxes


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {_case_name(p): p for p in sorted(folder.iterdir()) if p.name.endswith(_NIFTI_SUFFIXES)}


@dataclass(frozen=True)
class _Case:
    name: str
    image: Path
    mask: Path
    file_name: str
    out_png: Path
    fields: Mapping[str, Any]


def _convert_case(
    case: _Case, value_to_class: Mapping[int, str | None], per: str, min_pixels: int, bit_depth: int, refine: bool
) -> ImageRecord:
    from welde_det.io import mid_sagittal, read_volume

    try:
        volume = read_volume(case.image)
        labels = read_volume(case.mask)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"case {case.name}: {exc}") from exc
    image_arr = np.asarray(volume.array)
    label_arr = np.asarray(labels.array)
    if label_arr.shape != image_arr.shape:
        raise ConversionError(
            f"{case.mask}: label volume shape {label_arr.shape} does not match the image {case.image} {image_arr.shape}"
        )
    if not np.allclose(np.asarray(labels.affine), np.asarray(volume.affine), atol=1e-3):
        raise ConversionError(f"{case.mask}: affine differs from {case.image}; masks must share the image's voxel grid")
    rounded = np.rint(label_arr)
    if not np.array_equal(rounded, label_arr) or rounded.min() < 0:
        raise ConversionError(f"{case.mask}: label volume must hold non-negative integers")
    sag = mid_sagittal(volume, refine=refine)
    mask2d = slice_like(rounded.astype(np.int64), sag)
    boxes = mask_boxes(mask2d, value_to_class, per=per, min_pixels=min_pixels, source=str(case.mask))
    png = window_png(sag.image, bit_depth=bit_depth, window=sag.window)
    write_png(case.out_png, png)
    fields = dict(case.fields)
    fields.update(
        pixel_spacing=[float(v) for v in sag.pixel_spacing],
        slice_index=int(sag.index),
        slice_axis=int(sag.axis),
        world_x=float(sag.world_x),
    )
    return ImageRecord(case.file_name, int(png.shape[1]), int(png.shape[0]), tuple(boxes), fields)


def convert_masks(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str | bytes,
    label_map: Mapping[Any, str | None] | str = "spider",
    per: str = "label",
    min_pixels: int = 1,
    patient_pattern: str | None = None,
    refine: bool = False,
    bit_depth: int = 8,
    fractions: Mapping[str, float] | Sequence[float] | None = (0.70, 0.15, 0.15),
    seed: int = 0,
    yolo: bool = False,
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert ``images/`` + ``masks/`` NIfTI pairs to a COCO dataset of mid-sagittal slices.

    Args:
        source: folder with ``images/`` and ``masks/`` (or ``labels/``).
        out_dir: dataset folder to create.
        key: de-identification key (kept outside the dataset).
        label_map: ``"spider"`` or ``{value or "a-b": class or None}`` (see module docstring).
        per: ``"label"`` or ``"component"``.
        min_pixels: smallest region kept.
        patient_pattern: regex on the case name; group ``patient`` (or the first) names it.
        refine: let :func:`welde_det.io.mid_sagittal` move the slice towards the spinal canal.
        bit_depth: 8 or 16-bit PNGs.
        fractions: patient-level split fractions; ``None`` for no splits.
        seed: split seed.
        yolo: also write a YOLO export.
        workers: processes (one case per task).
        progress: show a progress bar.
        overwrite: replace an existing ``out_dir``.

    Raises:
        ConversionError: missing folders or partners, mismatched grids, unreadable
            volumes; :class:`UnknownClassError` for unmapped label values. Nothing is written.
    """
    source = Path(source)
    value_to_class, class_names = parse_label_map(label_map)
    images_dir = source / "images"
    masks_dir = next((source / n for n in ("masks", "labels") if (source / n).is_dir()), None)
    if not images_dir.is_dir() or masks_dir is None:
        raise ConversionError(f"{source}: expected images/ and masks/ (or labels/) folders of NIfTI volumes")
    images, masks = _nifti_files(images_dir), _nifti_files(masks_dir)
    if not images:
        raise ConversionError(f"{images_dir}: no .nii/.nii.gz volumes")
    lonely = sorted(set(images) ^ set(masks))
    if lonely:
        name = lonely[0]
        where = images[name] if name in images else masks[name]
        raise ConversionError(f"{where}: no partner in {'masks' if name in images else 'images'}/ "
                              f"({len(lonely)} unpaired case(s))")
    pattern = re.compile(patient_pattern) if patient_pattern else None

    final_dir = Path(out_dir).absolute()
    with staging_dir(final_dir, overwrite=overwrite) as staging:
        cases = []
        for name in sorted(images):
            patient_raw = name
            if pattern is not None:
                m = pattern.search(name)
                if m is None:
                    raise ConversionError(f"{images[name]}: patient_pattern {patient_pattern!r} does not match {name!r}")
                patient_raw = m.group("patient") if "patient" in pattern.groupindex else (
                    m.group(1) if pattern.groups else m.group(0))
            patient = pseudonym(f"patient:{patient_raw}", key)
            file_name = f"{patient}/{pseudonym(f'case:{name}', key)}.png"
            cases.append(_Case(name, images[name], masks[name], file_name, staging / "images" / file_name,
                               {"patient_id": patient, "series_id": pseudonym(f"case:{name}", key),
                                "source": SOURCE}))
        worker = functools.partial(_convert_case, value_to_class=value_to_class, per=per,
                                   min_pixels=min_pixels, bit_depth=bit_depth, refine=refine)
        records = []
        for _case, result in map_items(worker, cases, workers=workers, progress=progress, desc="cases"):
            if isinstance(result, BaseException):
                raise result
            records.append(result)
        report = {
            "label_map": {str(k): v for k, v in (SPIDER_LABEL_MAP if isinstance(label_map, str) else label_map).items()},
            "boxes_per": per,
            "min_pixels": min_pixels,
            "patient_grouping": f"regex {patient_pattern!r} on the case name" if pattern else "one patient per case",
        }
        return write_dataset(staging, records, class_names, final_dir=final_dir, source=SOURCE,
                             fractions=fractions, seed=seed, yolo=yolo, report=report)
