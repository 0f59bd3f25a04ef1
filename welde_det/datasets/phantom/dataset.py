"""Whole phantom datasets on disk: :func:`make_phantom_dataset` and :class:`PhantomDataset`.

Layout of ``out`` (every file written atomically; the folder is built in a temporary
sibling and renamed into place, so ``out`` is either absent or complete)::

    dicom/<study>/<n>_<T1|T2>_TSE_SAG/IM0001.dcm ...   MR DICOM series (identity included)
    nifti/<study>_<t1|t2>.nii.gz                      the same voxels, RAS affine
    images/<study>_<t1|t2>.png                         mid-sagittal slice, 8-bit
    annotations/{train,val,test}.json                  COCO, categories in LUMBAR_CLASSES order
    yolo/data.yaml, yolo/images/<split>/, yolo/labels/<split>/   Ultralytics export
    crops.npz, crops_meta.json                         MedMNIST-style per-box crops
    class_stats.json                                   ClassStats of the train split
    manifest.json                                      parameters, seed, counts, timing

Caching: the manifest stores the generation parameters (and a generator version); a
second call with the same ``out`` and parameters returns at once. Use
:func:`phantom_cache_dir` to key a folder by the parameters under a cache root.
Splits are patient-level (a study's T1 and T2 images stay together) and stratified by
class with :func:`welde_det.datasets.splits.assign_groups`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.classes import LUMBAR_CLASSES, ClassStats
from welde_det.datasets.phantom.findings import PhantomError, resolve_frequencies, solve_plan
from welde_det.datasets.phantom.study import generate_study
from welde_det.datasets.phantom.writers import (
    crop_box,
    to_uint8,
    write_dicom_series,
    write_nifti,
    write_png,
)
from welde_det.utils.fileio import atomic_write_bytes, atomic_write_json, load_json

__all__ = [
    "FORMATS",
    "PHANTOM_VERSION",
    "SPLITS",
    "PhantomDataset",
    "make_phantom_dataset",
    "phantom_cache_dir",
    "study_seed",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes, so caches are rebuilt.
PHANTOM_VERSION = "1.1"  # 1.1: categories in the published lumbar order (LUMBAR_CLASSES)
FORMATS: tuple[str, ...] = ("dicom", "nifti", "coco", "yolo", "crops")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_FRACTIONS = (0.70, 0.15, 0.15)
_SEED_STRIDE = 1_000_003


def study_seed(dataset_seed: int, index: int) -> int:
    """Seed of study ``index`` of a dataset: consecutive, so finding draws stratify."""
    return int(dataset_seed) * _SEED_STRIDE + int(index)


@dataclass(frozen=True)
class PhantomDataset:
    """Paths of a generated phantom dataset.

    Attributes:
        root: the dataset folder.
        manifest: the parsed ``manifest.json``.
    """

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: str | os.PathLike) -> PhantomDataset:
        """Open a dataset folder written by :func:`make_phantom_dataset`."""
        root = Path(root)
        return cls(root, load_json(root / "manifest.json"))

    def annotations(self, split: str = "train") -> Path:
        """COCO JSON of ``split`` (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return self.root / "annotations" / f"{split}.json"

    @property
    def images_dir(self) -> Path:
        """Folder the COCO ``file_name`` entries are relative to."""
        return self.root / "images"

    @property
    def data_yaml(self) -> Path:
        """Ultralytics ``data.yaml`` (present when ``"yolo"`` was among the formats)."""
        return self.root / "yolo" / "data.yaml"

    @property
    def crops(self) -> Path:
        """MedMNIST-style ``crops.npz``."""
        return self.root / "crops.npz"

    @property
    def class_stats(self) -> ClassStats:
        """ClassStats of the train split."""
        return ClassStats.load(self.root / "class_stats.json")

    @property
    def dicom_dir(self) -> Path:
        return self.root / "dicom"

    @property
    def nifti_dir(self) -> Path:
        return self.root / "nifti"

    def __fspath__(self) -> str:
        return str(self.root)


def _params(n_studies: int, seed: int, difficulty: float, contrast: str, freqs: tuple[float, ...],
            formats: tuple[str, ...], crop_size: int, bit_depth: int = 8) -> dict[str, Any]:
    # bit_depth enters the parameters only when it is not the default, so that 8-bit
    # datasets cached before the option existed are still cache hits
    return {
        "version": PHANTOM_VERSION,
        "n_studies": int(n_studies),
        "seed": int(seed),
        "difficulty": float(difficulty),
        "contrast": contrast,
        "class_frequencies": dict(zip(LUMBAR_CLASSES, [round(f, 10) for f in freqs])),
        "formats": list(formats),
        "crop_size": int(crop_size),
        **({"bit_depth": int(bit_depth)} if bit_depth != 8 else {}),
    }


def phantom_cache_dir(cache_root: str | os.PathLike, n_studies: int, *, seed: int = 0, difficulty: float = 0.5,
                      contrast: str = "both", class_frequencies: Any = None,
                      formats: Sequence[str] = FORMATS, crop_size: int = 64, bit_depth: int = 8) -> Path:
    """A folder under ``cache_root`` named by a hash of the generation parameters."""
    freqs = resolve_frequencies(class_frequencies)
    params = _params(n_studies, seed, difficulty, contrast, freqs, tuple(formats), crop_size, bit_depth)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / f"phantom-n{n_studies}-d{difficulty:g}-{contrast}-s{seed}-{key}"


def _make_one(job: dict[str, Any]) -> dict[str, Any]:
    """Generate, write and summarise one study (runs in a worker process)."""
    root = Path(job["root"])
    formats = job["formats"]
    need_volume = "dicom" in formats or "nifti" in formats
    study = generate_study(job["seed"], difficulty=job["difficulty"], contrast=job["contrast"],
                           class_frequencies=job["freqs"], volume=need_volume, study_id=job["study_id"])
    sid = study.study_id
    images = []
    for number, (contrast, series) in enumerate(study.series.items(), 1):
        if "dicom" in formats:
            folder = root / "dicom" / sid / f"{number}_{contrast.upper()}_TSE_SAG"
            write_dicom_series(folder, study, contrast, series_number=number)
        if "nifti" in formats:
            write_nifti(root / "nifti" / f"{sid}_{contrast}.nii.gz", series, atomic=False)
        file_name = f"{sid}_{contrast}.png"
        img8 = to_uint8(series.mid_slice)
        write_png(root / "images" / file_name, series.mid_slice, bit_depth=job["bit_depth"], atomic=False)
        crops = None
        if "crops" in formats:
            crops = np.stack([crop_box(img8, b, job["crop_size"], spacing=study.pixel_spacing)
                              for b in study.boxes]) if len(study.boxes) else np.zeros((0, job["crop_size"], job["crop_size"]), np.uint8)
        world_x = float((series.affine @ np.array([series.mid_index, 0, 0, 1]))[0])
        images.append({
            "file_name": file_name,
            "contrast": contrast,
            "width": int(series.mid_slice.shape[1]),
            "height": int(series.mid_slice.shape[0]),
            "slice_index": int(series.mid_index),
            "world_x": world_x,
            "crops": crops,
        })
    return {
        "index": job["index"],
        "study_id": sid,
        "seed": study.seed,
        "pixel_spacing": list(study.pixel_spacing),
        "boxes": study.boxes,
        "labels": study.labels,
        "structures": list(study.structures),
        "images": images,
    }


def _validate(n_studies: Any, difficulty: Any, contrast: Any, formats: Any, workers: Any, crop_size: Any,
              bit_depth: Any = 8) -> tuple[str, ...]:
    if isinstance(n_studies, bool) or not isinstance(n_studies, (int, np.integer)) or n_studies < 1:
        raise PhantomError(f"n_studies must be a positive integer, got {n_studies!r}")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise PhantomError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    if contrast not in ("t1", "t2", "both"):
        raise PhantomError(f"contrast must be 't1', 't2' or 'both', got {contrast!r}")
    if isinstance(formats, str):
        formats = (formats,)
    fmts = tuple(dict.fromkeys(formats))
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise PhantomError(f"unknown format(s) {bad}; allowed: {list(FORMATS)}")
    if "yolo" in fmts and "coco" not in fmts:
        raise PhantomError("format 'yolo' is exported from the COCO annotations: add 'coco' to formats")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise PhantomError(f"workers must be a positive integer or None, got {workers!r}")
    if not isinstance(crop_size, int) or not 8 <= crop_size <= 512:
        raise PhantomError(f"crop_size must be an integer in [8, 512], got {crop_size!r}")
    if bit_depth not in (8, 16):
        raise PhantomError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    return tuple(f for f in FORMATS if f in fmts)


def make_phantom_dataset(
    out: str | os.PathLike,
    n_studies: int,
    *,
    seed: int = 0,
    difficulty: float = 0.5,
    contrast: str = "both",
    class_frequencies: Mapping[str, float] | Sequence[float] | None = None,
    workers: int | None = None,
    formats: Sequence[str] = FORMATS,
    progress: bool = True,
    crop_size: int = 64,
    overwrite: bool = False,
    bit_depth: int = 8,
) -> PhantomDataset:
    """Generate ``n_studies`` synthetic lumbar studies and write them as a dataset.

    Args:
        out: dataset folder. If it holds a dataset made with the same parameters it is
            returned as is (cache hit); any other existing content is an error unless
            ``overwrite``.
        n_studies: number of studies (patients); each gives one image per contrast.
        seed: dataset seed; study ``i`` uses :func:`study_seed` ``(seed, i)``.
        difficulty: finding difficulty in [0, 1] (see
            :func:`~welde_det.datasets.phantom.generate_study`).
        contrast: ``"t1"``, ``"t2"`` or ``"both"``.
        class_frequencies: per-box class frequencies; ``None`` = the public set's.
        workers: processes (default: CPU count); 1 runs in this process.
        formats: any of ``"dicom"``, ``"nifti"``, ``"coco"``, ``"yolo"``, ``"crops"``.
            PNG mid-sagittal slices are always written. Without ``"dicom"`` and
            ``"nifti"`` only the mid-sagittal slice is rendered (several times faster).
        progress: show a tqdm progress bar.
        crop_size: side of the classification crops.
        overwrite: replace an existing ``out`` that does not match.
        bit_depth: PNG slices in 8 bits or 16 bits (the same percentile window; 16 bits
            keep it without 8-bit quantisation). DICOM and NIfTI always hold the raw values.

    Returns:
        A :class:`PhantomDataset` (``os.fspath`` gives its root).

    Raises:
        ValueError: bad arguments (named).
        FileExistsError: ``out`` exists with other content and ``overwrite`` is false.

    Example:
        >>> ds = make_phantom_dataset("data/generated/ph", 40, formats=("coco", "yolo"))  # doctest: +SKIP
        >>> ds.data_yaml  # doctest: +SKIP
    """
    fmts = _validate(n_studies, difficulty, contrast, formats, workers, crop_size, bit_depth)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    freqs = resolve_frequencies(class_frequencies)
    solve_plan(freqs)  # unreachable frequencies fail here, before any work
    params = _params(int(n_studies), int(seed), float(difficulty), contrast, freqs, fmts, crop_size, int(bit_depth))
    out = Path(out).absolute()
    cached = _cached(out, params, overwrite)
    if cached is not None:
        logger.info("phantom dataset %s is up to date (cache hit)", out)
        return cached
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    t0 = time.perf_counter()
    try:
        jobs = [{
            "root": str(tmp), "formats": fmts, "seed": study_seed(seed, i), "index": i,
            "difficulty": float(difficulty), "contrast": contrast, "freqs": freqs, "crop_size": crop_size,
            "bit_depth": int(bit_depth),
            "study_id": f"ph{seed}-{i:05d}",
        } for i in range(int(n_studies))]
        records = _run_jobs(jobs, workers, progress)
        gen_s = time.perf_counter() - t0
        summary = _write_labels(tmp, out, records, fmts, params, seed)
        manifest = {
            "params": params,
            "complete": True,
            "n_studies": int(n_studies),
            "n_images": sum(len(r["images"]) for r in records),
            "generation_seconds": round(gen_s, 3),
            "total_seconds": round(time.perf_counter() - t0, 3),
            "studies_per_second": round(int(n_studies) / max(gen_s, 1e-9), 3),
            **summary,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        _move_into_place(tmp, out, params, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PhantomDataset(out, load_json(out / "manifest.json"))


def _cached(out: Path, params: dict[str, Any], overwrite: bool) -> PhantomDataset | None:
    if not out.exists():
        return None
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = load_json(manifest_path)
        except ValueError:
            manifest = {}
        if manifest.get("complete") and manifest.get("params") == params:
            return PhantomDataset(out, manifest)
        if not overwrite:
            old = manifest.get("params", {})
            diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise FileExistsError(
                f"{out}: holds a phantom dataset made with other parameters {diff} (old, new); "
                "pass overwrite=True or choose another folder (phantom_cache_dir keys folders by parameters)"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists, is not empty and is not a phantom dataset; pass overwrite=True")
    return None


def _move_into_place(tmp: Path, out: Path, params: dict[str, Any], overwrite: bool) -> None:
    if out.exists():
        if overwrite or not any(out.iterdir()):
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        else:  # another process finished the same dataset first
            if _cached(out, params, False) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
    os.replace(tmp, out)


def _run_jobs(jobs: list[dict[str, Any]], workers: int | None, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    n = len(jobs)
    workers = min(workers or os.cpu_count() or 1, n)
    bar = tqdm(total=n, desc="phantom studies", unit="study", disable=not progress)
    results: list[dict[str, Any] | None] = [None] * n
    try:
        if workers <= 1:
            for job in jobs:
                results[job["index"]] = _make_one(job)
                bar.update(1)
        else:
            # spawn: safe when the caller has torch/OpenMP threads running
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                chunk = max(1, min(8, n // (workers * 4)))
                for res in pool.map(_make_one, jobs, chunksize=chunk):
                    results[res["index"]] = res
                    bar.update(1)
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _write_labels(root: Path, final_root: Path, records: list[dict[str, Any]], fmts: tuple[str, ...],
                  params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Splits, COCO, YOLO, crops and class statistics from the per-study records."""
    from welde_det.datasets.coco import (
        coco_to_yolo,
        make_annotation,
        make_categories,
        make_image_entry,
        save_coco,
    )
    from welde_det.datasets.splits import assign_groups

    num_c = len(LUMBAR_CLASSES)
    counts = np.zeros((len(records), num_c))
    sizes = np.zeros(len(records))
    for g, rec in enumerate(records):
        counts[g] = np.bincount(rec["labels"], minlength=num_c) * len(rec["images"])
        sizes[g] = len(rec["images"])
    # refine=False keeps the phantom's splits as generated before the refinement step existed
    split_idx = assign_groups(counts, sizes, _FRACTIONS, seed=seed, refine=False)
    categories = make_categories(LUMBAR_CLASSES)
    cocos = {s: {"info": {"description": "welde_det synthetic lumbar phantom", "version": PHANTOM_VERSION,
                          "difficulty": params["difficulty"], "split": s},
                 "images": [], "annotations": [], "categories": categories} for s in SPLITS}
    crops: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    crop_labels: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    crop_meta: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    image_id = ann_id = 0
    for g, rec in enumerate(records):
        split = SPLITS[int(split_idx[g])]
        for img in rec["images"]:
            image_id += 1
            cocos[split]["images"].append(make_image_entry(
                image_id, img["file_name"], width=img["width"], height=img["height"],
                pixel_spacing=rec["pixel_spacing"], patient_id=rec["study_id"], study_id=rec["study_id"],
                series_id=f"{rec['study_id']}_{img['contrast']}", slice_index=img["slice_index"], slice_axis=0,
                world_x=img["world_x"], source="phantom", contrast=img["contrast"],
            ))
            for b, lab, struct in zip(rec["boxes"], rec["labels"], rec["structures"]):
                ann_id += 1
                x0, y0, x1, y1 = (float(v) for v in b)
                cocos[split]["annotations"].append(make_annotation(
                    ann_id, image_id, int(lab) + 1, [x0, y0, x1 - x0, y1 - y0], structure=struct))
            if img["crops"] is not None and len(img["crops"]):
                crops[split].append(img["crops"])
                crop_labels[split].append(np.asarray(rec["labels"], np.uint8))
                crop_meta[split].extend({"study_id": rec["study_id"], "contrast": img["contrast"], "structure": s}
                                        for s in rec["structures"])
    summary: dict[str, Any] = {"splits": {}}
    for s in SPLITS:
        per_class = np.zeros(num_c, int)
        for a in cocos[s]["annotations"]:
            per_class[a["category_id"] - 1] += 1
        summary["splits"][s] = {
            "studies": int((split_idx == SPLITS.index(s)).sum()),
            "images": len(cocos[s]["images"]),
            "boxes": dict(zip(LUMBAR_CLASSES, per_class.tolist())),
        }
        if not cocos[s]["images"]:
            logger.warning("phantom split %r is empty (n_studies=%d is too small)", s, len(records))
    if "coco" in fmts:
        for s in SPLITS:
            save_coco(cocos[s], root / "annotations" / f"{s}.json")
    if "yolo" in fmts:
        present = {s: cocos[s] for s in SPLITS if cocos[s]["images"]}
        coco_to_yolo(present, root / "images", root / "yolo", class_names=LUMBAR_CLASSES, link_images=True,
                     relative_links=True, dataset_root=final_root / "yolo", overwrite=True)
    if "crops" in fmts:
        size = params["crop_size"]
        arrays = {}
        for s in SPLITS:
            arrays[f"{s}_images"] = (np.concatenate(crops[s]) if crops[s] else np.zeros((0, size, size), np.uint8))
            arrays[f"{s}_labels"] = (np.concatenate(crop_labels[s])[:, None] if crop_labels[s]
                                     else np.zeros((0, 1), np.uint8))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(root / "crops.npz", buf.getvalue())
        atomic_write_json(root / "crops_meta.json", {"class_names": list(LUMBAR_CLASSES), **crop_meta})
    train_counts = np.zeros(num_c, int)
    for a in cocos["train"]["annotations"]:
        train_counts[a["category_id"] - 1] += 1
    floor = 1 if (train_counts == 0).any() else None
    if floor:
        logger.warning("train split lacks classes %s; class_stats.json uses floor=1",
                       [n for n, c in zip(LUMBAR_CLASSES, train_counts) if c == 0])
    ClassStats.from_coco(cocos["train"], floor=floor).save(root / "class_stats.json")
    return summary
