"""Data resolution: every layout the project reads or writes -> COCO ground truth per split.

:func:`resolve_data` turns a data source into a :class:`ResolvedData`: one COCO file per
split present (``file_name`` relative to that split's image root), the class names as the
dataset names them, and the source's own ``data.yaml`` when it has one. Layouts, tried in
this order:

========  ==================================================================  ==================
kind      source                                                              COCO ground truth
========  ==================================================================  ==================
phantom   the string ``"phantom"`` (generated and cached, ``phantom=`` kw)    the phantom's files
coco      ``SRC/annotations/{train,val[,test]}.json`` + ``SRC/images/``       the user's files
convert   ``tools/convert.py`` output: ``SRC/splits/{train,val,test}.json``   the user's files
          + ``SRC/images/`` (+ ``annotations.json``, ``report.json``)
yolo      ``SRC/data.yaml`` (or a ``data.yaml`` path), or bare                written to
          ``SRC/images/<split>/`` + ``SRC/labels/<split>/`` with ``names=``    ``work_dir/gt/``
========  ==================================================================  ==================

Nothing is ever written into the source folder: COCO files for YOLO sources go to
``work_dir/gt/<split>.json``, and :func:`yolo_view` builds the Ultralytics folder under
``work_dir/yolo/`` with symbolic links to the user's images (Ultralytics' label cache then
lands there too, never beside the user's labels). A YOLO folder without class names is an
error unless ``names=`` gives them; names that disagree with the dataset's are an error.

:func:`carve_split` carves a selection split out of a training split with whole patients
(see :func:`image_group`), for choosing epochs and thresholds on data that is not the
measured split.

Every problem is a :class:`DataError` (a ``ValueError``) naming the path and what to do,
raised before anything is written to ``work_dir``. Labels are checked by the readers of
:mod:`welde_det.datasets.coco` (a bad YOLO line names ``file:line`` relative to the dataset
folder; zero-area boxes are refused, never dropped), and a training split without a single
box is an error (:func:`require_boxes`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from welde_det.datasets.coco import (
    YOLO_SPLITS,
    CocoFormatError,
    YoloFormatError,
    coco_to_yolo,
    find_data_yaml,
    load_coco,
    resolve_yolo_split,
    save_coco,
    yolo_splits,
    yolo_to_coco,
)
from welde_det.datasets.splits import assign_groups, subset_coco
from welde_det.errors import UserError
from welde_det.utils.fileio import load_json

__all__ = [
    "LUMBAR6_PATIENT_PATTERN",
    "PHANTOM_KEYS",
    "DataError",
    "ResolvedData",
    "carve_split",
    "image_group",
    "lumbar6_patient",
    "require_boxes",
    "resolve_data",
    "yolo_view",
]

logger = logging.getLogger(__name__)

#: Patient id in the public six-class lumbar set's file stems. T1 slices are named
#: ``T1_<patient>_S<slice>`` (a few ``X1_...`` and ``..._`` variants), T2 slices
#: ``<running no>_T2_TSE_SAG_<matrix>_<series>_<patient>_<slice>_R``: the T1 number and the
#: T2 seventh field are the same patient (398 of the 511 ids name exactly one T1 and one T2
#: slice; the running number never pairs them).
LUMBAR6_PATIENT_PATTERN = re.compile(r"^(?:[TX]1_|\d+_T2_TSE_SAG_\d+_\d+_)(?P<patient>\d+)(?:[_ ]|$)")

#: Keyword arguments ``resolve_data(..., phantom=...)`` accepts, with their defaults.
PHANTOM_KEYS: dict[str, Any] = {
    "n_images": 200,
    "seed": 0,
    "difficulty": 0.5,
    "contrast": "both",
    "bit_depth": 8,
    "cache_dir": "data/generated",
    "workers": None,
}
_KINDS = ("phantom", "coco", "convert", "yolo")


class DataError(UserError):
    """A data source that cannot be resolved; the message names the path and what to do."""


def require_boxes(n_boxes: int | Mapping[str, Any], source: str | os.PathLike, *, what: str = "the training split",
                  n_images: int | None = None) -> None:
    """Refuse a dataset (or training split) without a single box.

    A detector cannot learn from images without boxes, and a conversion that found none
    almost always read the labels from the wrong place; both training (:func:`resolve_data`)
    and the converters call this before writing anything.

    Args:
        n_boxes: the number of boxes, or a COCO dict whose non-crowd annotations are counted.
        source: the data source named in the error (a folder, ``data.yaml`` or COCO file).
        what: what holds no boxes, for the message.
        n_images: the number of images read, for the message (taken from a COCO dict).

    Raises:
        DataError: no boxes.
    """
    if isinstance(n_boxes, Mapping):
        n_images = len(n_boxes.get("images", ())) if n_images is None else n_images
        n_boxes = sum(1 for a in n_boxes.get("annotations", ()) if not a.get("iscrowd", 0))
    if int(n_boxes) > 0:
        return
    images = "" if n_images is None else f" ({n_images} image(s), 0 boxes)"
    raise DataError(
        f"{source}: {what} has no boxes{images}; a detection dataset needs labelled boxes — check that the "
        "labels are where they belong (YOLO: the last images/ in an image path replaced by labels/, one .txt "
        "per image) and are not all empty"
    )


@dataclass(frozen=True)
class ResolvedData:
    """A data source resolved to COCO ground truth per split.

    Attributes:
        kind: ``"phantom"``, ``"coco"``, ``"convert"`` or ``"yolo"``.
        splits: COCO GT file per split present (``train`` always, ``val``/``test`` when
            the source has them); ``file_name`` entries are relative to ``image_roots``.
        image_roots: the folder each split's ``file_name`` entries are relative to.
        names: class names in label-index order, as the dataset names them (category
            ids ``1..C`` in this order in every split file).
        yolo_yaml: the source's own ``data.yaml`` (phantom, YOLO source, convert output
            written with ``--yolo``), else ``None``. Training should use :func:`yolo_view`
            instead, which never lets Ultralytics write into the source folder.
    """

    kind: str
    splits: dict[str, Path]
    image_roots: dict[str, Path]
    names: tuple[str, ...]
    yolo_yaml: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise DataError(f"ResolvedData.kind must be one of {list(_KINDS)}, got {self.kind!r}")
        if "train" not in self.splits:
            raise DataError(f"resolved data has no train split (splits: {sorted(self.splits)})")
        missing = sorted(set(self.splits) - set(self.image_roots))
        if missing:
            raise DataError(f"resolved data has no image root for split(s) {missing}")


# ----------------------------------------------------------------------------- groups
def lumbar6_patient(file_name: str) -> str | None:
    """The patient id in a lumbar6 file name (``T1_0012_S8 .png`` -> ``"0012"``), else ``None``."""
    stem = PurePosixPath(str(file_name).replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    match = LUMBAR6_PATIENT_PATTERN.match(stem)
    return match.group("patient") if match else None


GroupSpec = str | Callable[[Mapping[str, Any]], Hashable] | None


def image_group(coco: Mapping[str, Any], group: GroupSpec = None, *, source: str = "<COCO dict>") -> dict[int, Any]:
    """The group (patient) of every image: ``{image_id: group key}``.

    Args:
        coco: a COCO dict.
        group: how to tell patients apart:

            * ``None`` (default): the image field ``patient_id`` when every image has one
              (our converters and the phantom write it), else the lumbar6 file-name rule
              when every ``file_name`` follows it (:data:`LUMBAR6_PATIENT_PATTERN`);
              otherwise a :class:`DataError`, because carving image by image is only
              honest when each image is its own patient;
            * ``"lumbar6"``: the lumbar6 file-name rule (every name must follow it);
            * ``"image"``: each image is its own group (say so only when it is true);
            * any other string: that image field (every image must have it);
            * a callable ``image_entry -> key``.
        source: name used in error messages.

    Raises:
        DataError: an image without the group, or no rule that fits (``group=None``).
    """
    images = list(coco["images"])
    if group is None:
        if images and all(img.get("patient_id") not in (None, "") for img in images):
            group = "patient_id"
        elif images and all(lumbar6_patient(img["file_name"]) is not None for img in images):
            group = "lumbar6"
        else:
            raise DataError(
                f"{source}: cannot tell patients apart (no 'patient_id' on every image, and the file names do "
                "not follow the lumbar6 naming); pass group='<image field>', group='lumbar6', a function of the "
                "image entry, or group='image' if each image really is its own patient"
            )
    out: dict[int, Any] = {}
    for img in images:
        if callable(group):
            key = group(img)
        elif group == "image":
            key = ("image", img["id"])
        elif group == "lumbar6":
            key = lumbar6_patient(img["file_name"])
            if key is None:
                raise DataError(
                    f"{source}: image {img['file_name']!r} does not follow the lumbar6 naming "
                    f"({LUMBAR6_PATIENT_PATTERN.pattern}); pass another group"
                )
        else:
            key = img.get(group)
            if key in (None, ""):
                raise DataError(f"{source}: image id {img['id']} ({img.get('file_name')!r}) has no {group!r} field")
        out[int(img["id"])] = key
    return out


def carve_split(
    coco: Mapping[str, Any] | str | os.PathLike,
    fraction: float,
    seed: int,
    *,
    group: GroupSpec = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Carve a selection split of about ``fraction`` of the images out of ``coco``.

    Whole groups (patients, see :func:`image_group`) move; the carved part is stratified
    by class with the same grouped iterative stratification as
    :func:`welde_det.datasets.splits.split_coco` (rare classes placed first). The result is
    a pure function of the inputs and ``seed``.

    Args:
        coco: the training split (COCO dict or JSON path).
        fraction: wanted share of the images (and of every class's boxes) carved, in (0, 1).
        seed: tie-break seed.
        group: see :func:`image_group`.

    Returns:
        ``(kept, carved)``: two COCO dicts with the same categories and ``info``; every
        image of ``coco`` is in exactly one of them.

    Raises:
        DataError: ``fraction`` outside (0, 1), fewer than two groups, a carve that would
            leave either part without images or the kept part without boxes, or no way to
            tell patients apart.
    """
    source = str(coco) if not isinstance(coco, Mapping) else "<COCO dict>"
    try:
        data = load_coco(coco)
    except (CocoFormatError, FileNotFoundError) as exc:
        raise DataError(f"carve_split: {exc}") from exc
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"carve_split: fraction must lie in (0, 1), got {fraction}")
    group_of = image_group(data, group, source=source)
    keys = sorted(set(group_of.values()), key=str)
    if len(keys) < 2:
        raise DataError(f"{source}: {len(keys)} group(s) (patients); carving a selection split needs at least two")
    gindex = {k: i for i, k in enumerate(keys)}
    cats = sorted(int(c["id"]) for c in data["categories"])
    cindex = {cid: i for i, cid in enumerate(cats)}
    counts = np.zeros((len(keys), len(cats)), np.int64)
    sizes = np.zeros(len(keys), np.int64)
    for key in group_of.values():
        sizes[gindex[key]] += 1
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[gindex[group_of[ann["image_id"]]], cindex[int(ann["category_id"])]] += 1
    assigned = assign_groups(counts, sizes, [1.0 - fraction, fraction], seed=int(seed))
    carved_ids = sorted(i for i, k in group_of.items() if assigned[gindex[k]] == 1)
    kept_ids = sorted(i for i, k in group_of.items() if assigned[gindex[k]] == 0)
    if not carved_ids or not kept_ids:
        raise DataError(
            f"{source}: carving {fraction:g} of {len(group_of)} images in {len(keys)} groups leaves "
            f"{len(kept_ids)} kept and {len(carved_ids)} carved; change the fraction"
        )
    kept, carved = subset_coco(data, kept_ids), subset_coco(data, carved_ids)
    require_boxes(kept, source, what=f"the training part left after carving {fraction:g} for selection")
    logger.info("carved %d images (%d groups) of %d for selection (seed %d)", len(carved_ids),
                int((assigned == 1).sum()), len(group_of), seed)
    return kept, carved


