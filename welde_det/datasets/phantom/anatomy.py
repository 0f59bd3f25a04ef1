"""Subject anatomy of the lumbar phantom: a sagittal spine model built in millimetres.

Coordinates are those of the displayed mid-sagittal slice, in millimetres from its
top-left corner: ``u`` runs posteriorly (image columns, anterior on the left) and ``v``
inferiorly (image rows, superior at the top). The lateral coordinate ``x`` (patient left
positive) selects the slice; every structure carries the lateral interval it occupies so
that parasagittal slices show pedicles, foramina, facets and psoas instead of the canal
and the spinous processes (through-plane partial volume is the overlap of a slice's slab
with that interval).

The column is built bottom-up from the S1 superior endplate: each disc and vertebral
body is a quadrilateral whose upper surface follows from the lower one through its
anterior/posterior heights (lordotic wedges), so sacral slope and lordosis vary per
subject and an anterolisthesis simply shifts everything above the slipped level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

__all__ = [
    "BOXED_DISCS",
    "DISCS",
    "LUMBAR_DISCS",
    "THORACIC_DISCS",
    "VERTEBRAE",
    "Anatomy",
    "Quad",
    "Structure",
    "Subject",
    "build_anatomy",
    "sample_subject",
]

#: Vertebrae modelled above the sacrum, top to bottom.
VERTEBRAE: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
#: Discs, top to bottom; disc ``i`` lies below ``VERTEBRAE[i]``.
DISCS: tuple[str, ...] = (
    "T10-T11", "T11-T12", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1",
)
#: Discs that can carry a box (T10-T11 is always at or above the top edge).
BOXED_DISCS: tuple[str, ...] = DISCS[1:]
#: Thoracic levels at the top of the field (TDB lives here, LDB does not).
THORACIC_DISCS: tuple[str, ...] = ("T11-T12", "T12-L1")
#: Lumbar levels (LDB, SS and the spondylolisthesis levels live here).
LUMBAR_DISCS: tuple[str, ...] = DISCS[3:]

# Mean adult dimensions in mm (posterior body height, AP depth, lateral half-width).
_BODY_H = (22.0, 23.5, 25.0, 27.5, 28.5, 29.0, 29.0, 28.5)
_BODY_D = (28.0, 29.5, 31.0, 33.0, 35.0, 36.5, 37.5, 37.0)
_BODY_W = (16.0, 17.0, 18.0, 20.0, 21.5, 23.0, 24.0, 25.0)
_BODY_WEDGE = (-4.0, -3.0, -3.0, -2.0, 0.0, 1.0, 2.0, 5.0)  # degrees, + = anterior taller
_DISC_H = (5.5, 6.5, 8.5, 10.0, 11.0, 12.0, 12.5, 11.5)
_DISC_WEDGE = (-3.0, -2.0, 0.0, 4.0, 6.0, 8.0, 11.0, 14.0)
_SACRUM_H = (27.0, 21.0, 17.0, 13.0, 10.0)
_SACRUM_D = (37.0, 29.0, 23.0, 17.0, 12.0)


def _e(phi: float | np.ndarray) -> np.ndarray:
    """Unit vector along an endplate pointing anteriorly; ``phi`` > 0 = anterior end lower."""
    return np.stack([-np.cos(phi), np.sin(phi)], axis=-1)


def _n(phi: float | np.ndarray) -> np.ndarray:
    """Unit normal of an endplate pointing superiorly."""
    return np.stack([-np.sin(phi), -np.cos(phi)], axis=-1)


def _tilt(p: np.ndarray, a: np.ndarray) -> float:
    """Endplate tilt of the segment posterior ``p`` -> anterior ``a``."""
    d = a - p
    return math.atan2(d[1], -d[0])


def chaikin(poly: np.ndarray, iterations: int = 2, closed: bool = True) -> np.ndarray:
    """Corner-cutting smoothing of a polyline (Chaikin); keeps the ends of open lines."""
    pts = np.asarray(poly, dtype=np.float64)
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0) if closed else pts[1:]
        cur = pts if closed else pts[:-1]
        q = 0.75 * cur + 0.25 * nxt
        r = 0.25 * cur + 0.75 * nxt
        mid = np.stack([q, r], axis=1).reshape(-1, 2)
        pts = mid if closed else np.vstack([pts[:1], mid, pts[-1:]])
    return pts


@dataclass(frozen=True)
class Quad:
    """A bilinear patch: posterior/anterior corners of the lower and upper surfaces.

    ``point(s, t)`` maps ``s`` in [0, 1] (posterior -> anterior) and ``t`` in [0, 1]
    (lower -> upper surface) to millimetres; values outside [0, 1] extrapolate.
    """

    p_low: np.ndarray
    a_low: np.ndarray
    p_up: np.ndarray
    a_up: np.ndarray

    def point(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)[..., None]
        t = np.asarray(t, dtype=np.float64)[..., None]
        low = (1 - s) * self.p_low + s * self.a_low
        up = (1 - s) * self.p_up + s * self.a_up
        return (1 - t) * low + t * up

    @property
    def depth(self) -> float:
        return 0.5 * float(np.linalg.norm(self.a_low - self.p_low) + np.linalg.norm(self.a_up - self.p_up))

    @property
    def height(self) -> float:
        return 0.5 * float(np.linalg.norm(self.p_up - self.p_low) + np.linalg.norm(self.a_up - self.a_low))

    @property
    def centre(self) -> np.ndarray:
        return self.point(0.5, 0.5)

    @cached_property
    def anterior_dir(self) -> np.ndarray:
        d = (self.a_low - self.p_low) + (self.a_up - self.p_up)
        return d / np.linalg.norm(d)


@dataclass
class Structure:
    """One drawable piece of anatomy.

    Attributes:
        name: unique name (``disc_L4-L5``, ``body_L4``, ``canal_L4-L5`` ...).
        tissue: key of the tissue table in :mod:`~welde_det.datasets.phantom.render`.
        polys: closed polygons (mm), or open polylines when ``line_mm`` > 0.
        lateral: ``(lo, hi)``: the structure occupies ``lo <= |x - midline| <= hi`` mm.
        shrink: ``(centre, axis)``: in a slice at lateral offset ``x`` the polygon is
            compressed along ``axis`` about ``centre`` by ``sqrt(1 - (x/hi)^2)``
            (an elliptical cross-section); ``None`` keeps the shape.
        line_mm: stroke width of a polyline; 0 for filled polygons.
        blur_mm: Gaussian softening of the edge (nucleus, Modic bands).
        value_scale: multiplies the tissue's T1/T2 values (e.g. disc desiccation),
            given per contrast as ``(t1, t2)``.
        lateral_centre: for a single off-midline structure (a nerve-root strand, the
            aorta, a bowel loop): it occupies ``|x - lateral_centre| <= lateral[1]``;
            ``None`` means the symmetric pair of intervals about the midline.
    """

    name: str
    tissue: str
    polys: list[np.ndarray]
    lateral: tuple[float, float] = (0.0, 1e9)
    shrink: tuple[np.ndarray, np.ndarray] | None = None
    line_mm: float = 0.0
    blur_mm: float = 0.0
    value_scale: tuple[float, float] = (1.0, 1.0)
    lateral_centre: float | None = None


@dataclass
class Subject:
    """Per-subject parameters (sizes in mm, angles in radians)."""

    spacing_row: float
    spacing_col: float
    matrix: int
    n_slices: int
    slice_thickness: float
    slice_spacing: float
    scale: float
    sacral_slope: float
    lordosis: float
    midline_x: float
    canal_depth: float
    fat_thickness: float
    muscle_extra: float
    age: int
    conus_level: float
    top_visible: bool
    top_margin: float
    column_u: float
    jitter: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row, column) spacing in mm; rows are often coarser (rectangular field)."""
        return (self.spacing_row, self.spacing_col)

    @property
    def fov_v(self) -> float:
        """Field of view superior-inferior (mm)."""
        return self.spacing_row * self.matrix

    @property
    def fov_u(self) -> float:
        """Field of view anterior-posterior (mm)."""
        return self.spacing_col * self.matrix

    def slice_offsets(self) -> np.ndarray:
        """Lateral centre of each slice (mm, patient left positive), mid slice at 0."""
        k = np.arange(self.n_slices) - (self.n_slices - 1) / 2
        return k * self.slice_spacing


