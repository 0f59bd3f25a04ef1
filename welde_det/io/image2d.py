"""2D images (PNG/JPEG, 8- or 16-bit, grey or RGB-grey) as single-slice sagittal volumes.

A 2D slice is assumed to be shown like a radiological sagittal view already (superior
up, anterior left), with 1 mm pixels unless ``pixel_spacing`` says otherwise; it is
stored as a (1, rows, cols) volume whose affine makes :func:`mid_sagittal` return the
image unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from welde_det.io.errors import InvalidAffineError, WeldeIOError
from welde_det.io.volume import Volume

__all__ = ["IMAGE_SUFFIXES", "is_image2d", "read_image2d"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_image2d(path: str | os.PathLike) -> bool:
    """Whether the suffix is a 2D image format we read."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_image2d(path: str | os.PathLike, *, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> Volume:
    """Read a grey 2D image.

    Raises:
        WeldeIOError: unreadable file, or a colour image (channels differ) — an MRI slice is grey.
        InvalidAffineError: a pixel spacing that is not a positive finite number.
    Errors name the file by its name only, never its absolute path.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name
    row_sp, col_sp = (float(v) for v in pixel_spacing)
    if not (math.isfinite(row_sp) and math.isfinite(col_sp) and row_sp > 0 and col_sp > 0):
        raise InvalidAffineError(f"{name}: pixel spacing {list(pixel_spacing)} mm must be two positive finite numbers")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise WeldeIOError(f"{name}: not a readable image")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        chans = img.astype(np.int64)
        spread = np.abs(chans - chans.mean(axis=2, keepdims=True)).max()
        tol = 2 if img.dtype == np.uint8 else 512
        if spread > tol:
            raise WeldeIOError(
                f"{name}: a colour image (channels differ by up to {int(spread)}); expected a grey MRI slice"
            )
        img = img[:, :, 0]
    if img.ndim != 2 or min(img.shape) < 8:
        raise WeldeIOError(f"{name}: image of shape {img.shape} is not a 2D slice")
    affine = np.array([
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -col_sp, 0.0],   # columns run posterior (anterior on the left)
        [0.0, -row_sp, 0.0, 0.0],   # rows run inferior (superior at the top)
        [0.0, 0.0, 0.0, 1.0],
    ])
    provenance = {
        "format": "image2d",
        "source_files": [str(path)],
        "bit_depth": 16 if img.dtype == np.uint16 else 8,
        "pixel_spacing_assumed": tuple(pixel_spacing) == (1.0, 1.0),
        "window": None,
    }
    return Volume(array=img[None, :, :], affine=affine, provenance=provenance)