# ----------------------------------------------------------------------------- resolution
def _names_of(coco: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(c["name"]) for c in sorted(coco["categories"], key=lambda c: int(c["id"])))


def _check_names(found: Sequence[str], given: Sequence[str] | None, where: str) -> tuple[str, ...]:
    found = tuple(found)
    if given is not None and tuple(given) != found:
        raise DataError(
            f"{where}: the dataset names its classes {list(found)} but names={list(given)} was given; "
            "drop names= or make it match the dataset"
        )
    return found


def _check_outside(source: Path, work_dir: Path) -> None:
    src, work = source.resolve(), work_dir.resolve()
    if work == src or src in work.parents:
        raise DataError(
            f"work_dir {work_dir} lies inside the data source {source}; welde_det never writes into the user's "
            "data folder — choose a work folder outside it"
        )


def _load_split_files(files: Mapping[str, Path], where: str, given: Sequence[str] | None,
                      roots: Mapping[str, Path]) -> tuple[str, ...]:
    """Validate every split file, check one class list and that the images exist."""
    names: tuple[str, ...] | None = None
    for split, path in files.items():
        try:
            coco = load_coco(path)
        except (CocoFormatError, FileNotFoundError) as exc:
            raise DataError(f"{where}: {exc}") from exc
        split_names = _names_of(coco)
        ids = tuple(int(c["id"]) for c in sorted(coco["categories"], key=lambda c: int(c["id"])))
        if ids != tuple(range(1, len(ids) + 1)):
            raise DataError(f"{path}: category ids {list(ids)} must be 1..{len(ids)} in class order")
        if names is None:
            names = split_names
        elif split_names != names:
            raise DataError(f"{path}: categories {list(split_names)} differ from the train split's {list(names)}")
        for img in coco["images"]:
            if not (roots[split] / img["file_name"]).is_file():
                raise DataError(
                    f"{path}: image {img['file_name']!r} is not under {roots[split]}; file_name entries must be "
                    "relative to the images/ folder beside the annotations"
                )
        if split == "train":
            require_boxes(coco, path)
    assert names is not None
    return _check_names(names, given, where)