def sample_subject(rng: np.random.Generator, top_visible: bool, matrix: int = 384) -> Subject:
    """Draw one subject's geometry and acquisition parameters.

    Args:
        rng: the study's generator.
        top_visible: whether the T11-T12 disc must lie fully inside the field.
        matrix: image rows/columns.
    """
    n_slices = int(rng.choice([9, 11, 13, 15]))
    row = float(rng.uniform(0.7, 0.88))
    slope = float(rng.uniform(30.0, 50.0))
    thickness = float(rng.uniform(3.0, 4.0))
    return Subject(
        spacing_row=row,
        spacing_col=row * float(rng.uniform(0.68, 0.9)),
        matrix=matrix,
        n_slices=n_slices,
        slice_thickness=thickness,
        slice_spacing=thickness * float(rng.uniform(1.0, 1.15)),
        scale=float(rng.uniform(0.9, 1.1)),
        sacral_slope=math.radians(slope),
        lordosis=slope / 45.0 * float(rng.uniform(0.85, 1.15)),
        midline_x=float(rng.uniform(-1.0, 1.0)),
        canal_depth=float(rng.uniform(17.0, 22.0)),
        fat_thickness=float(rng.uniform(6.0, 28.0)),
        muscle_extra=float(rng.uniform(6.0, 18.0)),
        age=int(rng.integers(22, 80)),
        conus_level=float(rng.uniform(2.3, 3.6)),  # index into VERTEBRAE (T12 .. L1-L2)
        top_visible=top_visible,
        top_margin=float(rng.uniform(2.0, 14.0)),
        column_u=float(rng.uniform(0.41, 0.5)),
        jitter={
            "body_h": rng.normal(1.0, 0.035, len(VERTEBRAE)),
            "body_d": rng.normal(1.0, 0.035, len(VERTEBRAE)),
            "disc_h": rng.normal(1.0, 0.06, len(DISCS)),
            "disc_wedge": rng.normal(0.0, 1.5, len(DISCS)),
            "body_wedge": rng.normal(0.0, 1.0, len(VERTEBRAE)),
            "concavity": rng.uniform(0.6, 2.0, len(VERTEBRAE) * 2),
            "spinous_len": rng.normal(1.0, 0.08, len(VERTEBRAE)),
            "spinous_angle": rng.normal(0.0, 4.0, len(VERTEBRAE)),
            "flavum": rng.uniform(2.0, 3.2, len(DISCS)),
            "sacral_kyphosis": rng.uniform(6.0, 13.0, 4),
        },
    )


@dataclass
class Anatomy:
    """The built column: quads per body/disc, the canal sampling and the structures.

    Attributes:
        bodies: vertebral-body quads keyed by vertebra name (``"S1"``..``"S5"`` for the sacrum).
        discs: disc quads keyed by level.
        structures: drawable structures in painter's order (back to front).
        annotation_polys: polygon (mm, mid-sagittal slice) of every structure that can
            carry a box: ``disc_<level>``, ``canal_<level>``, ``segment_<vertebra>`` (the
            slip zone below a vertebra: its lower third, the disc, the next body's upper third).
    """

    bodies: dict[str, Quad]
    discs: dict[str, Quad]
    structures: list[Structure]
    annotation_polys: dict[str, np.ndarray]
    skin_u: float


# ---------------------------------------------------------------------------- column


