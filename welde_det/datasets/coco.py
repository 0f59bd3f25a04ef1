"""COCO detection JSON: the one internal annotation format, plus YOLO export and import.

Everything in ``welde_det`` that reads or writes boxes goes through this module:

* :func:`load_coco` / :func:`validate_coco` / :func:`save_coco` read, check and atomically
  write a COCO detection dict (``images``, ``annotations``, ``categories``). Validation is
  strict and every error (:class:`CocoFormatError`) names the file and the offending entry.
* :func:`make_image_entry`, :func:`make_annotation`, :func:`make_categories` build entries
  the way our converters write them (``area`` set, ``iscrowd`` 0, category ids ``1..C``).
* :func:`coco_to_yolo` exports one or several splits to an Ultralytics dataset folder and
  :func:`yolo_to_coco` reads one split of such a folder back.

Boxes are COCO ``[x, y, w, h]`` in pixels, ``(x, y)`` the top-left corner, measured on a
continuous pixel grid where pixel ``i`` covers ``[i, i + 1)``; YOLO labels are
``cls cx cy w h`` normalised by the image width and height. The two are converted without
any pixel-centre shift, so a round trip is exact up to the printed precision.

Image entries may carry extra fields that our converters fill in (all optional here):
``pixel_spacing`` ``[row_mm, col_mm]``, pseudonymised ``patient_id``, ``study_id`` and
``series_id``, ``slice_index``, ``slice_axis``, ``world_x`` (mm, RAS) and ``source``.

Example:
    >>> cats = make_categories(["DDD", "LDB"])
    >>> img = make_image_entry(1, "a.png", width=100, height=80, pixel_spacing=[0.5, 0.5])
    >>> ann = make_annotation(1, 1, 2, [10, 20, 30, 40])
    >>> coco = {"images": [img], "annotations": [ann], "categories": cats}
    >>> validate_coco(coco)["annotations"][0]["area"]
    1200.0
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from welde_det.errors import UserError
from welde_det.utils.fileio import atomic_write_json, atomic_write_text, load_json
from welde_det.utils.locking import OWNER_FILE, make_staging

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_BOX_SIDE",
    "YOLO_SPLITS",
    "YOLO_TOLERANCE",
    "CocoFormatError",
    "CocoResultsError",
    "YoloClassIndexError",
    "YoloFormatError",
    "coco_to_yolo",
    "find_data_yaml",
    "label_path_of",
    "load_coco",
    "make_annotation",
    "make_categories",
    "make_image_entry",
    "parse_yolo_label_file",
    "replace_dir",
    "resolve_yolo_split",
    "save_coco",
    "validate_coco",
    "visible_box_sides",
    "yolo_splits",
    "yolo_to_coco",
]

logger = logging.getLogger(__name__)

#: Image suffixes Ultralytics and our readers accept in a YOLO folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Split names written to / read from ``data.yaml`` (Ultralytics keys).
YOLO_SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Decimal places of normalised YOLO coordinates: 1e-7 of a 10,000-pixel side is 0.001 px.
_YOLO_DECIMALS = 7
#: A box is *zero-area* when the part of it inside its image is at most this many pixels wide
#: or high (:func:`visible_box_sides`). Every reader refuses such boxes (YOLO labels, COCO files,
#: and so the converters, the Faster R-CNN dataset and the YOLO training view, which all read
#: through this module): they carry no pixels, crash torchvision's detection losses and become
#: empty YOLO lines. 0.01 px is far below any real annotation and above float32 rounding of
#: coordinates up to 10,000 px, so a box that passes stays non-degenerate as ``x1 > x0``.
MIN_BOX_SIDE = 0.01
#: How far a normalised YOLO value (``cx cy w h``) may lie outside ``[0, 1]`` (rounding of
#: exported labels); anything further is an error naming ``file:line``.
YOLO_TOLERANCE = 1e-6


class CocoFormatError(UserError):
    """A COCO dict or file breaks the format; the message names the source and the entry."""


class YoloFormatError(UserError):
    """A YOLO dataset folder, ``data.yaml`` or label line is malformed (file and line named)."""


class YoloClassIndexError(YoloFormatError):
    """A YOLO label line names a class index outside the class list (file and line named)."""


class CocoResultsError(CocoFormatError):
    """COCO results (detections) that do not fit their ground truth: unknown image or
    category ids, non-finite or negative boxes or scores (the detections file and ids named)."""


# ---------------------------------------------------------------------------- builders
def make_categories(names: Sequence[str], *, supercategory: str = "spine") -> list[dict[str, Any]]:
    """COCO ``categories`` with ids ``1..C`` in the order of ``names``.

    Args:
        names: class names in label-index order (e.g. :data:`welde_det.classes.LUMBAR_CLASSES`).
        supercategory: value of every entry's ``supercategory``.

    Returns:
        ``[{"id": 1, "name": names[0], "supercategory": ...}, ...]``.
    """
    names = [str(n) for n in names]
    if not names:
        raise CocoFormatError("make_categories needs at least one class name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CocoFormatError(f"duplicate class names {dup} in {names}")
    return [{"id": i, "name": n, "supercategory": supercategory} for i, n in enumerate(names, 1)]


def make_image_entry(
    image_id: int,
    file_name: str,
    *,
    width: int,
    height: int,
    pixel_spacing: Sequence[float] | None = None,
    patient_id: str | None = None,
    study_id: str | None = None,
    series_id: str | None = None,
    slice_index: int | None = None,
    slice_axis: int | None = None,
    world_x: float | None = None,
    source: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One COCO ``images`` entry with our optional provenance fields.

    Identifiers must already be pseudonymised (see :func:`welde_det.io.deid.pseudonymise`);
    fields left as ``None`` are omitted.

    Args:
        image_id: unique positive integer id.
        file_name: path of the image relative to the dataset's image root (POSIX separators).
        width: image width in pixels (columns).
        height: image height in pixels (rows).
        pixel_spacing: ``[row_mm, col_mm]``: mm between rows and between columns.
        patient_id: pseudonymised patient identifier (used for patient-level splits).
        study_id: pseudonymised study identifier.
        series_id: pseudonymised series identifier.
        slice_index: index of the slice along ``slice_axis`` of the source volume.
        slice_axis: voxel axis of the source volume the slice was cut across.
        world_x: RAS x coordinate (mm) of the slice plane.
        source: short name of the converter / archive the image came from.
        **extra: further JSON-serialisable fields, copied as given.

    Returns:
        The entry as a dict.
    """
    entry: dict[str, Any] = {
        "id": int(image_id),
        "file_name": PurePosixPath(str(file_name).replace(os.sep, "/")).as_posix(),
        "width": int(width),
        "height": int(height),
    }
    if pixel_spacing is not None:
        entry["pixel_spacing"] = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    optional = {
        "patient_id": patient_id,
        "study_id": study_id,
        "series_id": series_id,
        "slice_index": None if slice_index is None else int(slice_index),
        "slice_axis": None if slice_axis is None else int(slice_axis),
        "world_x": None if world_x is None else float(world_x),
        "source": source,
    }
    entry.update({k: v for k, v in optional.items() if v is not None})
    entry.update(extra)
    return entry