def _phantom(work_dir: Path, options: Mapping[str, Any] | None, names: Sequence[str] | None,
             progress: bool) -> ResolvedData:
    from welde_det.datasets.phantom import make_phantom_dataset, phantom_cache_dir

    opts = dict(PHANTOM_KEYS)
    unknown = sorted(set(options or {}) - set(PHANTOM_KEYS))
    if unknown:
        raise DataError(f"phantom options {unknown} are not known; allowed: {sorted(PHANTOM_KEYS)}")
    opts.update(options or {})
    formats = ("coco", "yolo")
    gen = {k: opts[k] for k in ("seed", "difficulty", "contrast", "bit_depth")}
    out = phantom_cache_dir(opts["cache_dir"], int(opts["n_images"]), formats=formats, **gen)
    try:
        ds = make_phantom_dataset(out, int(opts["n_images"]), formats=formats, progress=progress,
                                  workers=opts["workers"], **gen)
    except ValueError as exc:
        raise DataError(f"phantom: {exc}") from exc
    splits: dict[str, Path] = {}
    for s in YOLO_SPLITS:
        path = ds.annotations(s)
        if load_coco(path)["images"]:
            splits[s] = path
        else:
            logger.warning("phantom split %r is empty (n_images=%s); it is left out", s, opts["n_images"])
    if "train" not in splits:
        raise DataError(f"{out}: the phantom has no training images; raise n_images")
    roots = {s: ds.images_dir for s in splits}
    found = _load_split_files(splits, str(out), names, roots)
    return ResolvedData("phantom", splits, roots, found, ds.data_yaml if ds.data_yaml.is_file() else None)