def _build_column(subject: Subject, levels: dict[str, dict]) -> tuple[dict[str, Quad], dict[str, Quad]]:
    """Stack sacrum, discs and bodies from the S1 endplate; origin at S1's posterior corner."""
    sc = subject.scale
    jit = subject.jitter
    bodies: dict[str, Quad] = {}
    discs: dict[str, Quad] = {}
    # Sacrum: downwards from S1's superior endplate, curving forward (kyphotic).
    p = np.zeros(2)
    phi = subject.sacral_slope
    kyph = [0.0, *list(jit["sacral_kyphosis"])]
    for i, name in enumerate(("S1", "S2", "S3", "S4", "S5")):
        h = _SACRUM_H[i] * sc
        d = _SACRUM_D[i] * sc
        phi_low = phi - math.radians(kyph[min(i + 1, 4)] if i < 4 else 8.0)
        p_low = p - _n(phi) * h
        a_up = p + _e(phi) * d
        a_low = p_low + _e(phi_low) * d * 0.95
        bodies[name] = Quad(p_low, a_low, p.copy(), a_up)
        p = p_low - _n(phi_low) * 0.9 * sc  # fused remnant disc
        phi = phi_low
    # Lumbar and thoracic column upwards.
    p = np.zeros(2)
    phi = subject.sacral_slope
    d_below = _SACRUM_D[0] * sc
    for i in range(len(DISCS) - 1, -1, -1):
        level = levels[DISCS[i]]
        v = i  # vertebra above disc i
        d_above = _BODY_D[v] * sc * jit["body_d"][v]
        depth = 0.5 * (d_above + d_below)
        h = _DISC_H[i] * sc * jit["disc_h"][i] * level["height_factor"]
        wedge = math.radians(_DISC_WEDGE[i] * subject.lordosis + jit["disc_wedge"][i])
        diff = depth * math.tan(wedge) * level["height_factor"]
        hp, ha = max(h - diff / 2, 1.2), max(h + diff / 2, 1.2)
        a = p + _e(phi) * depth
        p_up = p + _n(phi) * hp + _e(phi) * level["slip_mm"]
        a_up = a + _n(phi) * ha + _e(phi) * level["slip_mm"]
        phi_up = _tilt(p_up, a_up)
        discs[DISCS[i]] = Quad(p, p + _e(phi) * d_below, p_up, p_up + _e(phi_up) * d_above)
        # vertebral body above the disc
        hb = _BODY_H[v] * sc * jit["body_h"][v]
        bw = math.radians(_BODY_WEDGE[v] + jit["body_wedge"][v])
        bdiff = d_above * math.tan(bw)
        b_lowp = p_up
        b_lowa = p_up + _e(phi_up) * d_above
        b_upp = b_lowp + _n(phi_up) * hb
        b_upa = b_lowa + _n(phi_up) * (hb + bdiff)
        bodies[VERTEBRAE[v]] = Quad(b_lowp, b_lowa, b_upp, b_upa)
        p = b_upp
        phi = _tilt(b_upp, b_upa)
        d_below = d_above
    return bodies, discs


def _body_outline(q: Quad, inset: float, conc_low: float, conc_up: float,
                  irregular: tuple[float, float] = (0.0, 0.0), rng: np.random.Generator | None = None,
                  osteo: tuple[float, float] = (0.0, 0.0), n: int = 14) -> np.ndarray:
    """Outline of a vertebral body in (s, t) then mapped: concave endplates, rounded corners.

    ``irregular`` (mm, lower and upper endplate) adds endplate irregularity; ``osteo``
    (mm, lower and upper) adds anterior osteophytes that lip over the disc.
    """
    d, h = q.depth, q.height
    si, ti = inset / d, inset / h
    s = np.linspace(si, 1 - si, n)
    t = np.linspace(ti, 1 - ti, n)
    bump = np.clip(np.sin(np.pi * (s - si) / (1 - 2 * si)), 0, 1) ** 1.5
    low_t = ti + bump * conc_low / h
    up_t = 1 - ti - bump * conc_up / h
    if rng is not None and (irregular[0] > 0 or irregular[1] > 0):
        low_t = low_t + np.abs(rng.normal(0, 1, n)) * irregular[0] / h * bump
        up_t = up_t - np.abs(rng.normal(0, 1, n)) * irregular[1] / h * bump
    ant_s = 1 - si - 0.9 * np.sin(np.pi * t) / d
    post_s = si + 0.5 * np.sin(np.pi * t) / d
    lower = np.stack([s, low_t], 1)                          # posterior -> anterior
    anterior = np.stack([ant_s, t], 1)                        # bottom -> top
    upper = np.stack([s[::-1], up_t[::-1]], 1)                # anterior -> posterior
    posterior = np.stack([post_s[::-1], t[::-1]], 1)          # top -> bottom
    if osteo[0] > 0:
        anterior[0] = [1 - si + osteo[0] / d * 0.6, ti - osteo[0] / h * 0.8]
    if osteo[1] > 0:
        anterior[-1] = [1 - si + osteo[1] / d * 0.6, 1 - ti + osteo[1] / h * 0.8]
    st = np.vstack([lower, anterior[1:-1], upper, posterior[1:-1]])
    return chaikin(q.point(st[:, 0], st[:, 1]), 2)


def _bump(t: np.ndarray, lo: float, hi: float, edge: float) -> np.ndarray:
    """Smooth 0..1 plateau on [lo, hi] with raised-cosine flanks of width ``edge``."""
    up = np.clip((t - (lo - edge)) / edge, 0, 1)
    down = np.clip(((hi + edge) - t) / edge, 0, 1)
    return np.minimum(0.5 - 0.5 * np.cos(np.pi * up), 0.5 - 0.5 * np.cos(np.pi * down))


