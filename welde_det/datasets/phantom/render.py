"""MR image formation for the phantom: tissues, partial volume, coil, noise, scanner.

Each slice is composited back to front from the anatomy's structures (anti-aliased
``cv2.fillPoly`` coverage masks, optionally softened), weighted by the overlap of the
slice's slab with the structure's lateral extent (through-plane partial volume) and
with the in-plane shape compressed for structures with an elliptical cross-section.
T1 and T2 are composited together from one coverage pass (the anatomy is shared), then
each series gets its own acquisition: an anterior saturation band, a posterior surface
coil's sensitivity fall-off with a smooth random bias, a lower acquisition matrix,
complex Gaussian noise taken to magnitude (Rician) at that matrix, interpolation to the
display matrix and a scanner-specific intensity scale stored as 16-bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from welde_det.datasets.phantom.anatomy import Anatomy, Structure, Subject

__all__ = ["CONTRASTS", "TISSUES", "Acquisition", "acquire", "composite_slices", "make_textures", "tissue_values"]

CONTRASTS = ("t1", "t2")

#: Tissue -> (T1-weighted value, T2-weighted value, texture kind, texture amplitude).
#: Values are relative signal of a spin-echo / fast spin-echo sequence: fat bright on
#: both, fluid (CSF, nucleus) bright on T2 and dark on T1, cortical bone and ligaments dark.
TISSUES: dict[str, tuple[float, float, str | None, float]] = {
    "viscera": (0.30, 0.24, "coarse", 0.45),
    "fat": (0.95, 0.85, "medium", 0.04),
    "skin": (0.55, 0.45, None, 0.0),
    "muscle": (0.36, 0.22, "striated", 0.13),
    "vessel": (0.05, 0.05, None, 0.0),
    "bowel_wall": (0.34, 0.28, None, 0.0),
    "bowel_fluid": (0.14, 0.85, "coarse", 0.10),
    "bowel_gas": (0.02, 0.02, None, 0.0),
    "bowel_faeces": (0.45, 0.33, "fine", 0.35),
    "ligament": (0.16, 0.11, None, 0.0),
    "csf": (0.10, 1.00, "coarse", 0.04),
    "nerve": (0.42, 0.30, None, 0.0),
    "cortex": (0.07, 0.06, "fine", 0.15),
    "marrow": (0.62, 0.36, "marrow", 0.16),
    "marrow_post": (0.50, 0.28, "marrow", 0.18),
    "annulus": (0.30, 0.20, "fine", 0.08),
    "nucleus": (0.38, 1.0, "fine", 0.05),
    "modic1": (0.28, 0.78, "marrow", 0.1),
    "modic2": (0.98, 0.68, "marrow", 0.1),
}


def tissue_values(rng: np.random.Generator, age: int) -> dict[str, np.ndarray]:
    """Per-study tissue values (T1, T2) with subject jitter; marrow fattens with age."""
    out = {}
    for name, (t1, t2, _, _) in TISSUES.items():
        jit = rng.normal(1.0, 0.06, 2)
        out[name] = np.array([t1, t2]) * jit
    fat_marrow = 1.0 + 0.006 * (age - 40)
    out["marrow"] = out["marrow"] * [fat_marrow, 1.0 + 0.003 * (age - 40)]
    out["marrow_post"] = out["marrow_post"] * [fat_marrow, 1.0]
    return out


def _field(rng: np.random.Generator, shape: tuple[int, int], sx: float, sy: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation lengths ``sx``, ``sy`` (pixels).

    Broad fields are drawn on a coarser grid and interpolated (same spectrum, far cheaper).
    """
    h, w = shape
    f = max(1.0, min(sx, sy) / 3.0)
    gh, gw = max(4, round(h / f)), max(4, round(w / f))
    g = rng.standard_normal((gh, gw), dtype=np.float32)
    g = cv2.GaussianBlur(g, (0, 0), sigmaX=sx * gw / w, sigmaY=sy * gh / h, borderType=cv2.BORDER_REFLECT)
    if (gh, gw) != (h, w):
        g = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    g -= g.mean()
    g /= g.std() + 1e-6
    return g