def _coco_folder(base: Path, names: Sequence[str] | None) -> ResolvedData:
    ann = base / "annotations"
    splits = {s: ann / f"{s}.json" for s in YOLO_SPLITS if (ann / f"{s}.json").is_file()}
    if "train" not in splits:
        raise DataError(f"{ann}: no train.json; a COCO dataset folder needs annotations/train.json "
                        "(+ val.json, test.json) and the images under images/")
    roots = {s: _split_root(base / "images", s, p) for s, p in splits.items()}
    return ResolvedData("coco", splits, roots, _load_split_files(splits, str(base), names, roots), None)


def _split_root(images: Path, split: str, coco_path: Path) -> Path:
    """``images/`` unless the split's file names are relative to ``images/<split>/``."""
    if not images.is_dir():
        raise DataError(f"{images}: no images/ folder beside {coco_path.parent}")
    try:
        first = next(iter(load_coco(coco_path)["images"]), None)
    except (CocoFormatError, FileNotFoundError) as exc:
        raise DataError(str(exc)) from exc
    if first is not None and not (images / first["file_name"]).is_file() and (
            images / split / first["file_name"]).is_file():
        return images / split
    return images


def _convert_output(base: Path, names: Sequence[str] | None) -> ResolvedData:
    split_dir = base / "splits"
    splits = {s: split_dir / f"{s}.json" for s in YOLO_SPLITS if (split_dir / f"{s}.json").is_file()}
    if "train" not in splits:
        raise DataError(
            f"{base}: a tools/convert.py output without splits/train.json (converted with --no-split?); "
            "convert again with --split 0.7,0.15,0.15 or --keep-source-splits"
        )
    roots = {s: base / "images" for s in splits}
    found = _load_split_files(splits, str(base), names, roots)
    report = base / "report.json"
    if report.is_file():
        grouping = str(load_json(report).get("patient_grouping", ""))
        if grouping.startswith("one patient per image"):
            logger.warning("%s was converted with one patient per image (no --patient-pattern): its patient_id "
                           "fields do not group a patient's slices, so splits carved from it are image-level", base)
    yaml_path = base / "yolo" / "data.yaml"
    return ResolvedData("convert", splits, roots, found, yaml_path if yaml_path.is_file() else None)


