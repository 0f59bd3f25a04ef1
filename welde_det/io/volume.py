"""``Volume`` (voxels + RAS affine + provenance), mid-sagittal selection and windowing.

Convention: ``Volume.array[i, j, k]`` is the voxel whose RAS position (mm) is
``affine @ (i, j, k, 1)``, the convention of NIfTI/nibabel. DICOM series are read with
``i`` along the image columns, ``j`` along the rows and ``k`` along the slice normal.

:func:`mid_sagittal` picks the voxel axis closest to left–right, the slice nearest the
volume's lateral centre (optionally refined by content), and returns it displayed
radiologically for a sagittal view: **superior up, anterior left**, whatever the storage
orientation — the 48 axis permutations/flips of one volume give the same pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from welde_det.io.errors import InvalidAffineError, WeldeIOError

__all__ = [
    "ORTHOGONALITY_TOLERANCE",
    "SINGULARITY_TOLERANCE",
    "SagittalSlice",
    "Volume",
    "check_affine",
    "display_axes",
    "lateral_axis",
    "mid_sagittal",
    "window_image",
]


#: Largest |cos| of the angle between two of the affine's columns (after dividing out the voxel
#: sizes) that still counts as orthogonal: 1e-3 is 0.06°, i.e. 0.3 mm over a 300 mm field of view,
#: well above the float32 rounding of NIfTI srows and DICOM direction cosines (~1e-6).
ORTHOGONALITY_TOLERANCE = 1e-3
#: Smallest |det| of the affine's 3x3 part, relative to the product of its column norms (the
#: volume of the unit-voxel box over that of a rectangular one), below which it counts as singular.
SINGULARITY_TOLERANCE = 1e-6


def check_affine(affine: np.ndarray, where: str = "volume") -> np.ndarray:
    """Refuse a voxel-to-world matrix that would place voxels wrongly; return it as float64 (4, 4).

    A :class:`Volume` affine must be finite, have a last row ``[0, 0, 0, 1]``, non-zero
    columns (voxel sizes), a non-singular 3x3 part and mutually orthogonal columns (no shear)
    within :data:`ORTHOGONALITY_TOLERANCE`; axis flips and any rotation are fine.

    Args:
        affine: the 4x4 matrix.
        where: what it belongs to, for the message (a file name relative to the input).

    Raises:
        InvalidAffineError: naming ``where`` and what is wrong.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InvalidAffineError(f"{where}: the affine must be 4x4, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InvalidAffineError(
            f"{where}: the voxel-to-world affine holds non-finite values (NaN or Inf) {np.round(a, 4).tolist()}; "
            "the file's geometry (sform/qform or pixdim, ImagePositionPatient/ImageOrientationPatient) is "
            "corrupt — fix the header")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise InvalidAffineError(f"{where}: the affine's last row is {a[3].tolist()}, expected [0, 0, 0, 1]")
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0) or abs(np.linalg.det(m)) <= SINGULARITY_TOLERANCE * float(np.prod(norms)):
        raise InvalidAffineError(
            f"{where}: the voxel-to-world affine is singular (voxel sizes {np.round(norms, 6).tolist()} mm, "
            f"3x3 part {np.round(m, 6).tolist()}): voxels do not map to distinct world positions — the header's "
            "geometry is corrupt (a zero pixdim or a degenerate sform/qform); fix the header")
    unit = m / norms
    cos = unit.T @ unit
    off = np.abs(cos[np.triu_indices(3, k=1)])
    if off.max() > ORTHOGONALITY_TOLERANCE:
        pairs = [f"{p}{q}: {np.degrees(np.arccos(min(1.0, c))):.2f}°"
                 for (p, q), c in zip(((0, 1), (0, 2), (1, 2)), off) if c > ORTHOGONALITY_TOLERANCE]
        raise InvalidAffineError(
            f"{where}: the voxel-to-world affine is sheared — its voxel axes are not orthogonal (angles between "
            f"axes {', '.join(pairs)}; allowed deviation from 90° is "
            f"{np.degrees(np.arcsin(ORTHOGONALITY_TOLERANCE)):.2f}°); resample the volume to an orthogonal grid "
            "(e.g. with the tool that produced it) before reading it")
    return a


