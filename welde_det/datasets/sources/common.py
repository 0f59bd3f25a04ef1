"""What every converter shares: typed errors, PHI-free PNG writing, staging and the final layout.

A converter turns one source (a YOLO folder, the RSNA 2024 archive, NIfTI label masks, a
box table) into :class:`ImageRecord` s, writing one PNG per record into a staging folder.
:func:`write_dataset` then assigns ids, writes the COCO files, the patient-level splits,
the optional YOLO export and a report, and moves the finished folder into place. The
layout written (documented in ``data/README.md``)::

    out_dir/
      images/<patient>/<name>.png     8- or 16-bit greyscale PNG, no text chunks
      annotations.json                COCO, every image; file_name relative to images/
      splits/{train,val,test}.json    patient-level stratified splits (when requested)
      yolo/data.yaml, yolo/images/<split>/, yolo/labels/<split>/   (when requested)
      report.json                     counts, class statistics, skipped items (no PHI)

Identifiers (patients, studies, series, file stems) enter the dataset only through
:func:`welde_det.io.deid.pseudonymise` with a key kept outside the dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.datasets.coco import (
    coco_to_yolo,
    make_annotation,
    make_categories,
    make_image_entry,
    replace_dir,
    save_coco,
)
from welde_det.errors import UserError
from welde_det.utils.fileio import atomic_write_bytes, atomic_write_json
from welde_det.utils.locking import (
    OWNER_FILE,
    OutputLockedError,
    make_staging,
    output_lock,
    remove_dead_staging,
)

__all__ = [
    "BoxRecord",
    "ConversionError",
    "ConversionResult",
    "ImageRecord",
    "MissingColumnsError",
    "OutputLockedError",
    "UnknownClassError",
    "map_items",
    "pseudonym",
    "slice_like",
    "slice_world_x",
    "staging_dir",
    "window_png",
    "write_dataset",
    "write_png",
]

logger = logging.getLogger(__name__)


class ConversionError(UserError):
    """A source cannot be converted; the message names the file (and line) and the problem."""


class UnknownClassError(ConversionError):
    """A label names a class that is not in the class list / class map (file:line named)."""


class MissingColumnsError(ConversionError):
    """A CSV/JSON table lacks required columns (file and missing columns named)."""


@dataclass(frozen=True)
class BoxRecord:
    """One box on an image: class name and COCO ``[x, y, w, h]`` in pixels."""

    class_name: str
    bbox: tuple[float, float, float, float]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """One written PNG and its boxes, before COCO ids are assigned.

    Attributes:
        file_name: PNG path relative to ``out_dir/images`` (pseudonymised components only).
        width: image columns.
        height: image rows.
        boxes: the boxes on the image.
        fields: extra COCO image fields (``pixel_spacing``, ``patient_id``, ``study_id``,
            ``series_id``, ``slice_index``, ``slice_axis``, ``world_x``, ``source``, ...).
    """

    file_name: str
    width: int
    height: int
    boxes: tuple[BoxRecord, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversionResult:
    """Paths of a finished conversion."""

    out_dir: Path
    coco: Path
    splits: dict[str, Path]
    data_yaml: Path | None
    report: Path
    num_images: int
    num_boxes: int


# ---------------------------------------------------------------------------- identifiers
def pseudonym(value: Any, key: str | bytes, *, length: int = 12) -> str:
    """Keyed pseudonym (hex, file-name safe) of an identifier: :func:`welde_det.io.deid.pseudonymise`.

    Args:
        value: the identifier (patient ID, study UID, file stem, ...), prefixed by its kind
            by the callers (``"patient:..."``) so equal strings of different kinds differ.
        key: the secret key, kept outside the dataset.
        length: hex characters kept (12 = 48 bits: collisions are negligible below ~10^6 ids).
    """
    from welde_det.io.deid import pseudonymise

    try:
        return pseudonymise(str(value), key, length=length)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


# ---------------------------------------------------------------------------- PNG writing
def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a 2D ``uint8``/``uint16`` image (or ``(H, W, 3)`` ``uint8``), no metadata.

    OpenCV's encoder writes only ``IHDR``, ``IDAT`` and ``IEND`` chunks, so no text chunk can
    carry patient information.
    """
    import cv2

    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ConversionError(f"PNG slices must be uint8 or uint16, got {arr.dtype}")
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8):
        raise ConversionError(f"PNG slices must be (H, W) greyscale or (H, W, 3) 8-bit, got shape {arr.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise ConversionError(f"OpenCV could not encode a {arr.shape} {arr.dtype} PNG")
    return buf.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image`` as a metadata-free PNG, atomically (see :func:`encode_png`)."""
    return atomic_write_bytes(path, encode_png(image))


# ---------------------------------------------------------------------------- slices
def slice_like(array: np.ndarray, sagittal: Any, index: int | None = None) -> np.ndarray:
    """Cut ``array`` exactly as :func:`welde_det.io.mid_sagittal` cut ``sagittal.image``.

    Used to take a label volume (or another slice index) on the same voxel grid and show it
    the same way (superior up, anterior left), so boxes found on it lie on the image.

    Args:
        array: 3D voxels on the grid of the volume ``sagittal`` came from.
        sagittal: a :class:`welde_det.io.SagittalSlice`.
        index: slice index across ``sagittal.axis`` (default ``sagittal.index``).

    Shape:
        array: ``sagittal.shape3d``; returns ``sagittal.image.shape``.
    """
    array = np.asarray(array)
    if tuple(array.shape) != tuple(sagittal.shape3d):
        raise ConversionError(f"array shape {array.shape} differs from the volume's {tuple(sagittal.shape3d)}")
    index = int(sagittal.index if index is None else index)
    axis = int(sagittal.axis)
    if not 0 <= index < array.shape[axis]:
        raise ConversionError(f"slice index {index} is outside 0..{array.shape[axis] - 1} along axis {axis}")
    sl = np.take(array, index, axis=axis)
    in_plane = [a for a in range(3) if a != axis]
    if in_plane.index(int(sagittal.row_axis)) != 0:
        sl = sl.T
    if sagittal.flip_rows:
        sl = sl[::-1, :]
    if sagittal.flip_cols:
        sl = sl[:, ::-1]
    return np.ascontiguousarray(sl)


def slice_world_x(sagittal: Any, index: int) -> float:
    """RAS x (mm) of the centre of slice ``index`` across ``sagittal.axis``."""
    centre = np.array([(n - 1) / 2 for n in sagittal.shape3d], dtype=np.float64)
    centre[int(sagittal.axis)] = index
    return float((np.asarray(sagittal.affine, dtype=np.float64) @ np.array([*centre, 1.0]))[0])


def window_png(image: np.ndarray, *, bit_depth: int, window: Sequence[float] | None = None,
               percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Window a slice to ``uint8``/``uint16`` with :func:`welde_det.io.window_image`.

    Args:
        image: real-valued slice.
        bit_depth: 8 or 16.
        window: DICOM ``(center, width)``; ``None`` clips at ``percentiles``.
        percentiles: low/high percentiles mapped to black and white.
    """
    from welde_det.io import window_image

    if bit_depth not in (8, 16):
        raise ConversionError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if window is not None:
        return window_image(image, center=float(window[0]), width=float(window[1]), bit_depth=bit_depth)
    return window_image(image, percentiles=tuple(percentiles), bit_depth=bit_depth)


# ---------------------------------------------------------------------------- parallel map
def map_items(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    progress: bool = False,
    desc: str = "converting",
) -> Iterator[tuple[Any, Any | BaseException]]:
    """Apply ``fn`` to every item, in a process pool when ``workers > 1``.

    Yields ``(item, result_or_exception)`` in completion order; exceptions raised by ``fn``
    are yielded, not raised, so the caller decides between stopping and reporting. When the
    caller stops early (e.g. raises), the pending items are cancelled.

    Args:
        fn: a picklable module-level function (a ``functools.partial`` of one is fine).
        items: picklable work items (one series, case or image each).
        workers: processes; ``1`` runs in this process (no pickling, easy debugging).
        progress: show a tqdm bar (the command-line tool turns it on).
        desc: bar label.
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True)
    try:
        if workers <= 1:
            for item in items:
                try:
                    result: Any = fn(item)
                except Exception as exc:
                    result = exc
                if bar is not None:
                    bar.update(1)
                yield item, result
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures: dict[Future, Any] = {pool.submit(fn, item): item for item in items}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        exc = fut.exception()
                        if bar is not None:
                            bar.update(1)
                        yield futures[fut], (exc if exc is not None else fut.result())
            finally:
                for fut in pending:
                    fut.cancel()
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------- staging
@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out_dir``; moved into place on success, deleted on failure.

    The whole block runs under an exclusive lock on ``out_dir``
    (:func:`welde_det.utils.locking.output_lock`, file ``OUT.lock`` beside it): a second
    conversion into the same folder fails at once, naming the first. Staging folders of
    ``out_dir`` left by conversions that died (killed, power loss) are removed first; a live
    process's are never touched (:func:`welde_det.utils.locking.remove_dead_staging`).

    Raises:
        OutputLockedError: another process is writing ``out_dir``.
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is false.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir, what="convert"):
        remove_dead_staging(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
            raise FileExistsError(f"{out_dir.name}: exists and is not empty; pass overwrite=True (--overwrite) "
                                  "to replace it")
        tmp = make_staging(out_dir, suffix=".staging")
        try:
            yield tmp
            (tmp / OWNER_FILE).unlink(missing_ok=True)
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------- final layout
def records_to_coco(
    records: Iterable[ImageRecord],
    class_names: Sequence[str],
    *,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """COCO dict of ``records``: image ids ``1..N`` in ``file_name`` order, boxes in record order.

    Raises:
        UnknownClassError: a box's class is not in ``class_names``.
        ConversionError: two records share a ``file_name``.
    """
    index = {name: i + 1 for i, name in enumerate(class_names)}
    images, anns = [], []
    seen: set[str] = set()
    for image_id, rec in enumerate(sorted(records, key=lambda r: r.file_name), 1):
        if rec.file_name in seen:
            raise ConversionError(f"two converted images share the file name {rec.file_name!r}")
        seen.add(rec.file_name)
        images.append(
            make_image_entry(image_id, rec.file_name, width=rec.width, height=rec.height, **rec.fields)
        )
        for box in rec.boxes:
            if box.class_name not in index:
                raise UnknownClassError(f"class {box.class_name!r} is not one of {list(class_names)}")
            anns.append(make_annotation(len(anns) + 1, image_id, index[box.class_name], box.bbox, **box.extra))
    return {
        "info": dict(info or {}),
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": make_categories(class_names),
    }


def write_dataset(
    staging: Path,
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    *,
    final_dir: Path,
    source: str,
    fractions: Mapping[str, float] | Sequence[float] | None = (0.70, 0.15, 0.15),
    seed: int = 0,
    yolo: bool = False,
    report: Mapping[str, Any] | None = None,
) -> ConversionResult:
    """Write COCO, splits, YOLO export and report into ``staging`` (PNGs already there).

    Args:
        staging: the staging folder (``images/`` already written).
        records: converted images.
        class_names: class order; category ids are ``1..C`` in this order.
        final_dir: where ``staging`` will be moved (written into ``data.yaml``).
        source: converter name for ``info`` and the report.
        fractions: split fractions; ``None`` writes no splits (and YOLO gets one ``train``).
        seed: split seed.
        yolo: also write ``yolo/`` (symlinks into ``images/``) and ``yolo/data.yaml``.
        report: converter-specific report entries (must hold no PHI).

    Returns:
        The paths as they will be after the staging folder is moved into place.
    """
    from welde_det.classes import ClassStats
    from welde_det.datasets.splits import split_coco, split_summary

    if not records:
        raise ConversionError(f"{source}: nothing to convert (no images with usable labels were found)")
    if not any(r.boxes for r in records):  # every converter: a dataset of images without boxes is an error
        from welde_det.datasets.resolve import require_boxes

        require_boxes(0, source, what="the converted dataset", n_images=len(records))
    info = {"description": f"welde_det dataset converted from {source}", "version": "1", "source": source}
    coco = records_to_coco(records, class_names, info=info)
    save_coco(coco, staging / "annotations.json")
    split_paths: dict[str, Path] = {}
    parts: dict[str, dict[str, Any]] = {}
    if fractions is not None:
        parts = split_coco(coco, fractions, seed=seed)
        for name, part in parts.items():
            part["info"] = {**info, "split": name}
            save_coco(part, staging / "splits" / f"{name}.json")
            split_paths[name] = final_dir / "splits" / f"{name}.json"
    data_yaml = None
    if yolo:
        export = {name: part for name, part in parts.items() if part["images"]} if parts else {"train": coco}
        coco_to_yolo(
            export,
            staging / "images",
            staging / "yolo",
            class_names=class_names,
            link_images=True,
            relative_links=True,
            dataset_root=final_dir / "yolo",
        )
        data_yaml = final_dir / "yolo" / "data.yaml"
    counts = [0] * len(class_names)
    for ann in coco["annotations"]:
        counts[ann["category_id"] - 1] += 1
    full_report: dict[str, Any] = {
        "source": source,
        "images": len(coco["images"]),
        "boxes": len(coco["annotations"]),
        "patients": len({img.get("patient_id") for img in coco["images"]}),
        "classes": list(class_names),
        "boxes_per_class": dict(zip(class_names, counts)),
        "seed": seed,
    }
    if any(counts):
        # measured image counts; the floor only where a class has no box at all (the report says so)
        full_report["class_stats"] = ClassStats.from_coco(coco, floor=1 if 0 in counts else None).to_dict()
    if parts:
        summary = split_summary(parts)
        # a class absent from every split has no share: JSON null rather than NaN
        summary["share"] = {
            split: {c: (None if v != v else v) for c, v in shares.items()} for split, shares in summary["share"].items()
        }
        full_report["splits"] = summary
    full_report.update(report or {})
    atomic_write_json(staging / "report.json", full_report)
    return ConversionResult(
        out_dir=final_dir,
        coco=final_dir / "annotations.json",
        splits=split_paths,
        data_yaml=data_yaml,
        report=final_dir / "report.json",
        num_images=len(coco["images"]),
        num_boxes=len(coco["annotations"]),
    )
