"""NIfTI reading (nibabel): any orientation, qform/sform, 3D and 4D.

The affine is nibabel's ``img.affine``: the sform when its code is non-zero, else the
qform, else a scaling from pixdim — the same choice nibabel (and ITK-based tools) make.
It maps voxel (i, j, k) to RAS+ mm, which is our :class:`~welde_det.io.volume.Volume`
convention, so no re-orientation is done on reading.

The affine nibabel resolves is checked (:func:`~welde_det.io.volume.check_affine`): a
non-finite, singular or sheared one is an :class:`~welde_det.io.errors.InvalidAffineError`
naming the file and the form it came from. A file whose sform and qform codes are both 0
gets nibabel's pixdim affine (voxel sizes on the diagonal, x flipped, origin at the centre):
that is a valid, orthogonal geometry — the world position is arbitrary but distances and
the lateral axis are right — so it is read (``provenance["affine_source"] == "pixdim"``);
a zero or non-finite pixdim (which nibabel would silently set to 1 mm) is refused for the
pixdim and qform forms, both scaled by it. Only the form nibabel uses is checked: a
broken sform with code 0 next to a valid qform does not matter.

Errors name the file by its name only, never its absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from welde_det.io.errors import InvalidAffineError, WeldeIOError
from welde_det.io.volume import Volume, check_affine

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether the file name has a NIfTI/Analyze suffix."""
    name = str(path).lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def _raw_pixdim(img) -> np.ndarray | None:
    """pixdim[1:4] as stored in the file (nibabel's loader replaces zeros by 1), or None if unreadable."""
    from nibabel.openers import ImageOpener

    try:
        holder = img.file_map["header"] if "header" in img.file_map else img.file_map["image"]
        with ImageOpener(holder.filename) as fobj:
            header = type(img.header).from_fileobj(fobj, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=np.float64)
    except (KeyError, AttributeError, TypeError):  # no header file in the file map (not a file on disk)
        return None


def _reason(exc: BaseException, path: Path) -> str:
    """The exception's message with the file's full path replaced by its name."""
    text = str(exc)
    for full in {str(path), str(path.absolute()), str(path.resolve())}:
        text = text.replace(full, path.name)
    return f"{type(exc).__name__}: {text}"


def read_nifti(path: str | os.PathLike, *, volume_index: int = 0) -> Volume:
    """Read a NIfTI file.

    Args:
        path: ``.nii`` / ``.nii.gz``.
        volume_index: for 4D files, which volume (t index) to read.

    Raises:
        InvalidAffineError: the affine nibabel resolves (sform, else qform, else pixdim) is
            non-finite, singular or sheared.
        WeldeIOError: unreadable file, more than four dimensions, or a bad volume index.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise WeldeIOError(f"{name}: not a readable NIfTI file ({_reason(exc, path)})") from exc
    header = img.header
    sform_code = int(header["sform_code"]) if "sform_code" in header else None
    qform_code = int(header["qform_code"]) if "qform_code" in header else None
    if sform_code:
        form = "sform"
    elif qform_code:
        form = "qform"
    else:
        form = "pixdim"
    if form != "sform":
        # the qform and pixdim affines scale by pixdim, whose zeros nibabel silently sets to 1 mm on
        # loading: check the pixdims as stored
        raw = _raw_pixdim(img)
        if raw is not None and not (np.isfinite(raw).all() and np.all(raw > 0)):
            raise InvalidAffineError(
                f"{name}: the voxel sizes (pixdim[1:4] = {raw.tolist()}) are not positive finite numbers and the "
                f"{form} affine is scaled by them, so the affine is singular or undefined; fix the header "
                "(nibabel would silently assume 1 mm)")
    with np.errstate(all="ignore"):
        affine = np.asarray(img.affine, dtype=np.float64)
    affine = check_affine(affine, f"{name} ({form} affine, sform_code={sform_code}, qform_code={qform_code})")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise WeldeIOError(f"{name}: not a readable NIfTI file (voxel data: {_reason(exc, path)})") from exc
    if data.ndim == 2:
        data = data[:, :, None]
    elif data.ndim == 4:
        if not 0 <= volume_index < data.shape[3]:
            raise WeldeIOError(f"{name}: volume_index {volume_index} is outside 0..{data.shape[3] - 1} (4D file)")
        data = data[..., volume_index]
    elif data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, 0]
    elif data.ndim != 3:
        raise WeldeIOError(f"{name}: {data.ndim}-D data; expected 3D or 4D")
    provenance = {
        "format": "nifti",
        "source_files": [str(path)],
        "sform_code": sform_code,
        "qform_code": qform_code,
        "affine_source": form,
        "volume_index": volume_index,
        "window": None,
    }
    array = np.asarray(data)
    if array.dtype.kind not in "fiub":
        raise WeldeIOError(f"{name}: unsupported voxel type {array.dtype}")
    return Volume(array=array, affine=affine, provenance=provenance)