def make_textures(rng: np.random.Generator, shape: tuple[int, int],
                  pixel_spacing: tuple[float, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two independent fields per texture kind; slices blend them by lateral position."""
    py, px = 1.0 / pixel_spacing[0], 1.0 / pixel_spacing[1]
    spec = {
        "fine": (0.6 * px, 0.6 * py),
        "medium": (2.0 * px, 2.0 * py),
        "coarse": (10.0 * px, 10.0 * py),
        "striated": (0.7 * px, 5.0 * py),
        "marrow": (1.0 * px, 1.0 * py),
    }
    out = {}
    for kind, (sx, sy) in spec.items():
        a = _field(rng, shape, sx, sy)
        b = _field(rng, shape, sx, sy)
        if kind == "marrow":  # trabecular grain on top of patchy fat
            a = 0.75 * a + 0.65 * _field(rng, shape, 4 * px, 4 * py)
            b = 0.75 * b + 0.65 * _field(rng, shape, 4 * px, 4 * py)
        out[kind] = (a, b)
    return out


def _slab_fraction(st: Structure, x_rel: float, thickness: float) -> tuple[float, float]:
    """(overlap fraction of the slab with the structure, in-plane shrink factor)."""
    lo, hi = st.lateral
    a, b = x_rel - thickness / 2, x_rel + thickness / 2
    if st.lateral_centre is not None:
        c = st.lateral_centre
        frac = max(0.0, min(b, c + hi) - max(a, c - hi)) / thickness
        near = max(0.0, abs(x_rel - c) - thickness / 2)
    else:
        frac = (max(0.0, min(b, hi) - max(a, lo)) + max(0.0, min(b, -lo) - max(a, -hi))) / thickness
        near = max(0.0, abs(x_rel) - thickness / 2)
    shrink = 1.0
    if st.shrink is not None and hi < 1e8:
        shrink = math.sqrt(max(0.0, 1.0 - (near / hi) ** 2))
    return min(frac, 1.0), shrink


def _coverage(polys: list[np.ndarray], st: Structure, shape: tuple[int, int], p: np.ndarray,
              shrink: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Anti-aliased coverage (0..1) of a structure inside its bounding box."""
    h, w = shape
    pts_px = []
    for poly in polys:
        q = np.asarray(poly, dtype=np.float64)
        if st.shrink is not None and shrink < 0.999:
            c, ax = st.shrink
            rel = q - c
            q = q - (1.0 - shrink) * np.outer(rel @ ax, ax)
        pts_px.append(q / p - 0.5)
    allp = np.vstack(pts_px)
    pmin = float(p.min())
    pad = 2 + math.ceil(3 * st.blur_mm / pmin + st.line_mm / pmin)
    x0 = max(0, math.floor(allp[:, 0].min()) - pad)
    y0 = max(0, math.floor(allp[:, 1].min()) - pad)
    x1 = min(w, math.ceil(allp[:, 0].max()) + pad + 1)
    y1 = min(h, math.ceil(allp[:, 1].max()) + pad + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shifted = [np.round((q - [x0, y0]) * 16).astype(np.int32) for q in pts_px]
    if st.line_mm > 0:
        thick_px = st.line_mm / pmin
        thick = max(1, round(thick_px))
        cv2.polylines(canvas, shifted, False, 255, thickness=thick, lineType=cv2.LINE_AA, shift=4)
        cov = canvas.astype(np.float32) * (min(1.0, thick_px / thick) / 255.0)
    else:
        cv2.fillPoly(canvas, shifted, 255, lineType=cv2.LINE_AA, shift=4)
        cov = canvas.astype(np.float32) * (1.0 / 255.0)
    if st.blur_mm > 0:
        cov = cv2.GaussianBlur(cov, (0, 0), sigmaX=st.blur_mm / p[0], sigmaY=st.blur_mm / p[1])
    return (slice(y0, y1), slice(x0, x1)), cov


def composite_slices(anatomy: Anatomy, subject: Subject, offsets: np.ndarray, values: dict[str, np.ndarray],
                     textures: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Noise-free T1 and T2 signal of each slice.

    Args:
        anatomy: structures to draw, in painter's order.
        subject: pixel spacing, slice thickness, midline.
        offsets: lateral slice centres (mm, patient left positive).
        values: per tissue ``(t1, t2)`` from :func:`tissue_values`.
        textures: from :func:`make_textures`.

    Returns:
        Float32 array.

    Shape:
        ``(len(offsets), 2, H, W)``; axis 1 is (T1, T2).
    """
    n = subject.matrix
    p = np.array([subject.spacing_col, subject.spacing_row])  # (x, y) = (u, v) per pixel
    out = np.zeros((len(offsets), 2, n, n), np.float32)
    # coverage depends on the slice only through the shrink factor: reuse it across slices
    cache: dict[tuple[int, float], tuple[tuple[slice, slice], np.ndarray] | None] = {}
    for k, x in enumerate(offsets):
        x_rel = float(x) - subject.midline_x
        theta = x_rel / 5.0
        tex = {kind: (math.cos(theta) * a + math.sin(theta) * b) for kind, (a, b) in textures.items()}
        img = out[k]
        for st in anatomy.structures:
            frac, shrink = _slab_fraction(st, x_rel, subject.slice_thickness)
            if frac < 0.02 or shrink < 0.12:
                continue
            key = (id(st), round(shrink, 3))
            if key not in cache:
                cache[key] = _coverage(st.polys, st, (n, n), p, shrink)
            got = cache[key]
            if got is None:
                continue
            (sy, sx), cov = got
            alpha = cov * frac
            _, _, kind, amp = TISSUES[st.tissue]
            val = values[st.tissue] * np.asarray(st.value_scale)
            region = img[:, sy, sx]
            if kind is not None and amp > 0:
                mod = 1.0 + amp * tex[kind][sy, sx]
                for c in range(2):
                    region[c] += alpha * (val[c] * mod - region[c])
            else:
                for c in range(2):
                    region[c] += alpha * (val[c] - region[c])
    return out


@dataclass(frozen=True)
class Acquisition:
    """One series' acquisition parameters (drawn per series)."""

    contrast: str
    matrix_rows: int
    matrix_cols: int
    noise: float
    coil_length_mm: float
    bias_amplitude: float
    gain: float
    sat_band: tuple[float, float, float] | None  # (u_start, u_end, tilt) in mm / radians
    sat_floor: float


def sample_acquisition(rng: np.random.Generator, contrast: str, anatomy: Anatomy, subject: Subject,
                       sat_band: bool) -> Acquisition:
    """Draw acquisition parameters; the saturation band sits anterior to the column."""
    band = None
    if sat_band:
        ant = min(float(q.point(1.0, 0.5)[0]) for q in anatomy.bodies.values())
        u_end = ant - float(rng.uniform(6.0, 28.0))
        band = (u_end - float(rng.uniform(50.0, 120.0)), u_end, float(rng.normal(0.0, 0.08)))
    return Acquisition(
        contrast=contrast,
        matrix_rows=int(rng.integers(224, 385)),
        matrix_cols=int(rng.integers(256, 385)),
        noise=float(rng.uniform(0.012, 0.03)),
        coil_length_mm=float(rng.uniform(70.0, 130.0)),
        bias_amplitude=float(rng.uniform(0.05, 0.2)),
        gain=float(rng.uniform(500.0, 2800.0) if contrast == "t2" else rng.uniform(700.0, 3500.0)),
        sat_band=band,
        sat_floor=float(rng.uniform(0.03, 0.15)),
    )


def acquire(signal: np.ndarray, acq: Acquisition, subject: Subject, anatomy: Anatomy,
            rng: np.random.Generator) -> np.ndarray:
    """Apply coil, saturation band, acquisition matrix, Rician noise and scanner scaling.

    Args:
        signal: noise-free slices of one contrast.
        acq: the series' acquisition.
        subject: geometry (pixel spacing).
        anatomy: for the coil position (skin line).
        rng: noise generator.

    Returns:
        uint16 slices, same shape as ``signal``.

    Shape:
        ``signal``: ``(S, H, W)``.
    """
    s, h, w = signal.shape
    u = (np.arange(w, dtype=np.float32) + 0.5) * subject.spacing_col
    v = (np.arange(h, dtype=np.float32) + 0.5) * subject.spacing_row
    depth = np.clip(anatomy.skin_u - u, 0.0, None)
    coil = 0.05 + 0.95 * np.exp(-depth / acq.coil_length_mm)
    bias = 1.0 + acq.bias_amplitude * _field(rng, (h, w), 60.0 / subject.spacing_col, 60.0 / subject.spacing_row)
    gain = bias * coil[None, :]
    if acq.sat_band is not None:
        u0, u1, tilt = acq.sat_band
        uu = u[None, :] + (v[:, None] - v.mean()) * math.tan(tilt)
        edge = 3.0
        inside = np.clip((uu - u0) / edge + 0.5, 0, 1) * np.clip((u1 - uu) / edge + 0.5, 0, 1)
        gain = gain * (1.0 - (1.0 - acq.sat_floor) * inside)
    out = np.empty((s, h, w), np.uint16)
    for k in range(s):
        img = signal[k] * gain
        low = cv2.resize(img, (acq.matrix_cols, acq.matrix_rows), interpolation=cv2.INTER_AREA)
        re = low + acq.noise * rng.standard_normal(low.shape, dtype=np.float32)
        im = acq.noise * rng.standard_normal(low.shape, dtype=np.float32)
        mag = np.sqrt(re * re + im * im)
        up = cv2.resize(mag, (w, h), interpolation=cv2.INTER_CUBIC)
        out[k] = np.clip(up * acq.gain, 0, 65535).astype(np.uint16)
    return out
