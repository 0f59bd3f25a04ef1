#!/usr/bin/env python
"""Conversion throughput, each figure a ratio to a peer measured in the same run.

1. COCO -> YOLO export: ``welde_det.datasets.coco_to_yolo`` vs Ultralytics' ``convert_coco``
   on the same COCO JSON (N images, 5-12 boxes each, the lumbar set's density). Ours also
   checks every image file, symlinks it into ``images/<split>/`` and writes ``data.yaml``;
   Ultralytics' writes label files only.
2. RSNA-layout archive -> COCO dataset (headers, pixels, windowing, PNGs, splits): the
   process pool (``--workers``) vs the same conversion in one process.

Usage:
    OMP_NUM_THREADS=1 python bench/bench_convert.py [--images 2000] [--series 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.coco import coco_to_yolo, make_annotation, make_categories, make_image_entry


def make_coco(root: Path, n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True)
    png = (root / "template.png")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    images, anns = [], []
    for i in range(1, n_images + 1):
        name = f"img{i:05d}.png"
        shutil.copyfile(png, root / "imgs" / name)
        images.append(make_image_entry(i, name, width=384, height=384))
        for _ in range(int(rng.integers(5, 13))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(10, 80, 2)
            anns.append(make_annotation(len(anns) + 1, i, int(rng.integers(1, 7)), [x, y, w, h]))
    return {"info": {}, "images": images, "annotations": anns, "categories": make_categories(LUMBAR_CLASSES)}


def make_rsna_archive(root: Path, n_series: int, slices: int = 15, size: int = 384) -> None:
    """A synthetic RSNA-layout archive: one labelled sagittal series per study."""
    import csv

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(0)
    coords, descs = [], []
    for s in range(n_series):
        study, series = str(1000 + s), str(5000 + s)
        folder = root / "train_images" / study / series
        folder.mkdir(parents=True)
        series_uid = generate_uid()
        for k in range(slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(folder / f"{k + 1}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.SeriesInstanceUID, ds.Modality, ds.PatientID = series_uid, "MR", f"P{s}"
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [float(k * 4 - 28), -100.0, 100.0]
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
            ds.PixelSpacing = [0.6, 0.6]
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
            ds.save_as(folder / f"{k + 1}.dcm", enforce_file_format=True)
        descs.append([study, series, "Sagittal T2/STIR"])
        for level_i, level in enumerate(("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")):
            coords.append([study, series, 8, "Spinal Canal Stenosis", level, 190.0, 100.0 + 40 * level_i])
    with (root / "train_label_coordinates.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        w.writerows(coords)
    with (root / "train_series_descriptions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "series_id", "series_description"])
        w.writerows(descs)


def bench_rsna(n_series: int, workers: int) -> None:
    from welde_det.datasets.sources.rsna_lsdc import convert_rsna_lsdc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_rsna_archive(root / "rsna", n_series)
        t0 = time.perf_counter()
        convert_rsna_lsdc(root / "rsna", root / "serial", key="bench-key", workers=1)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        convert_rsna_lsdc(root / "rsna", root / "pool", key="bench-key", workers=workers)
        pool = time.perf_counter() - t0
    print(f"rsna archive: {n_series} series x 15 slices 384x384 (headers of all, pixels of the labelled one)")
    print(f"one process                 {serial:.3f} s  ({n_series / serial:.1f} series/s)")
    print(f"process pool, {workers} workers    {pool:.3f} s  ({n_series / pool:.1f} series/s)")
    print(f"ratio pool/serial           {pool / serial:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--series", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from ultralytics.data.converter import convert_coco

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco = make_coco(root, args.images)
        (root / "ann").mkdir()
        (root / "ann" / "train.json").write_text(json.dumps(coco))
        ours, theirs = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            coco_to_yolo(coco, root / "imgs", root / f"ours{r}")
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                convert_coco(str(root / "ann"), str(root / f"ultra{r}"), cls91to80=False)
            theirs.append(time.perf_counter() - t0)
        o, t = min(ours), min(theirs)
        print(f"images={args.images} boxes={len(coco['annotations'])} repeats={args.repeats} (best of)")
        print(f"welde_det coco_to_yolo      {o:.3f} s  ({args.images / o:.0f} images/s)")
        print(f"ultralytics convert_coco    {t:.3f} s  ({args.images / t:.0f} images/s)")
        print(f"ratio ours/ultralytics      {o / t:.2f}")
    bench_rsna(args.series, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
