#!/usr/bin/env python
"""Reading a sagittal DICOM series and writing its mid-sagittal COCO entry, vs dcm2niix.

Ours: ``read_volume`` (discovery, sorting, geometry checks, rescale) + ``mid_sagittal`` +
8-bit windowing + PNG write + a COCO image entry. Peer: ``dcm2niix`` converting the same
series to an uncompressed NIfTI. Both on a phantom series of 15 slices of 384 x 384, in the
same run (median of repeats, interleaved).

Usage:
    python bench/bench_io.py [--repeats 7] [--slices 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2

from welde_det.datasets.coco import make_image_entry
from welde_det.datasets.phantom import generate_study
from welde_det.datasets.phantom.writers import write_dicom_series
from welde_det.io import mid_sagittal, read_volume, window_image


def ours(series_dir: Path, out: Path) -> dict:
    vol = read_volume(series_dir)
    s = mid_sagittal(vol)
    png = window_image(s.image, bit_depth=8)
    cv2.imwrite(str(out / "mid.png"), png)
    return make_image_entry(1, "mid.png", width=png.shape[1], height=png.shape[0], pixel_spacing=s.pixel_spacing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    exe = shutil.which("dcm2niix")
    if exe is None:
        print("dcm2niix not found (apt-get install dcm2niix); cannot compare")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = None
        for seed in range(50):  # a study with 15 slices, as the benchmark asks
            study = generate_study(seed, contrast="t2")
            if study.series["t2"].volume.shape[0] == 15:
                break
        files = write_dicom_series(tmp / "series", study, "t2", series_number=1)
        vol = read_volume(tmp / "series")
        print(f"series: {len(files)} files, volume {vol.shape}, spacing {tuple(round(v, 3) for v in vol.spacing)} mm")
        t_ours, t_peer = [], []
        for r in range(args.repeats + 1):
            out = tmp / f"o{r}"
            out.mkdir()
            t0 = time.perf_counter()
            ours(tmp / "series", out)
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run([exe, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(tmp / "series")],
                           check=True, capture_output=True)
            b = time.perf_counter() - t0
            if r:  # first round is warm-up (imports, page cache)
                t_ours.append(a)
                t_peer.append(b)
    mo, mp = statistics.median(t_ours), statistics.median(t_peer)
    print(f"welde_det read + mid-sagittal + PNG + COCO entry : {mo * 1e3:8.1f} ms")
    print(f"dcm2niix (series -> NIfTI)                      : {mp * 1e3:8.1f} ms")
    print(f"ratio ours / dcm2niix                           : {mo / mp:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
