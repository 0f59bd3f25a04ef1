"""Converter (a): a YOLO-format folder (images + ``labels/*.txt``) -> our COCO dataset.

Reads folders laid out like the public six-class lumbar set: a ``data.yaml`` with
``train``/``val``/``test`` entries, or a bare ``images/[<split>/]`` + ``labels/[<split>/]``
pair. The class names come from ``data.yaml``; a folder that does not name its classes
needs ``class_names`` (label-index order), and names that disagree with ``data.yaml`` are
an error: a wrong class order is never guessed.

Every image is rewritten as a metadata-free greyscale PNG (3-channel grey is reduced to one
channel; colour images are kept as 8-bit colour) under a pseudonymised name, so source file
names, which may carry identifiers, never reach the dataset. Patients are taken from the
file stem with ``patient_pattern`` (a regular expression whose group ``patient``, or first
group, names the patient), or ``patient_pattern="lumbar6"`` for the public six-class lumbar set's
naming (:data:`welde_det.datasets.resolve.LUMBAR6_PATIENT_PATTERN`: ``T1_0012_S8 .png`` and
``0011_T2_TSE_SAG_384_0002_0012_008_R.png`` are patient ``0012``); without it every image is
its own patient, which the report states, because patient-level splitting then cannot be
guaranteed.

Example:
    >>> convert_yolo_dir("lumbar_yolo/", "data/generated/lumbar", key="k",
    ...                  patient_pattern=r"^(?P<patient>\\d+)_")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.datasets.coco import (
    YOLO_SPLITS,
    YoloClassIndexError,
    YoloFormatError,
    label_path_of,
    parse_yolo_label_file,
    resolve_yolo_split,
    yolo_splits,
)
from welde_det.datasets.resolve import LUMBAR6_PATIENT_PATTERN, require_boxes
from welde_det.datasets.sources.common import (
    BoxRecord,
    ConversionError,
    ConversionResult,
    ImageRecord,
    UnknownClassError,
    map_items,
    pseudonym,
    staging_dir,
    write_dataset,
    write_png,
)

__all__ = ["convert_yolo_dir"]

logger = logging.getLogger(__name__)

SOURCE = "yolo_dir"


@dataclass(frozen=True)
class _Item:
    image: Path
    label: Path
    out_png: Path
    file_name: str
    split: str | None
    fields: Mapping[str, Any]


def _read_image(path: Path) -> np.ndarray:
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ConversionError(f"{path}: cannot read the image (corrupt or unsupported format)")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 3:
        if np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 0], arr[:, :, 2]):
            arr = arr[:, :, 0]
        elif arr.dtype != np.uint8:
            raise ConversionError(f"{path}: colour images must be 8-bit, got {arr.dtype}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ConversionError(f"{path}: pixel type {arr.dtype} is not 8- or 16-bit")
    return arr


def _convert_one(item: _Item, class_names: Sequence[str], root: Path | None = None) -> ImageRecord:
    try:
        return _convert_one_unchecked(item, class_names, root)
    except OSError as exc:
        raise ConversionError(f"{item.image}: {exc}") from exc


def _convert_one_unchecked(item: _Item, class_names: Sequence[str], root: Path | None = None) -> ImageRecord:
    arr = _read_image(item.image)
    height, width = arr.shape[:2]
    boxes = []
    if item.label.is_file():
        try:
            rows = parse_yolo_label_file(item.label, len(class_names), image_size=(width, height), root=root)
        except YoloClassIndexError as exc:
            raise UnknownClassError(f"{exc} (classes {list(class_names)})") from None
        except YoloFormatError as exc:
            raise ConversionError(str(exc)) from None
        for cls_idx, cx, cy, w, h in rows:
            bbox = ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
            boxes.append(BoxRecord(class_names[cls_idx], tuple(round(v, 6) for v in bbox)))
    write_png(item.out_png, arr)
    fields = dict(item.fields)
    if item.split is not None:
        fields["source_split"] = item.split
    return ImageRecord(item.file_name, int(width), int(height), tuple(boxes), fields)


def _patient_of(stem: str, pattern: re.Pattern | None, image: Path) -> str:
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None:
        raise ConversionError(f"{image}: patient_pattern {pattern.pattern!r} does not match the file stem")
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)


def convert_yolo_dir(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str | bytes,
    class_names: Sequence[str] | None = None,
    patient_pattern: str | None = None,
    pixel_spacing: Sequence[float] | None = None,
    fractions: Mapping[str, float] | Sequence[float] | None = (0.70, 0.15, 0.15),
    keep_source_splits: bool = False,
    seed: int = 0,
    yolo: bool = False,
    workers: int = 1,
    progress: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert a YOLO folder to a COCO dataset folder (layout in :mod:`.common`).

    Args:
        source: ``data.yaml``, a folder with one, or a bare ``images/`` + ``labels/`` folder.
        out_dir: dataset folder to create.
        key: de-identification key (kept outside the dataset).
        class_names: class order of the label indices; required when the folder has no
            ``data.yaml`` with ``names``, and must equal those names when it has.
        patient_pattern: regex on the file stem naming the patient, or ``"lumbar6"`` (see
            the module docstring).
        pixel_spacing: ``[row_mm, col_mm]`` for every image, when known.
        fractions: patient-level split fractions; ``None`` for no splits.
        keep_source_splits: write the folder's own train/val/test instead of new splits.
        seed: split seed.
        yolo: also write a YOLO export with ``data.yaml``.
        workers: processes for reading and writing images.
        progress: show a progress bar.
        overwrite: replace an existing ``out_dir``.

    Raises:
        ConversionError: unreadable image, label naming a class index outside the class
            list, no class names or names that disagree with ``data.yaml``, bad pattern
            match, or no images (file and line named); nothing is written.
    """
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"{source}: no such YOLO dataset")
    if pixel_spacing is not None:
        spacing = [float(v) for v in pixel_spacing]
        if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ConversionError(f"pixel_spacing {list(pixel_spacing)} must be two positive finite numbers (mm)")
    if patient_pattern == "lumbar6":
        pattern: re.Pattern | None = LUMBAR6_PATIENT_PATTERN
    else:
        pattern = re.compile(patient_pattern) if patient_pattern else None
    try:
        present = yolo_splits(source)
        found = {split: resolve_yolo_split(source, split) for split in present or [None]}
    except YoloFormatError as exc:
        raise ConversionError(str(exc)) from None
    splits = {split: (root, files) for split, (root, files, _names) in found.items()}
    yaml_names = next(iter(found.values()))[2]
    if class_names is not None and yaml_names is not None and list(class_names) != list(yaml_names):
        raise ConversionError(f"{source}: class_names {list(class_names)} disagree with the data.yaml names "
                              f"{list(yaml_names)}; drop --class-names or make them match")
    names = list(class_names) if class_names is not None else yaml_names
    if names is None:
        raise ConversionError(
            f"{source}: the YOLO folder does not name its classes (no data.yaml with 'names'); pass the names in "
            "label-index order (--class-names A,B,..., or add 'names' to a data.yaml): the order is never guessed"
        )
    if keep_source_splits and None in splits:
        raise ConversionError(f"{source}: keep_source_splits needs images/<split>/ folders or a data.yaml")

    final_dir = Path(out_dir).absolute()
    with staging_dir(final_dir, overwrite=overwrite) as staging:
        items = []
        for split, (_root, files) in splits.items():
            for image in files:
                patient = pseudonym(f"patient:{_patient_of(image.stem, pattern, image)}", key)
                stem = pseudonym(f"image:{split}/{image.relative_to(_root).as_posix()}", key)
                file_name = f"{patient}/{stem}.png"
                fields: dict[str, Any] = {"patient_id": patient, "source": SOURCE}
                if pixel_spacing is not None:
                    fields["pixel_spacing"] = [float(v) for v in pixel_spacing]
                items.append(
                    _Item(image, label_path_of(image), staging / "images" / file_name, file_name, split, fields)
                )
        records = []
        worker = functools.partial(_convert_one, class_names=names,
                                   root=source.parent if source.is_file() else source)
        for _item, result in map_items(worker, items, workers=workers, progress=progress, desc="images"):
            if isinstance(result, BaseException):
                raise result
            records.append(result)
        require_boxes(sum(len(r.boxes) for r in records), source, what="the YOLO folder", n_images=len(records))
        report: dict[str, Any] = {
            "patient_grouping": (
                f"regex {pattern.pattern!r} on the file stem"
                if pattern
                else "one patient per image (no patient_pattern given): patient-level splits are not guaranteed"
            ),
        }
        use_fractions = fractions
        if keep_source_splits:
            use_fractions = None
        result = write_dataset(
            staging,
            records,
            names,
            final_dir=final_dir,
            source=SOURCE,
            fractions=use_fractions,
            seed=seed,
            yolo=yolo and not keep_source_splits,
            report=report,
        )
        if keep_source_splits:
            result = _write_source_splits(staging, records, names, final_dir, yolo, result)
    return result


def _write_source_splits(
    staging: Path,
    records: Sequence[ImageRecord],
    names: Sequence[str],
    final_dir: Path,
    yolo: bool,
    result: ConversionResult,
) -> ConversionResult:
    """Keep the source's train/val/test: split the written COCO by ``source_split``."""
    import dataclasses

    from welde_det.datasets.coco import coco_to_yolo, load_coco, save_coco
    from welde_det.datasets.splits import subset_coco

    coco = load_coco(staging / "annotations.json")
    parts = {}
    paths = {}
    for split in YOLO_SPLITS:
        ids = [img["id"] for img in coco["images"] if img.get("source_split") == split]
        if ids:
            parts[split] = subset_coco(coco, ids)
            save_coco(parts[split], staging / "splits" / f"{split}.json")
            paths[split] = final_dir / "splits" / f"{split}.json"
    data_yaml = None
    if yolo:
        coco_to_yolo(parts, staging / "images", staging / "yolo", class_names=names, relative_links=True,
                     dataset_root=final_dir / "yolo")
        data_yaml = final_dir / "yolo" / "data.yaml"
    return dataclasses.replace(result, splits=paths, data_yaml=data_yaml)
