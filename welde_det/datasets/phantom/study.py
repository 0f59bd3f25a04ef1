"""One synthetic lumbar study: :func:`generate_study` and the :class:`Study` it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cv2
import numpy as np

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.phantom.anatomy import (
    DISCS,
    Anatomy,
    Subject,
    build_anatomy,
    sample_subject,
)
from welde_det.datasets.phantom.findings import (
    Findings,
    resolve_frequencies,
    sample_findings,
    solve_plan,
    top_visible,
)
from welde_det.datasets.phantom.render import (
    CONTRASTS,
    Acquisition,
    acquire,
    composite_slices,
    make_textures,
    sample_acquisition,
    tissue_values,
)

__all__ = ["Series", "Study", "generate_study"]

_FIRST = ("Alex", "Maria", "John", "Eva", "Peter", "Anna", "Lukas", "Sofia", "David", "Julia", "Tom",
          "Laura", "Jan", "Nina", "Marco", "Clara", "Omar", "Lea", "Ivan", "Mia")
_LAST = ("Smith", "Muller", "Rossi", "Novak", "Garcia", "Kowalski", "Jensen", "Dubois", "Silva", "Meyer",
         "Horvat", "Schmidt", "Brown", "Wagner", "Costa", "Nielsen", "Fischer", "Lopez", "Weber", "Moreau")


@dataclass
class Series:
    """One MR series of a study.

    Attributes:
        contrast: ``"t1"`` or ``"t2"``.
        volume: stored 16-bit slices, or ``None`` when only the mid slice was rendered.
        mid_slice: the mid-sagittal slice (superior up, anterior left).
        mid_index: index of ``mid_slice`` in ``volume``.
        affine: RAS affine of voxel index ``(slice, row, col)`` (millimetres).
        acquisition: acquisition parameters.

    Shape:
        ``volume``: ``(S, H, W)``; ``mid_slice``: ``(H, W)``.
    """

    contrast: str
    volume: np.ndarray | None
    mid_slice: np.ndarray
    mid_index: int
    affine: np.ndarray
    acquisition: Acquisition


@dataclass
class Study:
    """A synthetic lumbar study and its mid-sagittal ground truth.

    Attributes:
        study_id: identifier used in file names.
        seed: generator seed (same seed, same study).
        difficulty: finding difficulty in [0, 1].
        boxes: boxes on the mid-sagittal slice, ``x0 y0 x1 y1`` in pixels (pixel ``i``
            spans ``[i, i+1)``).
        labels: class index per box in :data:`~welde_det.classes.LUMBAR_CLASSES` order.
        structures: per box, the name of the structure that produced it (key of
            :attr:`polygons` / :attr:`masks`).
        polygons: outlines (pixels, mid-sagittal slice) of every structure that can carry
            a box: ``disc_<level>``, ``body_<vertebra>``, ``canal_<level>`` (bony canal at
            a disc level) and ``segment_<vertebra>`` (the slip zone under a vertebra: the lower
            third of its body, the disc below and the upper third of the next body).
        series: per contrast, the rendered series (empty when ``render=False``).
        subject: subject and acquisition geometry.
        findings: per-level findings.
        patient: patient-like metadata (name, ID, dates) written into the DICOM headers.

    Shape:
        ``boxes``: ``(K, 4)`` float64; ``labels``: ``(K,)`` int64.
    """

    study_id: str
    seed: int
    difficulty: float
    boxes: np.ndarray
    labels: np.ndarray
    structures: list[str]
    polygons: dict[str, np.ndarray]
    series: dict[str, Series]
    subject: Subject
    findings: Findings
    patient: dict[str, Any]
    image_size: tuple[int, int] = (384, 384)
    _first: str | None = field(default=None, repr=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return LUMBAR_CLASSES

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """In-plane pixel spacing (mm) as (row, column), as DICOM PixelSpacing."""
        return self.subject.pixel_spacing

    def _only(self) -> Series:
        if not self.series:
            raise ValueError(f"study {self.study_id} was generated with render=False: it has no images")
        return self.series[self._first or next(iter(self.series))]

    @property
    def volume(self) -> np.ndarray | None:
        """Volume of the first contrast (``(S, H, W)`` uint16)."""
        return self._only().volume

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the first contrast's voxel index ``(slice, row, col)``."""
        return self._only().affine

    @property
    def mid_slice(self) -> np.ndarray:
        """Mid-sagittal slice of the first contrast (``(H, W)`` uint16)."""
        return self._only().mid_slice

    @cached_property
    def masks(self) -> dict[str, np.ndarray]:
        """Boolean mid-sagittal mask of every annotatable structure (rasterised on first use)."""
        h, w = self.image_size
        out = {}
        for name, poly in self.polygons.items():
            canvas = np.zeros((h, w), np.uint8)
            pts = np.round((poly - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
            out[name] = canvas.astype(bool)
        return out

    def box_masks(self) -> list[np.ndarray]:
        """The mask of the structure behind each box, in box order."""
        return [self.masks[s] for s in self.structures]


def _patient(rng: np.random.Generator, age: int) -> dict[str, Any]:
    year = int(rng.integers(2012, 2025))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    birth_year = year - age
    return {
        "PatientName": f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}",
        "PatientID": f"PID{int(rng.integers(10**7, 10**8))}",
        "PatientBirthDate": f"{birth_year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "PatientAge": f"{age:03d}Y",
        "PatientWeight": round(float(rng.uniform(50, 110)), 1),
        "StudyDate": f"{year:04d}{month:02d}{day:02d}",
        "StudyTime": f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "AccessionNumber": f"ACC{int(rng.integers(10**6, 10**7))}",
        "ReferringPhysicianName": f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}^^Dr",
        "InstitutionName": "St. Phantom General Hospital",
        "InstitutionAddress": f"{int(rng.integers(1, 200))} Synthetic Road, Phantomville",
        "OperatorsName": f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "field_strength": 1.5 if rng.random() < 0.6 else 3.0,
        "table_z": float(rng.uniform(-60.0, 60.0)),
    }