def _disc_outline(q: Quad, bulge: float, n: int = 16) -> np.ndarray:
    """Disc outline: tucked into the endplate concavities, posterior margin bulging ``bulge`` mm."""
    d = q.depth
    t = np.linspace(-0.12, 1.12, n)
    prof = np.sin(np.pi * np.clip(t, 0, 1)) ** 0.6
    post_s = -(0.15 + bulge * prof) / d
    ant_s = 1 + (0.5 + 0.6 * prof) / d
    s = np.linspace(0, 1, 10)
    lower = np.stack([s, np.full_like(s, -0.12)], 1)
    anterior = np.stack([ant_s, t], 1)
    upper = np.stack([s[::-1], np.full_like(s, 1.12)], 1)
    posterior = np.stack([post_s[::-1], t[::-1]], 1)
    st = np.vstack([lower, anterior, upper, posterior])
    return chaikin(q.point(st[:, 0], st[:, 1]), 2)


def _ellipse(q: Quad, cs: float, ct: float, rs: float, rt: float, n: int = 28) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return q.point(cs + rs * np.cos(a), ct + rt * np.sin(a))


def _offset_line(points: np.ndarray, dirs: np.ndarray, dist: np.ndarray | float) -> np.ndarray:
    return points + dirs * np.asarray(dist, dtype=np.float64)[..., None]


def _smooth_open(pts: np.ndarray, k: int) -> np.ndarray:
    """Moving average of an open polyline with edge padding (window ``2k+1``)."""
    if k <= 0:
        return pts
    pad = np.vstack([np.repeat(pts[:1], k, 0), pts, np.repeat(pts[-1:], k, 0)])
    ker = np.ones(2 * k + 1) / (2 * k + 1)
    return np.stack([np.convolve(pad[:, j], ker, mode="valid") for j in range(2)], 1)