def make_annotation(
    ann_id: int,
    image_id: int,
    category_id: int,
    bbox: Sequence[float],
    **extra: Any,
) -> dict[str, Any]:
    """One COCO ``annotations`` entry: ``area = w * h`` and ``iscrowd = 0``.

    Args:
        ann_id: unique positive integer id.
        image_id: id of the image the box lies on.
        category_id: COCO category id (``1..C`` for our datasets).
        bbox: ``[x, y, w, h]`` in pixels.
        **extra: further fields (e.g. ``level`` for RSNA points), copied as given.
    """
    x, y, w, h = (float(v) for v in bbox)
    ann = {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "bbox": [x, y, w, h],
        "area": w * h,
        "iscrowd": 0,
    }
    ann.update(extra)
    return ann


# ---------------------------------------------------------------------------- validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def visible_box_sides(bbox: Sequence[float], width: float, height: float) -> tuple[float, float]:
    """Width and height in pixels of the part of COCO ``bbox`` ``[x, y, w, h]`` inside a
    ``width`` x ``height`` image (negative when the box lies wholly outside).

    A box is *zero-area*, and refused by every reader, when either side is at most
    :data:`MIN_BOX_SIDE` pixels.

    Example:
        >>> visible_box_sides([-5, 2, 10, 0], 20, 10)
        (5.0, 0.0)
    """
    x, y, w, h = (float(v) for v in bbox)
    return min(x + w, width) - max(x, 0.0), min(y + h, height) - max(y, 0.0)