def _affine(subject: Subject, table_z: float) -> np.ndarray:
    """RAS affine of index (slice, row, col): rows go inferior, columns posterior, slices left."""
    pr, pc = subject.pixel_spacing
    offsets = subject.slice_offsets()
    # LPS: x = left (slice), y = posterior (column), z = superior (minus row)
    lps0 = np.array([offsets[0], pc / 2 - subject.fov_u / 2, subject.fov_v / 2 - pr / 2 + table_z])
    lps_cols = np.array([[subject.slice_spacing, 0, 0], [0, 0, -pr], [0, pc, 0]]).T
    flip = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = flip @ lps_cols
    aff[:3, 3] = flip @ lps0
    return aff


def _boxes(anatomy: Anatomy, findings: Findings, subject: Subject) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    pr, pc = subject.pixel_spacing
    p = np.array([pc, pr])
    n = subject.matrix
    polys_px = {k: v / p for k, v in anatomy.annotation_polys.items()}
    boxes, labels, structs = [], [], []

    def add(name: str, label: str, pad_mm: float) -> None:
        poly = polys_px[name]
        x0, y0 = poly.min(0) - pad_mm / p
        x1, y1 = poly.max(0) + pad_mm / p
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(n), x1), min(float(n), y1)
        boxes.append([x0, y0, x1, y1])
        labels.append(LUMBAR_CLASSES.index(label))
        structs.append(name)

    for level in DISCS:
        if level in findings.disc_labels:
            add(f"disc_{level}", findings.disc_labels[level], 0.6)
    for level in findings.ss_levels:
        add(f"canal_{level}", "SS", 0.5)
    if findings.spondy is not None:
        add(f"segment_{findings.spondy}", "Spondylolisthesis", 0.5)
    return (np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64), structs, polys_px)