@dataclass
class Volume:
    """Voxels, a RAS affine and where they came from.

    Attributes:
        array: voxel array (I, J, K) — 2D images are stored as (1, rows, cols).
        affine: 4×4 voxel → RAS (mm) matrix.
        provenance: source files, pseudonymised series UID, modality, description,
            windowing hints (``window_center``/``window_width``), reader notes.

    Raises:
        InvalidAffineError: a non-finite, singular or sheared affine (see :func:`check_affine`);
            no Volume with one can exist, whichever reader made it.
    """

    array: np.ndarray
    affine: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        files = (self.provenance or {}).get("source_files") or []
        where = f"volume read from {os.path.basename(str(files[0]))}" if files else "volume"
        self.affine = check_affine(self.affine, where)
        if self.array.ndim != 3:
            raise WeldeIOError(f"a Volume holds a 3-D array, got shape {self.array.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k (mm): the norms of the affine's columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The array's shape."""
        return tuple(self.array.shape)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Anatomical direction of increasing i, j, k (e.g. ``('P', 'I', 'R')``)."""
        codes = []
        for col in self.affine[:3, :3].T:
            a = int(np.argmax(np.abs(col)))
            codes.append(("L", "P", "I")[a] if col[a] < 0 else ("R", "A", "S")[a])
        return tuple(codes)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """RAS mm of voxel coordinates (…, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


@dataclass
class SagittalSlice:
    """One sagittal slice, displayed superior up and anterior left.

    Attributes:
        image: 2D array (rows, cols).
        index: slice index along ``axis`` in the volume.
        axis: the volume's voxel axis closest to left–right.
        pixel_spacing: (row spacing, column spacing) in mm.
        world_x: RAS x (mm) of the slice centre.
        row_axis, col_axis: the volume axes shown along rows and columns.
        flip_rows, flip_cols: whether those axes are reversed for display.
        affine: the volume's affine, for mapping pixels back to the world.
        window: suggested (center, width) from the source, if any.
    """

    image: np.ndarray
    index: int
    axis: int
    pixel_spacing: tuple[float, float]
    world_x: float
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    affine: np.ndarray
    shape3d: tuple[int, int, int]
    window: tuple[float, float] | None = None

    def pixel_to_voxel(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Voxel (i, j, k) coordinates of display pixel positions (pixel centres at integers)."""
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        n_rows = self.shape3d[self.row_axis]
        n_cols = self.shape3d[self.col_axis]
        vox = np.zeros((*np.broadcast(rows, cols).shape, 3))
        vox[..., self.row_axis] = (n_rows - 1 - rows) if self.flip_rows else rows
        vox[..., self.col_axis] = (n_cols - 1 - cols) if self.flip_cols else cols
        vox[..., self.axis] = self.index
        return vox

    def pixel_to_world(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """RAS (mm) positions of display pixel positions, shape (…, 3)."""
        vox = self.pixel_to_voxel(rows, cols)
        return vox @ self.affine[:3, :3].T + self.affine[:3, 3]


def lateral_axis(affine: np.ndarray) -> int:
    """The voxel axis whose direction is closest to left–right (RAS x)."""
    dirs = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(dirs, axis=0)
    if np.any(norms == 0):
        raise WeldeIOError(f"degenerate affine (a zero column): {np.asarray(affine).tolist()}")
    return int(np.argmax(np.abs(dirs[0]) / norms))


def display_axes(affine: np.ndarray, axis: int) -> tuple[int, int, bool, bool]:
    """(row_axis, col_axis, flip_rows, flip_cols) showing a slice across ``axis`` superior up, anterior left."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    p, q = (x for x in range(3) if x != axis)
    sup = np.abs(a[2]) / np.linalg.norm(a, axis=0)
    row_axis, col_axis = (p, q) if sup[p] >= sup[q] else (q, p)
    return row_axis, col_axis, bool(a[2, row_axis] > 0), bool(a[1, col_axis] > 0)


def _display(array: np.ndarray, axis: int, index: int, row_axis: int, col_axis: int, fr: bool, fc: bool) -> np.ndarray:
    sl = np.take(array, index, axis=axis)
    # after take, the remaining axes keep their order; rows first
    remaining = [x for x in range(3) if x != axis]
    if remaining.index(row_axis) != 0:
        sl = sl.T
    if fr:
        sl = sl[::-1]
    if fc:
        sl = sl[:, ::-1]
    return np.ascontiguousarray(sl)


def _centre_index(volume: Volume, axis: int) -> int:
    n = volume.shape[axis]
    lo, hi = (n - 1) // 2, n // 2
    if lo == hi:
        return lo
    # even count: two slices equally near the centre; take the one further left (smaller RAS x)
    # so that every storage order picks the same physical slice.
    x_lo = volume.affine[0, axis] * lo
    x_hi = volume.affine[0, axis] * hi
    return lo if x_lo <= x_hi else hi


def _refine_index(volume: Volume, axis: int, centre: int, max_shift_mm: float) -> int:
    """Move towards the slice that best shows a long vertical bright/dark ridge (the canal).

    Scores each candidate within ``max_shift_mm`` by the contrast of its most prominent
    superior–inferior column profile against the slice's median; the canal's CSF column is
    the longest such structure in a mid-sagittal lumbar slice on T1 and T2.
    """
    step = volume.spacing[axis]
    reach = int(max_shift_mm // max(step, 1e-6))
    lo, hi = max(0, centre - reach), min(volume.shape[axis] - 1, centre + reach)
    row_axis, col_axis, fr, fc = display_axes(volume.affine, axis)
    best, best_score = centre, -np.inf
    for idx in range(lo, hi + 1):
        img = _display(volume.array, axis, idx, row_axis, col_axis, fr, fc).astype(np.float64)
        if img.size == 0 or not np.isfinite(img).all():
            continue
        scale = np.percentile(img, 99) - np.percentile(img, 1) + 1e-9
        col_profile = np.median(np.abs(img - np.median(img)) / scale, axis=0)
        score = float(col_profile.max()) - 0.01 * abs(idx - centre)
        if score > best_score:
            best, best_score = idx, score
    return best


def mid_sagittal(volume: Volume, *, refine: bool = False, max_shift_mm: float = 6.0) -> SagittalSlice:
    """The mid-sagittal slice, displayed superior up and anterior left.

    Args:
        volume: any orientation; the lateral axis is found from the affine.
        refine: move the slice (within ``max_shift_mm``) towards the one where the spinal
            canal stands out most, for volumes whose centre is not the mid-line.
        max_shift_mm: how far refinement may move from the geometric centre.

    Returns:
        A :class:`SagittalSlice`.

    Example:
        >>> s = mid_sagittal(read_volume("study/"))  # doctest: +SKIP
        >>> s.image.shape, s.pixel_spacing
    """
    axis = lateral_axis(volume.affine)
    index = _centre_index(volume, axis)
    if refine and volume.shape[axis] > 1:
        index = _refine_index(volume, axis, index, max_shift_mm)
    row_axis, col_axis, fr, fc = display_axes(volume.affine, axis)
    image = _display(volume.array, axis, index, row_axis, col_axis, fr, fc)
    spacing = volume.spacing
    centre_vox = np.array([(n - 1) / 2 for n in volume.shape], dtype=np.float64)
    centre_vox[axis] = index
    world = volume.voxel_to_world(centre_vox)
    win = volume.provenance.get("window")
    return SagittalSlice(
        image=image,
        index=int(index),
        axis=axis,
        pixel_spacing=(spacing[row_axis], spacing[col_axis]),
        world_x=float(world[0]),
        row_axis=row_axis,
        col_axis=col_axis,
        flip_rows=fr,
        flip_cols=fc,
        affine=volume.affine.copy(),
        shape3d=volume.shape,
        window=tuple(win) if win else None,
    )


def window_image(
    image: np.ndarray,
    *,
    center: float | None = None,
    width: float | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    bit_depth: int = 8,
) -> np.ndarray:
    """Map intensities to uint8 or uint16.

    With ``center``/``width`` (the DICOM window) the DICOM linear VOI function is used;
    otherwise intensities are clipped at the given percentiles.

    Args:
        image: 2D (or any) array.
        center, width: DICOM window; both or neither.
        percentiles: clip range when no window is given.
        bit_depth: 8 or 16.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    img = np.asarray(image, dtype=np.float64)
    top = 255.0 if bit_depth == 8 else 65535.0
    if (center is None) != (width is None):
        raise ValueError("give both window center and width, or neither")
    if center is not None:
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        finite = img[np.isfinite(img)]
        if finite.size == 0:
            return np.zeros(img.shape, dtype=np.uint8 if bit_depth == 8 else np.uint16)
        lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    out = (np.nan_to_num(img, nan=lo) - lo) / (hi - lo)
    out = np.clip(out, 0.0, 1.0) * top
    return np.rint(out).astype(np.uint8 if bit_depth == 8 else np.uint16)