def validate_coco(coco: Mapping[str, Any], *, source: str = "<dict>") -> Mapping[str, Any]:
    """Check a COCO detection dict and return it unchanged.

    Checked: ``images``, ``annotations`` and ``categories`` are lists; ids are unique
    integers within each list; every image has a ``file_name`` and positive integer
    ``width``/``height`` (and a valid ``pixel_spacing`` when present); every annotation's
    ``image_id`` and ``category_id`` exist, its ``bbox`` is four finite numbers with
    ``w, h >= 0`` and is not *zero-area* (the part inside its image is more than
    :data:`MIN_BOX_SIDE` pixels wide and high, see :func:`visible_box_sides`: zero-size boxes
    and boxes lying wholly outside their image are refused, never dropped), and ``area`` is
    a finite non-negative number; category names are unique.

    Args:
        coco: the loaded dict.
        source: name used in error messages (the file path when loaded from disk).

    Returns:
        ``coco`` itself.

    Raises:
        CocoFormatError: naming ``source`` and the first offending entry.
    """
    if not isinstance(coco, Mapping):
        raise CocoFormatError(f"{source}: COCO data must be a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise CocoFormatError(f"{source}: COCO data has no {key!r} list")
        if not isinstance(coco[key], list):
            raise CocoFormatError(f"{source}: COCO {key!r} must be a list, got {type(coco[key]).__name__}")

    cat_ids: set[int] = set()
    cat_names: set[str] = set()
    for i, cat in enumerate(coco["categories"]):
        where = f"{source}: categories[{i}]"
        if not isinstance(cat, Mapping) or not _is_int(cat.get("id")):
            raise CocoFormatError(f"{where} needs an integer 'id': {cat!r}")
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise CocoFormatError(f"{where} (id {cat['id']}) needs a non-empty string 'name'")
        if cat["id"] in cat_ids:
            raise CocoFormatError(f"{where}: duplicate category id {cat['id']}")
        if cat["name"] in cat_names:
            raise CocoFormatError(f"{where}: duplicate category name {cat['name']!r}")
        cat_ids.add(cat["id"])
        cat_names.add(cat["name"])

    image_ids: set[int] = set()
    image_size: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(coco["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(img, Mapping) or not _is_int(img.get("id")):
            raise CocoFormatError(f"{where} needs an integer 'id': {img!r}")
        where = f"{where} (id {img['id']})"
        if img["id"] in image_ids:
            raise CocoFormatError(f"{where}: duplicate image id")
        image_ids.add(img["id"])
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise CocoFormatError(f"{where} needs a non-empty string 'file_name'")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise CocoFormatError(f"{where} needs a positive integer {key!r}, got {img.get(key)!r}")
        image_size[img["id"]] = (img["width"], img["height"])
        if "pixel_spacing" in img:
            ps = img["pixel_spacing"]
            if (
                not isinstance(ps, (list, tuple))
                or len(ps) != 2
                or not all(_is_number(v) and v > 0 for v in ps)
            ):
                raise CocoFormatError(
                    f"{where}: 'pixel_spacing' must be [row_mm, col_mm], two positive numbers, got {ps!r}"
                )

    ann_ids: set[int] = set()
    for i, ann in enumerate(coco["annotations"]):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, Mapping) or not _is_int(ann.get("id")):
            raise CocoFormatError(f"{where} needs an integer 'id': {ann!r}")
        where = f"{where} (id {ann['id']})"
        if ann["id"] in ann_ids:
            raise CocoFormatError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            raise CocoFormatError(f"{where}: image_id {ann.get('image_id')!r} is not among the images' ids; "
                                  "every annotation must lie on an image listed in 'images'")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            raise CocoFormatError(
                f"{where}: category_id {ann.get('category_id')!r} is not among the categories {sorted(cat_ids)}"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise CocoFormatError(f"{where}: 'bbox' must be [x, y, w, h], four finite numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise CocoFormatError(f"{where}: bbox width and height must be >= 0, got {list(bbox)}")
        img_w, img_h = image_size[ann["image_id"]]
        vis_w, vis_h = visible_box_sides(bbox, img_w, img_h)
        if vis_w <= MIN_BOX_SIDE or vis_h <= MIN_BOX_SIDE:
            raise CocoFormatError(
                f"{where}: zero-area box {list(bbox)} on image id {ann['image_id']} ({img_w}x{img_h} px): its part "
                f"inside the image is {max(vis_w, 0.0):.3g} x {max(vis_h, 0.0):.3g} px (boxes at most "
                f"{MIN_BOX_SIDE} px wide or high are refused); fix or remove the annotation"
            )
        if "area" not in ann:
            raise CocoFormatError(f"{where}: 'area' is missing (pycocotools needs it for area ranges)")
        if not _is_number(ann["area"]) or ann["area"] < 0:
            raise CocoFormatError(f"{where}: 'area' must be a finite number >= 0, got {ann['area']!r}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise CocoFormatError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    return coco


def load_coco(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read (if a path) and validate a COCO detection dataset.

    Args:
        path_or_dict: a COCO JSON file or an already loaded dict.

    Returns:
        The dict (the same object when a dict was passed).

    Raises:
        FileNotFoundError: the file does not exist.
        CocoFormatError: the JSON is malformed or breaks the format (file and entry named).
    """
    if isinstance(path_or_dict, Mapping):
        return validate_coco(path_or_dict)  # type: ignore[return-value]
    path = Path(path_or_dict)
    try:
        data = load_json(path)
    except ValueError as exc:
        raise CocoFormatError(str(exc)) from exc
    return validate_coco(data, source=str(path))  # type: ignore[return-value]


def save_coco(coco: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``coco`` and write it atomically as JSON.

    Missing ``info`` and ``licenses`` keys are written as ``{}`` and ``[]`` (some COCO tools
    expect them). The caller is responsible for ``info`` carrying no patient information.

    Returns:
        The written path.
    """
    path = Path(path)
    validate_coco(coco, source=str(path))
    out = dict(coco)
    out.setdefault("info", {})
    out.setdefault("licenses", [])
    return atomic_write_json(path, out)


# ---------------------------------------------------------------------------- COCO -> YOLO
def _is_single_coco(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike)) or (isinstance(obj, Mapping) and "images" in obj)


def _safe_relpath(file_name: str, where: str) -> PurePosixPath:
    rel = PurePosixPath(file_name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CocoFormatError(
            f"{where}: file_name {file_name!r} must be a relative path inside the image root"
        )
    return rel


def _category_to_class(
    cats: list[Mapping[str, Any]], class_names: Sequence[str], where: str
) -> dict[int, int]:
    index = {n: i for i, n in enumerate(class_names)}
    mapping = {}
    for cat in cats:
        if cat["name"] not in index:
            raise CocoFormatError(
                f"{where}: category {cat['name']!r} (id {cat['id']}) is not among class_names {list(class_names)}"
            )
        mapping[int(cat["id"])] = index[cat["name"]]
    return mapping


def _format_yolo_line(cls_idx: int, bbox: Sequence[float], width: int, height: int) -> str:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    vals = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)
    return f"{cls_idx} " + " ".join(f"{v:.{_YOLO_DECIMALS}f}" for v in vals)


def _yaml_dump(data: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)


def coco_to_yolo(
    coco: str | os.PathLike | Mapping[str, Any],
    image_root: str | os.PathLike | Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    class_names: Sequence[str] | None = None,
    link_images: bool = True,
    relative_links: bool = False,
    dataset_root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Export COCO split(s) to an Ultralytics YOLO dataset folder and return its ``data.yaml``.

    Two call forms:

    * one dataset: ``coco_to_yolo(coco_train, root, out, split="train")``;
    * several splits at once: ``coco_to_yolo({"train": c_tr, "val": c_va, "test": c_te},
      {"train": root_tr, ...} or root, out)`` where each value is a COCO dict or JSON path.

    Layout written (image sub-folders in ``file_name`` are kept, so names never collide)::

        out_dir/images/<split>/<file_name>      symlink (link_images) or copy of the image
        out_dir/labels/<split>/<file_name stem>.txt   "cls cx cy w h", normalised, one box a line
        out_dir/data.yaml                        path, train/val/test (splits given), names

    Class index ``c`` is the position of the category's name in ``class_names`` (default:
    the categories sorted by id), so every split shares one class order. Images without
    boxes get an empty label file (Ultralytics' background images). Crowd annotations are
    skipped and boxes are clipped to the image, both with a logged count. The folder is built
    in a temporary sibling and moved into place, so a failure leaves nothing half-written.

    Args:
        coco: one COCO dict/path, or a mapping ``split -> COCO dict/path``.
        image_root: folder the ``file_name`` entries are relative to, or one per split.
        out_dir: dataset folder to create.
        split: split name for the one-dataset form (``train``, ``val`` or ``test``).
        class_names: YOLO class order; every category name must appear in it.
        link_images: symlink images instead of copying them.
        relative_links: make the symlinks relative, so ``out_dir`` and the image root can
            be moved together (absolute targets otherwise).
        dataset_root: the ``path`` written to ``data.yaml`` (default: ``out_dir``); set it
            when ``out_dir`` is a staging folder that is moved into place afterwards.
        overwrite: replace an existing ``out_dir``; otherwise an existing non-empty folder
            is an error.

    Returns:
        Path of the written ``data.yaml``. Ultralytics needs a ``val`` split to train.

    Raises:
        CocoFormatError: bad COCO data, unknown category, or an image file that is missing.
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is false.
    """
    splits: dict[str, Any] = {split: coco} if _is_single_coco(coco) else dict(coco)  # type: ignore[arg-type]
    if not splits:
        raise CocoFormatError("coco_to_yolo got an empty mapping of splits")
    for name in splits:
        if name not in YOLO_SPLITS:
            raise CocoFormatError(f"split name {name!r} is not one of {list(YOLO_SPLITS)}")
    roots: dict[str, Path] = {}
    for name in splits:
        if isinstance(image_root, Mapping):
            if name not in image_root:
                raise CocoFormatError(f"image_root has no entry for split {name!r}: {sorted(image_root)}")
            roots[name] = Path(image_root[name])
        else:
            roots[name] = Path(image_root)

    loaded = {}
    for name, data in splits.items():
        loaded[name] = load_coco(data)
    first_cats = sorted(next(iter(loaded.values()))["categories"], key=lambda c: c["id"])
    names = list(class_names) if class_names is not None else [c["name"] for c in first_cats]
    if len(set(names)) != len(names):
        raise CocoFormatError(f"class_names has duplicates: {names}")

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging(out_dir, suffix=".tmp")  # records its owner, so a killed export's is cleaned up
    try:
        for name, data in loaded.items():
            where = str(splits[name]) if not isinstance(splits[name], Mapping) else f"<{name} COCO dict>"
            cat_to_cls = _category_to_class(data["categories"], names, where)
            _write_yolo_split(
                data, roots[name], tmp, out_dir, name, cat_to_cls, link_images, relative_links, where
            )
        root_in_yaml = Path(dataset_root).absolute() if dataset_root is not None else out_dir
        yaml_data: dict[str, Any] = {"path": str(root_in_yaml)}
        for name in YOLO_SPLITS:
            if name in loaded:
                yaml_data[name] = f"images/{name}"
        yaml_data["names"] = dict(enumerate(names))
        atomic_write_text(tmp / "data.yaml", _yaml_dump(yaml_data))
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if "val" not in loaded:
        logger.warning("%s has no 'val' split; Ultralytics needs one to train", root_in_yaml / "data.yaml")
    return out_dir / "data.yaml"


def _write_yolo_split(
    coco: Mapping[str, Any],
    root: Path,
    out: Path,
    final_out: Path,
    split: str,
    cat_to_cls: Mapping[int, int],
    link_images: bool,
    relative_links: bool,
    where: str,
) -> None:
    by_image: dict[int, list[Mapping[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    crowd = 0
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        by_image[ann["image_id"]].append(ann)
    clipped = 0
    seen: set[PurePosixPath] = set()
    for img in coco["images"]:
        rel = _safe_relpath(img["file_name"], f"{where}: image id {img['id']}")
        if rel.with_suffix("") in seen:
            raise CocoFormatError(
                f"{where}: two images map to the label file {rel.with_suffix('.txt')} (file_name {img['file_name']!r})"
            )
        seen.add(rel.with_suffix(""))
        src = root / rel
        if not src.is_file():
            raise CocoFormatError(f"{where}: image id {img['id']} file {src} does not exist")
        dst = out / "images" / split / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link_images and relative_links:
            # relative to out_dir (not the temporary folder), where the link will live
            final_dst_dir = final_out / "images" / split / rel.parent
            os.symlink(os.path.relpath(src.absolute(), final_dst_dir), dst)
        elif link_images:
            os.symlink(src.absolute(), dst)
        else:
            shutil.copy2(src, dst)
        lines = []
        w, h = img["width"], img["height"]
        for ann in by_image[img["id"]]:
            x, y, bw, bh = ann["bbox"]
            if x < 0 or y < 0 or x + bw > w or y + bh > h:
                clipped += 1
            lines.append(_format_yolo_line(cat_to_cls[ann["category_id"]], ann["bbox"], w, h))
        # Ultralytics' own rule (the last images/ becomes labels/), even if rel has an images/ part
        label = label_path_of(dst)
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if crowd:
        logger.warning("%s: skipped %d crowd annotation(s); YOLO labels have no crowd flag", where, crowd)
    if clipped:
        logger.warning("%s: clipped %d box(es) that extended beyond their image", where, clipped)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing an old one only at the end."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ---------------------------------------------------------------------------- YOLO -> COCO
def _read_data_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise YoloFormatError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise YoloFormatError(f"{path}: data.yaml must be a mapping, got {type(data).__name__}")
    return data


def _names_from_yaml(data: Mapping[str, Any], where: str) -> list[str]:
    names = data.get("names")
    if isinstance(names, Mapping):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise YoloFormatError(f"{where}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        return [str(names[k]) if k in names else str(names[str(k)]) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise YoloFormatError(f"{where}: 'names' must be a non-empty list or mapping of class names")


def find_data_yaml(source: str | os.PathLike) -> Path | None:
    """The ``data.yaml`` of a YOLO dataset: ``source`` itself if a file, else one inside it."""
    source = Path(source)
    if source.is_file():
        return source
    for cand in ("data.yaml", "data.yml", "dataset.yaml"):
        if (source / cand).is_file():
            return source / cand
    return None


def yolo_splits(source: str | os.PathLike) -> list[str]:
    """Split names a YOLO dataset defines (``data.yaml`` keys or ``images/<split>/`` folders).

    An empty list means a flat ``images/`` + ``labels/`` folder: one unnamed split, which
    :func:`resolve_yolo_split` returns for any split name.
    """
    source = Path(source)
    yaml_path = find_data_yaml(source)
    if yaml_path is not None:
        data = _read_data_yaml(yaml_path)
        return [s for s in YOLO_SPLITS if data.get(s)]
    return [s for s in YOLO_SPLITS if (source / "images" / s).is_dir()]


def resolve_yolo_split(
    source: str | os.PathLike, split: str = "train"
) -> tuple[Path, list[Path], list[str] | None]:
    """Find the images of one split of a YOLO dataset.

    ``source`` is a ``data.yaml`` file, a folder holding one, or a bare folder laid out as
    ``images/<split>/`` + ``labels/<split>/`` (or flat ``images/`` + ``labels/``, returned
    for any ``split``: see :func:`yolo_splits`). In a
    ``data.yaml``, a split may be a folder, a ``.txt`` list of image paths, or a list of
    either, relative to ``path`` (default: the YAML's folder).

    Returns:
        ``(image_root, image_files, names)``: the folder image ``file_name`` entries are made
        relative to (the split's folder if it is one folder, else the dataset root), the
        sorted image paths, and the class names from ``data.yaml`` (``None`` without one, or
        when it has no ``names``).

    Raises:
        YoloFormatError: no such split, a missing folder, or no images.
    """
    source = Path(source)
    if not source.exists():
        raise YoloFormatError(f"{source}: no such YOLO dataset folder or data.yaml")
    yaml_path = find_data_yaml(source)
    names: list[str] | None = None
    if yaml_path is not None:
        data = _read_data_yaml(yaml_path)
        names = _names_from_yaml(data, str(yaml_path)) if data.get("names") is not None else None
        root = Path(data.get("path") or yaml_path.parent)
        if not root.is_absolute():
            root = (yaml_path.parent / root).resolve()
        entry = data.get(split)
        if entry is None:
            raise YoloFormatError(
                f"{yaml_path}: no {split!r} split; splits present: {[k for k in YOLO_SPLITS if data.get(k)]}"
            )
        entries = entry if isinstance(entry, list) else [entry]
        files: list[Path] = []
        folders = []
        for item in entries:
            p = Path(item)
            p = p if p.is_absolute() else root / p
            if p.is_dir():
                folders.append(p)
                files.extend(_images_in(p))
            elif p.is_file() and p.suffix == ".txt":
                for line in p.read_text(encoding="utf-8").splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    # Ultralytics' rule: "./x" is relative to the list file's folder
                    q = p.parent / line[2:] if line.startswith("./") else Path(line)
                    files.append(q if q.is_absolute() else (root / q))
            else:
                raise YoloFormatError(f"{yaml_path}: split {split!r} entry {item!r} -> {p} does not exist")
        image_root = folders[0] if len(entries) == 1 and folders else root
    else:
        present = yolo_splits(source)
        if present:
            if split not in present:
                raise YoloFormatError(f"{source}: no images/{split}/ folder; splits present: {present}")
            image_root = source / "images" / split
        elif (source / "images").is_dir():
            image_root = source / "images"  # flat layout: one unnamed split
        else:
            raise YoloFormatError(f"{source}: no images/ folder and no data.yaml")
        files = _images_in(image_root)
    files = sorted(set(files))
    if not files:
        raise YoloFormatError(f"{source}: split {split!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return image_root, files, names


def _images_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def label_path_of(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise YoloFormatError(f"{path}: cannot read the image ({exc})") from exc


def _shown(path: Path, root: Path | None) -> str:
    """``path`` relative to the dataset ``root`` when it lies under it, else as given."""
    if root is not None:
        try:
            return Path(path).absolute().relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            pass
    return str(path)


def parse_yolo_label_file(
    path: str | os.PathLike,
    num_classes: int,
    *,
    image_size: tuple[int, int] | None = None,
    root: str | os.PathLike | None = None,
) -> list[tuple[int, float, float, float, float]]:
    """Read one YOLO label file into ``(cls, cx, cy, w, h)`` tuples (normalised).

    Every line is checked; the first bad one is an error naming ``file:line`` (the file
    relative to ``root``, the dataset folder, when given) and the value:

    * five whitespace-separated fields ``cls cx cy w h`` (blank lines are skipped);
    * ``cls`` an integer ``0..num_classes-1`` (``1.0`` is read as 1; ``1.5``, ``-1``,
      ``nan`` or ``inf`` are refused: :class:`YoloClassIndexError`);
    * ``cx cy w h`` finite numbers in ``[0, 1]`` up to :data:`YOLO_TOLERANCE`;
    * no *zero-area* box: refused, never dropped. With ``image_size`` the box's part inside
      the image must be more than :data:`MIN_BOX_SIDE` pixels wide and high (the same rule
      as :func:`validate_coco`); without it, ``w`` and ``h`` must be positive.

    Args:
        path: the label file.
        num_classes: number of class names.
        image_size: ``(width, height)`` of the label's image in pixels.
        root: the dataset folder that ``path`` is shown relative to in errors.

    Raises:
        YoloClassIndexError: a class value that is not an index into the class list.
        YoloFormatError: any other malformed line (file:line named); an unreadable file.
    """
    path = Path(path)
    shown = _shown(path, None if root is None else Path(root))
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from Windows editors is not a value
    except UnicodeDecodeError as exc:
        raise YoloFormatError(f"{shown}: not a UTF-8 text label file ({exc.reason}); YOLO labels are text "
                              "lines 'cls cx cy w h'") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{shown}:{lineno}"
        if len(parts) != 5:
            raise YoloFormatError(
                f"{where}: expected 5 fields 'cls cx cy w h', got {len(parts)} ({line.strip()!r}); "
                "fix or remove the line (segment/keypoint labels are not supported)"
            )
        try:
            cls_f = float(parts[0])
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            raise YoloFormatError(f"{where}: non-numeric value in {line.strip()!r}; fix or remove the line") from None
        if not math.isfinite(cls_f) or cls_f != int(cls_f) or not 0 <= int(cls_f) < num_classes:
            raise YoloClassIndexError(
                f"{where}: class {parts[0]!r} is not an index in 0..{num_classes - 1} "
                f"(the dataset names {num_classes} classes); fix the line or the class names"
            )
        bad = [name for name, v in zip(("cx", "cy", "w", "h"), vals) if not math.isfinite(v)]
        if bad:
            raise YoloFormatError(f"{where}: non-finite {', '.join(bad)} in {line.strip()!r}; "
                                  "fix or remove the line")
        bad = [name for name, v in zip(("cx", "cy", "w", "h"), vals)
               if not -YOLO_TOLERANCE <= v <= 1 + YOLO_TOLERANCE]
        if bad:
            raise YoloFormatError(f"{where}: {', '.join(bad)} outside [0, 1] in {line.strip()!r} (YOLO coordinates "
                                  "are normalised by the image size); fix or remove the line")
        cx, cy, w, h = vals
        if image_size is not None:
            width, height = image_size
            bbox = ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
            vis_w, vis_h = visible_box_sides(bbox, width, height)
            thin = vis_w <= MIN_BOX_SIDE or vis_h <= MIN_BOX_SIDE
            size = f"{max(vis_w, 0.0):.3g} x {max(vis_h, 0.0):.3g} px inside the {width}x{height} image"
        else:
            thin = w <= 0 or h <= 0
            size = f"w {w:g}, h {h:g}"
        if thin:
            raise YoloFormatError(f"{where}: zero-area box ({size}; boxes at most {MIN_BOX_SIDE} px wide or high "
                                  "are refused); fix or remove the line")
        rows.append((int(cls_f), cx, cy, w, h))
    return rows


def _dataset_root(source: str | os.PathLike) -> Path:
    """The folder label paths are shown relative to: ``source`` or the ``data.yaml``'s folder."""
    source = Path(source)
    return source.parent if source.is_file() else source


def yolo_to_coco(
    source: str | os.PathLike,
    split: str = "train",
    *,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read one split of a YOLO dataset into a COCO dict.

    Image ids are ``1..N`` over the sorted image paths; ``file_name`` is relative to the
    ``image_root`` returned by :func:`resolve_yolo_split` (the split's folder in the usual
    layout); category ids are ``1..C`` in class-index order. An image without a label file
    is a background image (no boxes). Every label line is checked by
    :func:`parse_yolo_label_file` against its image's size: a malformed, non-finite or
    out-of-range value, a class index outside the class list, or a zero-area box is an error
    naming ``file:line`` relative to the dataset folder (zero-area boxes are refused, never
    dropped).

    Args:
        source: ``data.yaml``, a folder with one, or a bare ``images/``+``labels/`` folder.
        split: ``train``, ``val`` or ``test``.
        class_names: class order; required without ``data.yaml``, and must agree with it.

    Returns:
        A validated COCO dict.

    Raises:
        YoloClassIndexError: a label's class is not an index into the class names.
        YoloFormatError: a malformed folder, YAML or label line (file:line named).
    """
    image_root, files, yaml_names = resolve_yolo_split(source, split)
    if class_names is not None and yaml_names is not None and list(class_names) != yaml_names:
        raise YoloFormatError(f"{source}: class_names {list(class_names)} disagree with data.yaml {yaml_names}")
    names = list(class_names) if class_names is not None else yaml_names
    if names is None:
        raise YoloFormatError(f"{source}: no data.yaml with 'names'; pass class_names")
    images, annotations = [], []
    for image_id, path in enumerate(files, 1):
        width, height = _image_size(path)
        try:
            rel = path.relative_to(image_root)
        except ValueError:
            rel = Path(os.path.relpath(path, image_root))
        images.append(make_image_entry(image_id, rel.as_posix(), width=width, height=height))
        label = label_path_of(path)
        if not label.is_file():
            continue
        rows = parse_yolo_label_file(label, len(names), image_size=(width, height), root=_dataset_root(source))
        for cls_idx, cx, cy, w, h in rows:
            bbox = [round(v, 6) for v in ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)]
            annotations.append(make_annotation(len(annotations) + 1, image_id, cls_idx + 1, bbox))
    coco = {
        "info": {"description": f"converted from YOLO split {split!r}"},
        "images": images,
        "annotations": annotations,
        "categories": make_categories(names),
    }
    return validate_coco(coco, source=str(source))  # type: ignore[return-value]
