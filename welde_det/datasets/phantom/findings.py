"""Findings of the lumbar phantom: which level carries which class, and how it looks.

Two halves:

* :func:`solve_plan` turns target class frequencies (per box, in
  :data:`~welde_det.classes.LUMBAR_CLASSES` order) into per-level probabilities. An image
  carries one disc box at each of T12-L1 .. L5-S1 and at T11-T12 when that disc lies
  fully inside the field (probability ``P_TOP``), an SS box at each stenotic lumbar level
  and at most one Spondylolisthesis box. With ``D = 6 + P_TOP`` disc boxes per image and
  ``f_disc`` the disc classes' share, an image carries ``N = D / f_disc`` boxes on
  average, so class ``c`` needs ``f_c * N`` expected boxes per image; these are spread
  over the levels where the class occurs (TDB at the two thoracic levels only, LDB and SS
  at lumbar levels, weighted towards L4-L5 / L5-S1) by water-filling under a per-level
  cap, so expected frequencies equal the targets exactly.
* :func:`sample_findings` draws one study. The level assignments use a Kronecker
  (Weyl) sequence indexed by the study seed, so consecutive seeds stratify the draws and
  a dataset of ``n`` studies hits the target frequencies to within a few boxes, not
  ``sqrt(n)``. Severities use the study's random generator and move with ``difficulty``
  from clear-cut (0) to the look-alike zone of the common classes (1): mild bulge vs
  normal, mild desiccation vs an ageing normal disc, a 2-3 mm slip vs alignment noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from welde_det.classes import LUMBAR_CLASSES, LUMBAR_COUNTS
from welde_det.datasets.phantom.anatomy import (
    BOXED_DISCS,
    DISCS,
    LUMBAR_DISCS,
    THORACIC_DISCS,
    VERTEBRAE,
    Subject,
)
from welde_det.errors import UserError

__all__ = [
    "DEFAULT_FREQUENCIES",
    "P_TOP",
    "FindingPlan",
    "Findings",
    "PhantomError",
    "resolve_frequencies",
    "sample_findings",
    "solve_plan",
]


class PhantomError(UserError):
    """Phantom options that cannot be generated (the option and what is allowed named)."""


#: Probability that the T11-T12 disc lies fully inside the field (and is boxed).
P_TOP = 0.69
#: The public six-class set's per-box class frequencies.
DEFAULT_FREQUENCIES: tuple[float, ...] = tuple(c / sum(LUMBAR_COUNTS) for c in LUMBAR_COUNTS)

_DISC_CLASSES = ("Normal_IVD", "LDB", "DDD", "TDB")
_CAP = 0.97
# Relative prevalence per level (top to bottom of BOXED_DISCS / LUMBAR_DISCS).
_W_LDB = {"L1-L2": 0.5, "L2-L3": 0.75, "L3-L4": 1.0, "L4-L5": 1.4, "L5-S1": 1.3}
_W_DDD = {"T11-T12": 0.25, "T12-L1": 0.3, "L1-L2": 0.45, "L2-L3": 0.65, "L3-L4": 0.9,
          "L4-L5": 1.4, "L5-S1": 1.6}
_W_SS = {"L1-L2": 0.5, "L2-L3": 0.8, "L3-L4": 1.1, "L4-L5": 1.4, "L5-S1": 1.1}
_SPONDY_LEVELS = (("L3", 0.15), ("L4", 0.5), ("L5", 0.35))


def resolve_frequencies(class_frequencies: Mapping[str, float] | Sequence[float] | None) -> tuple[float, ...]:
    """Normalise user frequencies to a tuple in ``LUMBAR_CLASSES`` order.

    Args:
        class_frequencies: ``None`` (the public set's), a mapping name -> weight (missing
            names get 0), or six weights in class order. Weights need not sum to 1.

    Raises:
        ValueError: unknown names, wrong length, negative or all-zero weights.
    """
    if class_frequencies is None:
        return DEFAULT_FREQUENCIES
    if isinstance(class_frequencies, Mapping):
        unknown = sorted(set(class_frequencies) - set(LUMBAR_CLASSES))
        if unknown:
            raise PhantomError(f"class_frequencies has unknown classes {unknown}; allowed: {list(LUMBAR_CLASSES)}")
        w = [float(class_frequencies.get(n, 0.0)) for n in LUMBAR_CLASSES]
    else:
        w = [float(x) for x in class_frequencies]
        if len(w) != len(LUMBAR_CLASSES):
            raise PhantomError(
                f"class_frequencies has {len(w)} values; need {len(LUMBAR_CLASSES)} in the order {list(LUMBAR_CLASSES)}"
            )
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise PhantomError(f"class_frequencies must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return tuple(x / total for x in w)


@dataclass(frozen=True)
class FindingPlan:
    """Per-level probabilities that realise target class frequencies in expectation.

    Attributes:
        frequencies: target per-box frequencies in ``LUMBAR_CLASSES`` order.
        p_top: probability that T11-T12 is boxed.
        disc_probs: per boxed disc level, probabilities of (Normal_IVD, LDB, DDD, TDB).
        ss_probs: per lumbar level, probability of an SS box.
        spondy_probs: per slipped vertebra (L3, L4, L5), probability of a Spondylolisthesis box.
        boxes_per_image: expected boxes per image.
    """

    frequencies: tuple[float, ...]
    p_top: float
    disc_probs: dict[str, tuple[float, float, float, float]]
    ss_probs: dict[str, float]
    spondy_probs: dict[str, float]
    boxes_per_image: float

    def expected_counts(self) -> np.ndarray:
        """Expected boxes per image per class (``LUMBAR_CLASSES`` order)."""
        out = dict.fromkeys(LUMBAR_CLASSES, 0.0)
        for level, probs in self.disc_probs.items():
            pres = self.p_top if level == "T11-T12" else 1.0
            for name, p in zip(_DISC_CLASSES, probs):
                out[name] += pres * p
        out["SS"] = sum(self.ss_probs.values())
        out["Spondylolisthesis"] = sum(self.spondy_probs.values())
        return np.array([out[n] for n in LUMBAR_CLASSES])


def _allocate(total: float, weights: dict[str, float], presence: dict[str, float],
              capacity: dict[str, float], name: str) -> dict[str, float]:
    """Probabilities ``min(cap_l, lam * w_l)`` with ``sum_l presence_l * p_l = total``."""
    if total <= 0:
        return dict.fromkeys(weights, 0.0)
    reach = sum(presence[k] * capacity[k] for k in weights)
    if reach < total - 1e-9:
        raise PhantomError(
            f"class frequencies are not reachable: {name} needs {total:.3f} boxes per image but its levels "
            f"{list(weights)} can hold at most {reach:.3f}; lower its frequency or raise the disc classes'"
        )
    lo, hi = 0.0, 1.0
    while sum(presence[k] * min(capacity[k], hi * w) for k, w in weights.items()) < total:
        hi *= 2
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if sum(presence[k] * min(capacity[k], mid * w) for k, w in weights.items()) < total:
            lo = mid
        else:
            hi = mid
    return {k: min(capacity[k], hi * w) for k, w in weights.items()}


@lru_cache(maxsize=64)
def solve_plan(frequencies: tuple[float, ...] = DEFAULT_FREQUENCIES) -> FindingPlan:
    """Solve per-level probabilities for per-box ``frequencies`` (see the module docstring).

    Raises:
        ValueError: frequencies that no per-level assignment can reach (e.g. more SS
            boxes per image than there are lumbar levels).
    """
    f = dict(zip(LUMBAR_CLASSES, frequencies))
    f_disc = sum(f[n] for n in _DISC_CLASSES)
    if f_disc <= 0:
        raise PhantomError("class frequencies need some disc classes (Normal_IVD, LDB, DDD or TDB): every image has discs")
    n_img = (6 + P_TOP) / f_disc
    need = {n: f[n] * n_img for n in LUMBAR_CLASSES}
    presence = {lv: (P_TOP if lv == "T11-T12" else 1.0) for lv in BOXED_DISCS}
    cap = dict.fromkeys(BOXED_DISCS, _CAP)
    p_tdb = _allocate(need["TDB"], dict.fromkeys(THORACIC_DISCS, 1.0), presence, cap, "TDB")
    for k, p in p_tdb.items():
        cap[k] -= p
    p_ldb = _allocate(need["LDB"], _W_LDB, presence, cap, "LDB")
    for k, p in p_ldb.items():
        cap[k] -= p
    p_ddd = _allocate(need["DDD"], _W_DDD, presence, cap, "DDD")
    disc_probs = {}
    for lv in BOXED_DISCS:
        t, ld, dd = p_tdb.get(lv, 0.0), p_ldb.get(lv, 0.0), p_ddd.get(lv, 0.0)
        disc_probs[lv] = (max(0.0, 1.0 - t - ld - dd), ld, dd, t)
    ss = _allocate(need["SS"], _W_SS, dict.fromkeys(LUMBAR_DISCS, 1.0), dict.fromkeys(LUMBAR_DISCS, _CAP), "SS")
    if need["Spondylolisthesis"] > _CAP:
        raise PhantomError(
            f"class frequencies are not reachable: Spondylolisthesis needs {need['Spondylolisthesis']:.3f} boxes "
            f"per image but an image carries at most {_CAP}"
        )
    spondy = {v: need["Spondylolisthesis"] * w for v, w in _SPONDY_LEVELS}
    return FindingPlan(tuple(frequencies), P_TOP, disc_probs, ss, spondy, n_img)


# ---------------------------------------------------------------------------- sampling

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)


def weyl(seed: int, dim: int) -> float:
    """``frac(c_d + seed * alpha_d)``, alpha_d = frac(sqrt(p_d)): a Kronecker sequence in ``seed``."""
    alpha = math.sqrt(_PRIMES[dim]) % 1.0
    offset = (0.5 + 0.6180339887498949 * dim) % 1.0
    return (offset + (seed % (1 << 40)) * alpha) % 1.0


def _range(rng: np.random.Generator, d: float, easy: tuple[float, float], hard: tuple[float, float]) -> float:
    lo = easy[0] + (hard[0] - easy[0]) * d
    hi = easy[1] + (hard[1] - easy[1]) * d
    return float(rng.uniform(lo, hi))


@dataclass
class Findings:
    """One study's findings.

    Attributes:
        disc_labels: class name per boxed disc level present in the field.
        ss_levels: lumbar levels with an SS box.
        spondy: slipped vertebra (``"L3"``..``"L5"``) or ``None``.
        levels: per disc level (all of :data:`DISCS`) the geometry/appearance parameters
            consumed by :func:`~welde_det.datasets.phantom.anatomy.build_anatomy`.
        top_visible: whether T11-T12 is inside the field.
    """

    disc_labels: dict[str, str]
    ss_levels: list[str]
    spondy: str | None
    levels: dict[str, dict]
    top_visible: bool


def top_visible(seed: int, plan: FindingPlan) -> bool:
    """Whether T11-T12 lies inside the field for this seed (the first Weyl dimension)."""
    return weyl(seed, 0) < plan.p_top


def sample_findings(seed: int, rng: np.random.Generator, subject: Subject, plan: FindingPlan,
                    difficulty: float) -> Findings:
    """Draw labels (stratified by ``seed``) and severities (from ``rng``) for one study."""
    d = float(difficulty)
    vis = subject.top_visible
    labels: dict[str, str] = {}
    for j, lv in enumerate(BOXED_DISCS):
        if lv == "T11-T12" and not vis:
            continue
        u = weyl(seed, 1 + j)
        probs = plan.disc_probs[lv]
        acc = 0.0
        chosen = "Normal_IVD"
        for name, p in zip(_DISC_CLASSES, probs):
            acc += p
            if u < acc:
                chosen = name
                break
        labels[lv] = chosen
    ss = [lv for j, lv in enumerate(LUMBAR_DISCS) if weyl(seed, 8 + j) < plan.ss_probs[lv]]
    u = weyl(seed, 13)
    spondy = None
    acc = 0.0
    for v, p in plan.spondy_probs.items():
        acc += p
        if u < acc:
            spondy = v
            break
    old = subject.age > 55
    levels: dict[str, dict] = {}
    for lv in DISCS:
        label = labels.get(lv, "Normal_IVD")
        par = {
            "label": label,
            "bulge_mm": float(rng.uniform(0.0, 0.5 + 0.7 * d)),
            "nucleus_t2": float(rng.uniform(0.82 - 0.17 * d, 1.05)) * (0.92 if old else 1.0),
            "height_factor": float(rng.uniform(0.93 - 0.06 * d, 1.06)),
            "irregular_mm": 0.0,
            "osteophyte_mm": float(rng.uniform(0.0, 0.6 * d)) if old else 0.0,
            "modic": 0,
            "modic_mm": 0.0,
            "flavum_extra_mm": float(rng.uniform(0.0, 0.6 + 0.8 * d)),
            "slip_mm": float(rng.uniform(-1.0, 1.0) * (0.3 + 0.8 * d)),
            "cleft": bool(subject.age > 28 and rng.random() < 0.75),
        }
        thoracic = lv in DISCS[:3]
        if label in ("LDB", "TDB"):
            scale = 0.8 if label == "TDB" else 1.0
            par["bulge_mm"] = scale * _range(rng, d, (3.2, 6.0), (0.9, 1.9))
            par["nucleus_t2"] = float(rng.uniform(0.6, 0.98))
            par["height_factor"] = float(rng.uniform(0.85, 1.02))
        elif label == "DDD":
            par["nucleus_t2"] = _range(rng, d, (0.1, 0.28), (0.55, 0.78))
            par["height_factor"] = _range(rng, d, (0.42, 0.62), (0.78, 0.92))
            par["irregular_mm"] = _range(rng, d, (0.8, 1.8), (0.0, 0.35))
            par["osteophyte_mm"] = _range(rng, d, (1.5, 3.5), (0.0, 1.0))
            par["bulge_mm"] = float(rng.uniform(0.3, 1.6))
            par["cleft"] = False
            if rng.random() < 0.75 - 0.7 * d:
                par["modic"] = int(rng.integers(1, 3))
                par["modic_mm"] = float(rng.uniform(3.0, 7.0))
        if thoracic:
            par["bulge_mm"] *= 0.85
        levels[lv] = par
    for lv in ss:
        i = DISCS.index(lv)
        par = levels[lv]
        rho = _range(rng, d, (0.22, 0.42), (0.6, 0.76))
        base = subject.canal_depth - 1.3 - float(subject.jitter["flavum"][i]) - 1.6
        current = subject.canal_depth - max(1.3, par["bulge_mm"] + 0.4) - float(subject.jitter["flavum"][i]) - 1.6
        par["flavum_extra_mm"] = max(0.0, current - rho * base)
    if spondy is not None:
        disc = DISCS[VERTEBRAE.index(spondy)]
        frac = _range(rng, d, (0.18, 0.32), (0.05, 0.1))
        levels[disc]["slip_mm"] = frac * 36.0 * subject.scale
    return Findings(labels, ss, spondy, levels, vis)