def _yolo_folder(base: Path, work_dir: Path, names: Sequence[str] | None) -> ResolvedData:
    try:
        present = yolo_splits(base)
    except YoloFormatError as exc:
        raise DataError(str(exc)) from exc
    if not present:
        raise DataError(f"{base}: a YOLO source needs a data.yaml with train/val entries, or images/train/ + "
                        "labels/train/ (and images/val/ + labels/val/) folders")
    if "train" not in present:
        raise DataError(f"{base}: the YOLO source has no train split (splits: {present})")
    gt_dir = work_dir / "gt"
    splits: dict[str, Path] = {}
    roots: dict[str, Path] = {}
    cocos: dict[str, dict[str, Any]] = {}
    found: tuple[str, ...] | None = None
    yaml_path = find_data_yaml(base)
    for s in present:
        try:
            root, _files, yaml_names = resolve_yolo_split(base, s)
            if yaml_names is None and names is None:
                raise DataError(
                    f"{yaml_path or base}: the YOLO source does not name its classes (no 'names' in a data.yaml); "
                    "pass the names in label-index order (names=[...], e.g. data.names=[DDD,...]) or add "
                    "'names' to the data.yaml"
                )
            if yaml_names is not None:
                found = _check_names(yaml_names, names, str(yaml_path))
            coco = yolo_to_coco(base, s, class_names=names if yaml_names is None else None)
        except (YoloFormatError, CocoFormatError) as exc:
            msg, folder = str(exc), str(yaml_path.parent if yaml_path else base)
            # label files are named relative to the dataset folder: say which folder
            raise DataError(msg if folder in msg else f"YOLO dataset {folder}: {msg}") from exc
        found = found or tuple(names or ())
        if s == "train":
            require_boxes(coco, yaml_path or base)
        cocos[s] = coco
        roots[s] = Path(root).absolute()
    # written only once every split has been read and checked
    for s, coco in cocos.items():
        splits[s] = save_coco(coco, gt_dir / f"{s}.json")
    assert found is not None
    own_yaml = yaml_path if yaml_path is not None and _yaml_has_names(yaml_path) else None
    return ResolvedData("yolo", splits, roots, found, own_yaml)


