"""NIfTI reading (nibabel): any orientation, qform/sform, 3D and 4D.

The affine is nibabel's ``img.affine``: the sform when its code is non-zero, else the
qform, else a scaling from pixdim — the same choice nibabel (and ITK-based tools) make.
It maps voxel (i, j, k) to RAS+ mm, which is our :class:`~welde_det.io.volume.Volume`
convention, so no re-orientation is done on reading.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from welde_det.io.errors import WeldeIOError
from welde_det.io.volume import Volume

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether the file name has a NIfTI/Analyze suffix."""
    name = str(path).lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, *, volume_index: int = 0) -> Volume:
    """Read a NIfTI file.

    Args:
        path: ``.nii`` / ``.nii.gz``.
        volume_index: for 4D files, which volume (t index) to read.

    Raises:
        WeldeIOError: unreadable file, more than four dimensions, or a bad volume index.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise WeldeIOError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if data.ndim == 2:
        data = data[:, :, None]
    elif data.ndim == 4:
        if not 0 <= volume_index < data.shape[3]:
            raise WeldeIOError(f"{path}: volume_index {volume_index} is outside 0..{data.shape[3] - 1} (4D file)")
        data = data[..., volume_index]
    elif data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, 0]
    elif data.ndim != 3:
        raise WeldeIOError(f"{path}: {data.ndim}-D data; expected 3D or 4D")
    header = img.header
    provenance = {
        "format": "nifti",
        "source_files": [str(path)],
        "sform_code": int(header["sform_code"]) if "sform_code" in header else None,
        "qform_code": int(header["qform_code"]) if "qform_code" in header else None,
        "volume_index": volume_index,
        "window": None,
    }
    array = np.asarray(data)
    if array.dtype.kind not in "fiub":
        raise WeldeIOError(f"{path}: unsupported voxel type {array.dtype}")
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), provenance=provenance)