def _band(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Closed polygon between two polylines sampled at the same stations."""
    return np.vstack([a, b[::-1]])


# ---------------------------------------------------------------------------- assembly


def build_anatomy(subject: Subject, levels: dict[str, dict], rng: np.random.Generator,
                  draw: bool = True) -> Anatomy:
    """Build the column, place it in the field and list every structure to draw.

    Args:
        subject: subject parameters from :func:`sample_subject`.
        levels: per disc level a dict with ``height_factor``, ``slip_mm``, ``bulge_mm``,
            ``nucleus_t2``, ``irregular_mm``, ``osteophyte_mm``, ``modic`` (0 none, 1, 2),
            ``flavum_extra_mm``, ``cleft`` (from :mod:`~welde_det.datasets.phantom.findings`).
        rng: the study's generator (textures of shape details).
        draw: ``False`` builds only what the annotations need (bodies, discs, canal);
            boxes and masks are identical either way.
    """
    # shape details only drawn (bowel, nerve strands...) take their own stream, so the
    # annotation geometry does not depend on ``draw``
    draw_rng = np.random.default_rng(int(rng.integers(2**62)))
    bodies, discs = _build_column(subject, levels)
    _place(subject, bodies, discs)
    sc = subject.scale
    jit = subject.jitter
    structs: list[Structure] = []
    ann: dict[str, np.ndarray] = {}

    order = [*VERTEBRAE, "S1", "S2", "S3", "S4", "S5"]
    # ---------------- canal stations along the posterior wall, top to bottom
    stations_w, stations_m, stations_pd, tags = [], [], [], []
    for i, vname in enumerate(order):
        q = bodies[vname]
        ts = np.linspace(1, 0, 9)[:-1] if (not vname.startswith("S") or vname == "S1") else np.linspace(1, 0, 5)[:-1]
        w = q.point(np.zeros_like(ts), ts)
        stations_w.append(w)
        stations_m.append(w)
        stations_pd.append(np.repeat(-q.anterior_dir[None], len(ts), 0))
        tags.extend((vname, float(t)) for t in ts)
        if i < len(DISCS):
            dq = discs[DISCS[i]]
            b = levels[DISCS[i]]["bulge_mm"]
            ts = np.linspace(1, 0, 9)[:-1]
            w = dq.point(np.zeros_like(ts), ts)
            prof = np.sin(np.pi * ts) ** 0.6
            stations_w.append(w)
            stations_m.append(w - dq.anterior_dir[None] * (0.15 + b * prof)[:, None])
            stations_pd.append(np.repeat(-dq.anterior_dir[None], len(ts), 0))
            tags.extend((DISCS[i], float(t)) for t in ts)
    stations_w = np.vstack(stations_w)
    stations_m = np.vstack(stations_m)
    stations_pd = np.vstack(stations_pd)
    W = _smooth_open(stations_w, 1)
    M = stations_m
    PD = _smooth_open(stations_pd, 2)
    PD /= np.linalg.norm(PD, axis=1, keepdims=True)
    K = len(W)
    vnames = [tg[0] for tg in tags]
    # canal depth: thoracic a bit smaller, sacral canal tapering.
    depth = np.full(K, subject.canal_depth)
    flav = np.zeros(K)
    epi_p = np.full(K, 1.6)
    for k, (name, t) in enumerate(tags):
        if name in ("T10", "T11", "T12") or name in DISCS[:2]:
            depth[k] *= 0.88
        if name.startswith("S"):
            si = int(name[1]) - 1 + (1 - t)
            depth[k] *= max(0.3, 0.82 - 0.16 * si)
    for i, dname in enumerate(DISCS):
        lv = levels[dname]
        base = jit["flavum"][i] + lv["flavum_extra_mm"]
        # flavum spans the disc and the upper part of the body below
        for k, (name, t) in enumerate(tags):
            if name == dname:
                flav[k] = max(flav[k], base * (0.55 + 0.45 * math.sin(math.pi * min(1.0, t * 1.2))))
            elif name == order[i + 1] and t > 0.55:
                flav[k] = max(flav[k], base * (t - 0.55) / 0.45 * 0.8)
            elif name == order[i] and t < 0.15:
                flav[k] = max(flav[k], base * (0.15 - t) / 0.15 * 0.5)
    flav = np.convolve(np.pad(flav, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    bony_post = _offset_line(W, PD, depth)
    bulge_off = np.einsum("kj,kj->k", M - W, PD)
    dura_ant_d = np.maximum(1.3, bulge_off + 0.4)
    dura_post_d = np.maximum(dura_ant_d + 1.0, depth - flav - epi_p)
    # the thecal sac ends at S2
    sac = np.ones(K)
    for k, (name, t) in enumerate(tags):
        if name == "S1":
            sac[k] = 0.55 + 0.45 * t
        elif name == "S2":
            sac[k] = 0.55 * t
        elif name.startswith("S"):
            sac[k] = 0.0
    dura_post_d = dura_ant_d + (dura_post_d - dura_ant_d) * sac
    dura_ant = _offset_line(W, PD, dura_ant_d)
    dura_post = _offset_line(W, PD, dura_post_d)
    flav_line = _offset_line(W, PD, depth - flav)

    # ---------------- outer body: skin, fat, muscle, viscera
    fov = subject.fov_v
    spin_len = 27.0 * sc
    skin_d = depth + spin_len + subject.muscle_extra + subject.fat_thickness
    for k, name in enumerate(vnames):
        if name.startswith("S"):
            skin_d[k] += 9.0 * (int(name[1]) - 1 + (1 - tags[k][1]))  # buttocks
    skin = _smooth_open(_offset_line(W, PD, skin_d), 12)
    fat_in = _smooth_open(_offset_line(W, PD, skin_d - subject.fat_thickness), 12)

    def extend(line: np.ndarray) -> np.ndarray:
        top_dir = line[0] - line[6]
        bot_dir = line[-1] - line[-7]
        top_dir /= np.linalg.norm(top_dir)
        bot_dir /= np.linalg.norm(bot_dir)
        return np.vstack([line[0] + top_dir * 80.0, line, line[-1] + bot_dir * 80.0])

    skin_full = extend(skin)
    fat_full = extend(fat_in)
    if draw:
        body_poly = np.vstack([skin_full, [[-50.0, fov + 50.0], [-50.0, -50.0]]])
        structs.append(Structure("body", "viscera", [body_poly]))
        structs.append(Structure("subcutaneous_fat", "fat", [_band(skin_full, fat_full)]))
        structs.append(Structure("skin", "skin", [skin_full], line_mm=1.2))
        # posterior muscles from the bony canal to the fat
        bp_full = extend(bony_post)
        structs.append(Structure("paraspinal_muscle", "muscle", [_band(bp_full, fat_full)]))
        # retroperitoneal fat and prevertebral tissue anterior to the column
        ant_pts = []
        for vname in order[:9]:
            q = bodies[vname]
            for t in np.linspace(1, 0, 5):
                ant_pts.append(q.point(1.0, t))
        ant = np.array(ant_pts)
        ant_dir = np.array([bodies[v].anterior_dir for v in order[:9] for _ in range(5)])
        retro = _band(ant - ant_dir * 2.0, _smooth_open(ant + ant_dir * draw_rng.uniform(5, 12), 3))
        # presacral / pelvic fat in front of the sacrum, thickening downwards
        sac = np.vstack([bodies[n].point(np.full(4, 1.0), np.linspace(1, 0, 4)) for n in ("S1", "S2", "S3", "S4", "S5")])
        sac_dir = np.vstack([np.repeat(bodies[n].anterior_dir[None], 4, 0) for n in ("S1", "S2", "S3", "S4", "S5")])
        thick = np.linspace(6.0, 30.0, len(sac)) * float(draw_rng.uniform(0.7, 1.4))
        presacral = _band(sac - sac_dir * 2.0, _smooth_open(sac + sac_dir * thick[:, None], 3))
        structs.append(Structure("presacral_fat", "fat", [chaikin(presacral, 2)], lateral=(0, 70), blur_mm=2.0))
        structs.append(Structure("retroperitoneal_fat", "fat", [retro], lateral=(0, 60)))
        # psoas, lateral to the lumbar bodies (parasagittal slices only)
        ps_in, ps_out = [], []
        for j, vname in enumerate(("L1", "L2", "L3", "L4", "L5", "S1")):
            q = bodies[vname]
            for t in np.linspace(1, 0, 4):
                base = q.point(0.75, t)
                ps_in.append(base)
                ps_out.append(base + q.anterior_dir * (6 + 7 * j + 4 * t) * sc)
        structs.append(Structure("psoas", "muscle", [chaikin(_band(np.array(ps_in), np.array(ps_out)), 2)],
                                 lateral=(17.0, 60.0)))
        # aorta / common iliac (flow void), left of the midline
        aorta = []
        for vname in ("T10", "T11", "T12", "L1", "L2", "L3", "L4"):
            q = bodies[vname]
            aorta.append(q.point(1.0, 0.5) + q.anterior_dir * 11 * sc)
        structs.append(Structure("aorta", "vessel", [np.array(aorta)], line_mm=18 * sc,
                                 lateral=(0.0, 10.0), lateral_centre=-16.0))
        # bowel loops anterior to the column and in the pelvis
        _bowel(structs, bodies, draw_rng, subject)

        # ---------------- canal: epidural fat, flavum, dura (CSF), cord, cauda equina
        bony_canal = _band(W, bony_post)
        structs.append(Structure("epidural_fat", "fat", [bony_canal], lateral=(0, 11.0)))
        structs.append(Structure("ligamentum_flavum", "ligament", [_band(flav_line, bony_post)], lateral=(0, 13.0)))
        structs.append(Structure("pll", "ligament", [_band(W, _offset_line(W, PD, 1.0))], lateral=(0, 9.0)))
        sac_axis_c = 0.5 * (dura_ant + dura_post)
        structs.append(Structure("dura", "csf", [_band(dura_ant, dura_post)], lateral=(0, 8.5),
                                 shrink=(sac_axis_c.mean(0), PD.mean(0) / np.linalg.norm(PD.mean(0)))))
        # cord to the conus, then the cauda equina strands
        conus_k = int(min(K - 1, max(1, round(subject.conus_level * 16))))
        cord_w = np.concatenate([np.full(max(conus_k - 6, 1), 3.6 * sc), np.linspace(3.6 * sc, 0.4, 6)])[:conus_k]
        cord_c = sac_axis_c[:conus_k] - PD[:conus_k] * 0.8
        cord = _band(_offset_line(cord_c, PD[:conus_k], -cord_w), _offset_line(cord_c, PD[:conus_k], cord_w)[:len(cord_w)])
        structs.append(Structure("cord", "nerve", [cord], lateral=(0, 4.5),
                                 shrink=(cord_c.mean(0), PD.mean(0) / np.linalg.norm(PD.mean(0)))))
        n_strands = 7
        for j in range(n_strands):
            frac = 0.25 + 0.6 * j / (n_strands - 1) + draw_rng.uniform(-0.05, 0.05)
            end = int(min(K - 1, conus_k + 10 + j * (K - conus_k) / n_strands))
            pts = dura_ant[conus_k - 1:end] + (dura_post[conus_k - 1:end] - dura_ant[conus_k - 1:end]) * frac
            if len(pts) < 2:
                continue
            lx = float(draw_rng.uniform(-6.0, 6.0))
            structs.append(Structure(f"cauda_{j}", "nerve", [pts], line_mm=0.9, lateral=(0.0, 0.9),
                                     lateral_centre=lx))

        # ---------------- posterior elements
        by_name: dict[str, tuple[list[int], np.ndarray]] = {}
        for k, (nm, tt) in enumerate(tags):
            by_name.setdefault(nm, ([], []))
            by_name[nm][0].append(k)
            by_name[nm][1].append(tt)

        def st_index(name: str, t: float) -> int:
            ks, tts = by_name[name]
            return ks[int(np.argmin(np.abs(np.asarray(tts) - t)))]

        tips: list[np.ndarray] = []
        # fat streaks in the paraspinal muscles, along the column
        for j in range(int(draw_rng.integers(5, 11))):
            k = int(draw_rng.integers(5, K - 5))
            start = bony_post[k] + PD[k] * float(draw_rng.uniform(8.0, max(9.0, spin_len + subject.muscle_extra)))
            along = W[min(K - 1, k + 6)] - W[max(0, k - 6)]
            along /= np.linalg.norm(along)
            streak = start + np.outer(np.linspace(-1, 1, 6), along) * float(draw_rng.uniform(8.0, 25.0))
            structs.append(Structure(f"muscle_fat_{j}", "fat", [streak], line_mm=float(draw_rng.uniform(0.8, 2.2)),
                                     lateral=(0.0, 60.0), blur_mm=0.6))
        for i, vname in enumerate(VERTEBRAE):
            k_top = st_index(vname, 0.8)
            k_bot = st_index(DISCS[i], 0.45)
            b_top = bony_post[k_top] - PD[k_top] * 1.5
            b_bot = bony_post[k_bot] - PD[k_bot] * 1.5
            pd = PD[(k_top + k_bot) // 2]
            down = np.array([-pd[1], pd[0]]) if np.array([-pd[1], pd[0]])[1] > 0 else np.array([pd[1], -pd[0]])
            thoracic = vname.startswith("T")
            ang = math.radians((38.0 if thoracic else 8.0) + jit["spinous_angle"][i])
            direc = pd * math.cos(ang) + down * math.sin(ang)
            length = (30.0 if thoracic else 26.0) * sc * jit["spinous_len"][i]
            base_h = np.linalg.norm(b_bot - b_top)
            mid = 0.5 * (b_top + b_bot)
            tip = mid + direc * length
            perp = np.array([-direc[1], direc[0]])
            if perp[1] > 0:
                perp = -perp
            tip_h = base_h * (0.35 if thoracic else 0.45)
            poly = np.array([b_top, mid + direc * length * 0.55 + perp * tip_h * 0.9, tip + perp * tip_h * 0.6,
                             tip + direc * 2.0, tip - perp * tip_h * 0.7, mid + direc * length * 0.5 - perp * tip_h,
                             b_bot])
            poly = chaikin(poly, 3)
            tips.append(tip + direc * 1.5)
            if draw_rng.random() < 0.8:  # interspinous fat below the process
                fc = mid + direc * length * float(draw_rng.uniform(0.35, 0.7)) + down * base_h * 0.8
                a = np.linspace(0, 2 * np.pi, 18, endpoint=False)
                ell = fc + np.outer(np.cos(a), direc) * length * 0.3 + np.outer(np.sin(a), down) * base_h * 0.28
                structs.append(Structure(f"interspinous_fat_{vname}", "fat", [ell], lateral=(0, 6.0), blur_mm=1.5))
            structs.append(Structure(f"spinous_cortex_{vname}", "cortex", [poly], lateral=(0, 4.0)))
            inner = mid + (poly - mid) * 0.82 + direc * 0.6
            structs.append(Structure(f"spinous_{vname}", "marrow_post", [inner], lateral=(0, 4.0)))
            # lamina (parasagittal), pedicle, foramen, articular pillar
            lam = np.array([b_top + PD[k_top] * 1.0, b_top + PD[k_top] * 9.0, b_bot + PD[k_bot] * 7.0, b_bot])
            structs.append(Structure(f"lamina_{vname}", "cortex", [chaikin(lam, 2)], lateral=(3.5, 13.0)))
            q = bodies[vname]
            ped_a = st_index(vname, 0.92)
            ped_b = st_index(vname, 0.5)
            ped = _band(W[ped_a:ped_b + 1] - PD[ped_a:ped_b + 1], bony_post[ped_a:ped_b + 1])
            structs.append(Structure(f"pedicle_{vname}", "marrow_post", [chaikin(ped, 2)], lateral=(9.0, 17.0)))
            f_a = st_index(vname, 0.45)
            f_b = st_index(order[i + 1], 0.92) if i + 1 < len(order) else f_a + 8
            foramen = _band(M[f_a:f_b + 1], bony_post[f_a:f_b + 1] - PD[f_a:f_b + 1] * 2.0)
            structs.append(Structure(f"foramen_{DISCS[i]}", "fat", [chaikin(foramen, 2)], lateral=(9.0, 20.0)))
            root_c = W[f_a] + PD[f_a] * depth[f_a] * 0.45 + (W[f_b] - W[f_a]) * 0.25
            a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
            root = root_c + np.stack([np.cos(a) * 2.6, np.sin(a) * 3.0], 1) * sc
            structs.append(Structure(f"root_{DISCS[i]}", "nerve", [root], lateral=(10.0, 19.0)))
            p_a = st_index(vname, 1.0)
            p_b = st_index(DISCS[i], 0.3)
            pil = _band(bony_post[p_a:p_b + 1] - PD[p_a:p_b + 1] * 1.0, bony_post[p_a:p_b + 1] + PD[p_a:p_b + 1] * 13.0)
            structs.append(Structure(f"facet_{vname}", "cortex", [chaikin(pil, 2)], lateral=(12.0, 26.0)))
            inner_p = pil.mean(0) + (chaikin(pil, 2) - pil.mean(0)) * 0.8
            structs.append(Structure(f"facet_marrow_{vname}", "marrow_post", [inner_p], lateral=(12.0, 26.0)))
        structs.append(Structure("supraspinous_ligament", "ligament", [np.array(tips)], line_mm=2.0,
                                 lateral=(0, 5.0)))
        # median sacral crest
        for j, sname in enumerate(("S1", "S2", "S3")):
            k = st_index(sname, 0.5)
            base = bony_post[k] - PD[k] * 0.5
            tip = base + PD[k] * (9.0 - 2 * j) * sc
            perp = np.array([-PD[k][1], PD[k][0]])
            poly = chaikin(np.array([base + perp * 5, tip + perp * 2, tip - perp * 2, base - perp * 5]), 2)
            structs.append(Structure(f"sacral_crest_{sname}", "cortex", [poly], lateral=(0, 5.0)))

    # fused sacrum: one cortical shell under the segments, so remnant discs read as dark lines
    sac_pts = np.vstack([bodies[n].point(np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0]))
                         for n in ("S1", "S2", "S3", "S4", "S5")])
    hull = cv2.convexHull(sac_pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    structs.append(Structure("sacrum_shell", "cortex", [chaikin(hull, 2)], lateral=(0, 24.0)))

    # ---------------- discs, then vertebral bodies (drawn over the disc margins)
    for i, dname in enumerate(DISCS):
        lv = levels[dname]
        q = discs[dname]
        w_lat = _BODY_W[i] * sc
        centre = q.point(0.45, 0.5)
        shrink = (centre, q.anterior_dir)
        outline = _disc_outline(q, lv["bulge_mm"])
        structs.append(Structure(f"disc_{dname}", "annulus", [outline], lateral=(0, w_lat), shrink=shrink))
        # nucleus: a soft ellipse whose T2 signal carries desiccation
        hf = lv["height_factor"]
        nuc = _ellipse(q, 0.48, 0.5, 0.39, 0.32 + 0.08 * hf)
        structs.append(Structure(f"nucleus_{dname}", "nucleus", [nuc], lateral=(0, w_lat * 0.75),
                                 shrink=shrink, blur_mm=1.3, value_scale=(1.0, lv["nucleus_t2"])))
        if lv["cleft"]:
            cl = q.point(np.linspace(0.22, 0.7, 8), np.full(8, 0.5) + draw_rng.normal(0, 0.02, 8))
            structs.append(Structure(f"cleft_{dname}", "annulus", [cl], line_mm=0.7, lateral=(0, w_lat * 0.6),
                                     shrink=shrink))
        ann[f"disc_{dname}"] = outline
    for v, vname in enumerate(order):
        q = bodies[vname]
        sacral = vname.startswith("S")
        w_lat = (_BODY_W[v] if not sacral else 24.0 - 4 * (int(vname[1]) - 1)) * sc
        conc = jit["concavity"]
        c_low = conc[2 * v] if v < len(VERTEBRAE) else 0.4
        c_up = conc[2 * v + 1] if v < len(VERTEBRAE) else 0.4
        irr = [0.0, 0.0]
        ost = [0.0, 0.0]
        modic = 0
        if v < len(DISCS):  # disc below this body
            lv = levels[DISCS[v]]
            irr[0], ost[0] = lv["irregular_mm"], lv["osteophyte_mm"]
            modic = max(modic, lv["modic"])
        if 0 < v <= len(DISCS):  # disc above
            lv = levels[DISCS[v - 1]]
            irr[1], ost[1] = lv["irregular_mm"], lv["osteophyte_mm"]
        shrink = (q.point(0.4, 0.5), q.anterior_dir)
        outer = _body_outline(q, 0.0, c_low, c_up, (irr[0], irr[1]), rng, (ost[0], ost[1]))
        inner = _body_outline(q, 1.3 if not sacral else 1.0, c_low, c_up, (irr[0], irr[1]), rng)
        structs.append(Structure(f"cortex_{vname}", "cortex", [outer], lateral=(0, w_lat), shrink=shrink))
        structs.append(Structure(f"body_{vname}", "marrow", [inner], lateral=(0, w_lat), shrink=shrink))
        # Modic change bands next to degenerated endplates
        for side, dname in ((0, DISCS[v] if v < len(DISCS) else None), (1, DISCS[v - 1] if 0 < v <= len(DISCS) else None)):
            if dname is None or levels[dname]["modic"] == 0:
                continue
            band_h = levels[dname]["modic_mm"]
            tt = np.linspace(0.08, 0.92, 10)
            t0 = 1.3 / q.height if side == 0 else 1 - 1.3 / q.height
            t1 = t0 + (band_h / q.height if side == 0 else -band_h / q.height)
            poly = np.vstack([q.point(tt, np.full(10, t0)), q.point(tt[::-1], np.full(10, t1))])
            kind = "modic1" if levels[dname]["modic"] == 1 else "modic2"
            structs.append(Structure(f"{kind}_{vname}_{side}", kind, [chaikin(poly, 2)], lateral=(0, w_lat * 0.8),
                                     shrink=shrink, blur_mm=1.2))
        if not sacral:
            bv = q.point(np.array([0.0, 0.12, 0.12, 0.0]), np.array([0.44, 0.47, 0.53, 0.56]))
            structs.append(Structure(f"basivertebral_{vname}", "fat", [bv], lateral=(0, 4.0), blur_mm=0.6))
        ann[f"body_{vname}"] = outer
    # annotation masks for SS (bony canal at a disc level) and spondylolisthesis (segment)
    for dname in DISCS:
        ks = [k for k, (nm, t) in enumerate(tags) if nm == dname]
        k0 = max(0, ks[0] - 2)
        k1 = min(K - 1, ks[-1] + 2)
        ann[f"canal_{dname}"] = _band(M[k0:k1 + 1] + PD[k0:k1 + 1] * 0.3, bony_post[k0:k1 + 1])
    for i, vname in enumerate(VERTEBRAE):
        # the slip zone: lower third of the slipped body, the disc, upper third of the one below
        above, below = bodies[vname], bodies[order[i + 1]]
        s_grid = np.linspace(0.0, 1.0, 6)
        pts = np.vstack([
            above.point(s_grid, np.full(6, 0.33)), above.point(s_grid, np.zeros(6)),
            ann[f"disc_{DISCS[i]}"],
            below.point(s_grid, np.ones(6)), below.point(s_grid, np.full(6, 0.67)),
        ])
        ann[f"segment_{vname}"] = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    return Anatomy(bodies, discs, structs, ann, float(np.median(skin[:, 0])))


def _place(subject: Subject, bodies: dict[str, Quad], discs: dict[str, Quad]) -> None:
    """Translate the column (in place) so its top and bottom fall where the field demands.

    With ``top_visible`` the T11-T12 disc lies fully inside the field ``top_margin`` mm
    below the top edge; otherwise it is cut by the top edge while T12-L1 stays inside.
    The field (pixel spacing) grows where the column would not fit.
    """
    def ext(q: Quad) -> tuple[float, float]:
        vs = np.array([q.p_low[1], q.a_low[1], q.p_up[1], q.a_up[1]])
        return float(vs.min()), float(vs.max())

    top_disc = ext(discs["T11-T12"])
    l5s1 = ext(discs["L5-S1"])
    s3 = ext(bodies["S3"])
    margin = 6.0
    if subject.top_visible:
        dv = subject.top_margin + 3.0 - top_disc[0]
    else:
        # cut through the middle of T11-T12 or just above T12-L1: never fully inside
        t12l1 = ext(discs["T12-L1"])
        lo = max(top_disc[0] + 1.0, t12l1[0] - 22.0)
        hi = min(top_disc[1] - 0.5, t12l1[0] - 8.0)
        cut = lo + (hi - lo) * (subject.top_margin - 2.0) / 12.0 if hi > lo else 0.5 * (top_disc[0] + top_disc[1])
        dv = -cut
    need = max(l5s1[1], s3[0]) + dv + margin
    if need > subject.fov_v:
        subject.spacing_row = need / subject.matrix
    u_shift = subject.column_u * subject.fov_u - float(bodies["L3"].point(0.5, 0.5)[0])
    shift = np.array([u_shift, dv])
    for coll in (bodies, discs):
        for name, q in list(coll.items()):
            coll[name] = Quad(q.p_low + shift, q.a_low + shift, q.p_up + shift, q.a_up + shift)


def _bowel(structs: list[Structure], bodies: dict[str, Quad], rng: np.random.Generator, subject: Subject) -> None:
    """Bowel loops: walls with fluid (bright on T2) or gas/faeces content."""
    fov = subject.fov_v
    l3 = bodies["L3"]
    s2 = bodies["S2"]
    ant_u = min(float(bodies[v].point(1.0, 0.5)[0]) for v in ("L2", "L3", "L4", "L5"))
    n = int(rng.integers(6, 13))
    for j in range(n):
        pelvic = j < n // 2
        if pelvic:
            cu = float(rng.uniform(max(5.0, ant_u - 70), float(s2.point(1.0, 0.5)[0]) - 8))
            cv = float(rng.uniform(float(bodies["S1"].point(1.0, 0.0)[1]), fov + 10))
        else:
            cu = float(rng.uniform(-10.0, ant_u - 22))
            cv = float(rng.uniform(float(l3.point(0.5, 1.0)[1]) - 60, fov))
        r1, r2 = rng.uniform(7, 18, 2)
        ang = rng.uniform(0, np.pi)
        a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        wob = 1 + 0.12 * np.sin(3 * a + rng.uniform(0, 6))
        pts = np.stack([r1 * np.cos(a) * wob, r2 * np.sin(a) * wob], 1)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        pts = pts @ rot.T + [cu, cv]
        lat_c = float(rng.uniform(-40, 40))
        lat_w = float(rng.uniform(10, 25))
        structs.append(Structure(f"bowel_wall_{j}", "bowel_wall", [pts], lateral=(0.0, lat_w), lateral_centre=lat_c))
        content = "bowel_fluid" if rng.random() < 0.45 else ("bowel_gas" if rng.random() < 0.4 else "bowel_faeces")
        inner = (pts - [cu, cv]) * 0.78 + [cu, cv]
        structs.append(Structure(f"bowel_{j}", content, [inner], lateral=(0.0, lat_w * 0.8),
                                 lateral_centre=lat_c, blur_mm=0.8))