def generate_study(
    seed: int,
    *,
    difficulty: float = 0.5,
    contrast: str = "t2",
    class_frequencies: Any = None,
    render: bool = True,
    volume: bool = True,
    matrix: int = 384,
    study_id: str | None = None,
) -> Study:
    """Generate one synthetic lumbar sagittal study.

    Args:
        seed: non-negative integer; the same seed (and arguments) gives the same study.
            Consecutive seeds stratify the finding draws (see
            :mod:`~welde_det.datasets.phantom.findings`).
        difficulty: 0 = clear-cut findings, 1 = rare findings close to their common
            look-alikes.
        contrast: ``"t1"``, ``"t2"`` or ``"both"`` (one anatomy, two series).
        class_frequencies: per-box class frequencies (mapping or six weights in
            ``LUMBAR_CLASSES`` order); ``None`` = the public set's.
        render: ``False`` skips image formation (labels, boxes and masks only; fast).
        volume: ``False`` renders only the mid-sagittal slice.
        matrix: image rows and columns.
        study_id: name for files; default ``"phantom-<seed>"``.

    Returns:
        The :class:`Study`.

    Example:
        >>> s = generate_study(3, contrast="both")  # doctest: +SKIP
        >>> s.series["t2"].volume.shape, s.boxes.shape  # doctest: +SKIP
        ((13, 384, 384), (9, 4))
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    if contrast not in ("t1", "t2", "both"):
        raise ValueError(f"contrast must be 't1', 't2' or 'both', got {contrast!r}")
    if not (isinstance(matrix, (int, np.integer)) and 128 <= matrix <= 1024):
        raise ValueError(f"matrix must be an integer in [128, 1024], got {matrix!r}")
    seed = int(seed)
    plan = solve_plan(resolve_frequencies(class_frequencies))
    streams = np.random.SeedSequence([seed, 0x51EE7]).spawn(4)
    geo = np.random.default_rng(streams[0])
    subject = sample_subject(geo, top_visible(seed, plan), matrix=int(matrix))
    findings = sample_findings(seed, geo, subject, plan, float(difficulty))
    anatomy = build_anatomy(subject, findings.levels, geo, draw=render)
    boxes, labels, structs, polys = _boxes(anatomy, findings, subject)
    patient = _patient(np.random.default_rng(streams[1]), subject.age)
    series: dict[str, Series] = {}
    contrasts = CONTRASTS if contrast == "both" else (contrast,)
    if render:
        rrng = np.random.default_rng(streams[2])
        offsets = subject.slice_offsets()
        mid = (subject.n_slices - 1) // 2
        values = tissue_values(rrng, subject.age)
        textures = make_textures(rrng, (matrix, matrix), subject.pixel_spacing)
        todo = offsets if volume else offsets[mid:mid + 1]
        signal = composite_slices(anatomy, subject, todo, values, textures)
        sat = bool(rrng.random() < 0.75)
        aff = _affine(subject, patient["table_z"])
        for ci, name in enumerate(CONTRASTS):
            if name not in contrasts:
                continue
            nrng = np.random.default_rng(streams[3].spawn(2)[ci])
            acq = sample_acquisition(nrng, name, anatomy, subject, sat)
            vol = acquire(signal[:, ci], acq, subject, anatomy, nrng)
            if volume:
                series[name] = Series(name, vol, vol[mid], mid, aff, acq)
            else:
                series[name] = Series(name, None, vol[0], mid, aff, acq)
    return Study(
        study_id=study_id or f"phantom-{seed}",
        seed=seed,
        difficulty=float(difficulty),
        boxes=boxes,
        labels=labels,
        structures=structs,
        polygons=polys,
        series=series,
        subject=subject,
        findings=findings,
        patient=patient,
        image_size=(int(matrix), int(matrix)),
        _first=contrasts[0] if render else None,
    )