def _yaml_has_names(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool(data.get("names"))


def resolve_data(
    source: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    phantom: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ResolvedData:
    """Resolve a data source to COCO ground truth per split (layouts in the module docstring).

    Args:
        source: ``"phantom"``, a COCO folder, a ``tools/convert.py`` output folder, a YOLO
            folder or its ``data.yaml``.
        work_dir: the run's data folder; COCO files for YOLO sources are written to
            ``work_dir/gt/``. It must not lie inside ``source``.
        names: class names in label-index order: required for a YOLO folder that does not
            name its classes, otherwise a check (a mismatch is an error).
        phantom: phantom options, keys of :data:`PHANTOM_KEYS` (only with ``"phantom"``).
        progress: progress bar while the phantom is generated.

    Returns:
        The :class:`ResolvedData`.

    Raises:
        DataError: a missing source, an unknown layout, missing class names, names that
            disagree, a bad annotation file or image, an empty training split.
    """
    work = Path(work_dir)
    if str(source) == "phantom":
        return _phantom(work, phantom, names, progress)
    if phantom:
        raise DataError(f"phantom options {sorted(phantom)} were given but the source is {source!s}, not 'phantom'")
    base = Path(source).absolute()
    if not base.exists():
        raise DataError(f"data source {base}: no such file or folder")
    folder = base.parent if base.is_file() else base
    _check_outside(folder, work)
    if base.is_file():
        if base.suffix.lower() in (".yaml", ".yml"):
            return _yolo_folder(base, work, names)
        raise DataError(f"data source {base}: a file must be a YOLO data.yaml; give COCO data as a folder with "
                        "annotations/{train,val}.json + images/")
    if (base / "annotations").is_dir():
        return _coco_folder(base, names)
    if (base / "splits").is_dir() or (base / "annotations.json").is_file():
        return _convert_output(base, names)
    if find_data_yaml(base) is not None or (base / "images").is_dir():
        return _yolo_folder(base, work, names)
    raise DataError(
        f"data source {base}: no known layout — expected 'phantom', a COCO folder (annotations/train.json + "
        "images/), a tools/convert.py output (splits/train.json + images/) or a YOLO folder (data.yaml, or "
        "images/<split>/ + labels/<split>/); convert other layouts with tools/convert.py"
    )


def yolo_view(data: ResolvedData, work_dir: str | os.PathLike, *, channels: int) -> Path:
    """A ``data.yaml`` Ultralytics can train on, built under ``work_dir/yolo/``.

    Every source goes the same way: the resolved COCO splits are exported with
    :func:`~welde_det.datasets.coco.coco_to_yolo` — images as symbolic links to the
    source's files (nothing copied), labels written from the COCO ground truth — so the
    YOLO folder, a 3-channel copy of it and its ``tools/convert.py`` output give identical
    labels, and Ultralytics' label cache stays inside ``work_dir``.

    No absolute path is written: the links' targets are relative to the link
    (``os.path.relpath(target, link.parent)``; Ultralytics and OpenCV follow them like
    any other), and the YAML has no ``path`` entry, so its ``train``/``val`` folders are
    relative to the YAML's own folder (Ultralytics' rule for a YAML without ``path``, and
    :meth:`welde_det.integrations.yolo.WELDEDetectionTrainer.get_dataset`'s).

    Args:
        data: the resolved data.
        work_dir: the run's data folder.
        channels: 1 (Ultralytics reads grey) or 3; written to the YAML's ``channels``.

    Returns:
        Path of the written ``data.yaml`` (no ``path`` entry, ``names`` as ``data.names``).
    """
    import yaml

    from welde_det.utils.fileio import atomic_write_text

    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    out = Path(work_dir) / "yolo"
    try:
        data_yaml = coco_to_yolo(dict(data.splits), dict(data.image_roots), out, class_names=list(data.names),
                                 link_images=True, relative_links=True, overwrite=True)
    except (CocoFormatError, FileExistsError) as exc:
        raise DataError(f"building the YOLO view in {out}: {exc}") from exc
    content = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    content.pop("path", None)  # absolute; without it the splits are relative to the YAML's folder
    content["channels"] = int(channels)
    atomic_write_text(data_yaml, yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return data_yaml
