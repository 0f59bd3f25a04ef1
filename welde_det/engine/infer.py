"""Inference on MRI slices: a detector abstraction, input discovery, overlays and JSON.

- :class:`~welde_det.integrations.base.Detector` is the small interface every framework
  implements; :func:`load_detector` (:mod:`welde_det.integrations.registry`) reads a
  checkpoint safely and builds the detector its ``framework`` names.
- :func:`collect_inputs` / :func:`read_input` turn a source (DICOM folder or file, NIfTI,
  PNG/JPEG, or a folder of them) into windowed mid-sagittal slices.
- :func:`run_inference` reads and validates **every** input first, then predicts, then
  writes one overlay PNG and one JSON per input (atomically), so a bad input never leaves
  a half-written output folder.

No identifiers in the outputs: each input's files are named by a keyed pseudonym (the
converter's de-identification key: ``key``, ``key_file``, ``$WELDE_DEID_KEY`` or the user's
key file, :func:`welde_det.engine.convert.resolve_key`) — a DICOM series by its
pseudonymised series UID, any other input by the pseudonym of its path inside the source.
The JSON's ``source`` is that pseudonym, the checkpoint is recorded by file name and
SHA-256, the overlay's title shows the pseudonym, and the PNGs carry no text chunks. The
pseudonym → input mapping is written only on request (``keep_names``: ``names.csv``).

Coordinates: boxes are ``[x1, y1, x2, y2]`` in continuous pixel units of the slice as
displayed (superior up, anterior left; ``(0, 0)`` is the top-left corner of the first
pixel). :meth:`SagittalSlice.pixel_to_world` puts pixel *centres* at integers, so a box
corner ``(x, y)`` is at ``pixel_to_world(rows=y - 0.5, cols=x - 0.5)`` in RAS mm.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.checkpoint import CheckpointError
from welde_det.errors import UserError
from welde_det.integrations.base import Detector, image_to_float
from welde_det.integrations.registry import load_detector
from welde_det.io import SagittalSlice, WeldeIOError, mid_sagittal, read_volume, window_image
from welde_det.io.deid import pseudonymise
from welde_det.io.image2d import is_image2d
from welde_det.io.nifti import is_nifti
from welde_det.utils.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from welde_det.utils.logging import progress_enabled

__all__ = [
    "NAMES_FILE",
    "Detector",
    "InferenceInput",
    "InferenceInputError",
    "InferenceSummary",
    "collect_inputs",
    "detection_record",
    "image_to_float",
    "load_detector",
    "output_name",
    "read_input",
    "run_inference",
]

logger = logging.getLogger(__name__)

#: the pseudonym -> input mapping, written only with ``keep_names``
NAMES_FILE = "names.csv"


class InferenceInputError(WeldeIOError):
    """An input that cannot be used as an MRI slice; the message names the file and what is expected."""


# --------------------------------------------------------------------------- inputs
@dataclass
class InferenceInput:
    """One input, read and reduced to the slice the detector sees.

    Attributes:
        source: the file or folder it came from.
        kind: ``"dicom"``, ``"nifti"`` or ``"image2d"``.
        image: the windowed slice (rows, cols), uint8 (volumes) or as stored (2D images).
        slice: the :class:`SagittalSlice` (geometry for pixel → world).
        window: ``{"center", "width"}`` used, or ``{"percentiles"}``; None for 2D images.
        provenance: reader provenance worth recording (no free-text DICOM fields).
    """

    source: Path
    kind: str
    image: np.ndarray
    slice: SagittalSlice
    window: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def collect_inputs(source: str | os.PathLike) -> list[Path]:
    """The inputs a source stands for, each a file or a DICOM series folder.

    - a file: itself (NIfTI, 2D image or DICOM);
    - a folder with no image/NIfTI files directly in it (and some files): one DICOM
      series (read recursively, the first usable sagittal series is taken);
    - otherwise each image, NIfTI file, DICOM file (``.dcm`` or the ``DICM`` marker) and
      sub-folder in it is one input (sub-folders are read as DICOM series); other files
      (README, licences) and hidden files are ignored, and logged.

    Raises:
        FileNotFoundError: the source does not exist.
        InferenceInputError: an empty folder.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file():
        return [src]
    children = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    files = [p for p in children if p.is_file()]
    if not children:
        raise InferenceInputError(f"{src}: the folder is empty; expected a DICOM series, NIfTI files or "
                                  "PNG/JPEG slices")
    if files and not any(is_image2d(p) or is_nifti(p) for p in files):
        return [src]
    inputs = [p for p in children
              if p.is_dir() or is_image2d(p) or is_nifti(p) or p.suffix.lower() == ".dcm" or _is_dicom_file(p)]
    ignored = [p.name for p in files if p not in inputs]
    if ignored:
        logger.info("%s: ignoring %d file(s) that are not images, NIfTI or DICOM: %s", src, len(ignored),
                    ", ".join(ignored[:10]) + (" …" if len(ignored) > 10 else ""))
    return inputs


def _kind(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    if is_nifti(path):
        return "nifti"
    if is_image2d(path):
        return "image2d"
    return "dicom"


_EXPECTED = {
    "dicom": "a DICOM MR series with a sagittal (or reducible) volume",
    "nifti": "a 3D (or 4D, first volume) NIfTI volume",
    "image2d": "a grey 2D slice (8- or 16-bit; RGB only with equal channels), at least 8 pixels a side",
}


def read_input(path: str | os.PathLike, *, series: Any = None, key: str | bytes | None = None) -> InferenceInput:
    """Read one input and return its windowed mid-sagittal slice.

    Volumes (DICOM, NIfTI) give their mid-sagittal slice (superior up, anterior left),
    windowed to uint8 with the DICOM window when the series has one, else the 0.5–99.5
    percentiles. 2D images are used as stored.

    Args:
        path: the input (see :func:`collect_inputs`).
        series: DICOM only: which series of a folder holding several (an index or the
            keyed hash the error listing shows; see :func:`welde_det.io.read_volume`).
        key: the de-identification key (pseudonymised series UID in the provenance, and the
            hashes of a several-series listing).

    Raises:
        InferenceInputError: unreadable file, colour image, too small, not reducible to one
            slice — the message names the file and what is expected.
    """
    path = Path(path)
    kind = _kind(path)
    try:
        volume = read_volume(path, series if kind == "dicom" else None, deid_key=key)
        sl = mid_sagittal(volume)
    except (WeldeIOError, OSError, ValueError) as exc:
        reason = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise InferenceInputError(f"{reason}; expected {_EXPECTED[kind]}") from exc
    image = np.asarray(sl.image)
    if image.ndim != 2 or min(image.shape) < 8:
        raise InferenceInputError(f"{path}: its slice has shape {image.shape}; expected {_EXPECTED[kind]}")
    prov = volume.provenance
    if kind == "image2d":
        if image.dtype not in (np.uint8, np.uint16):
            raise InferenceInputError(f"{path}: {image.dtype} pixels; expected {_EXPECTED[kind]}")
        window = None
        kept = {"format": "image2d", "bit_depth": prov.get("bit_depth"),
                "pixel_spacing_assumed": prov.get("pixel_spacing_assumed", True)}
    else:
        if sl.window is not None:
            window = {"center": float(sl.window[0]), "width": float(sl.window[1])}
            image = window_image(sl.image, center=window["center"], width=window["width"])
        else:
            window = {"percentiles": [0.5, 99.5]}
            image = window_image(sl.image, percentiles=(0.5, 99.5))
        kept = {k: prov.get(k) for k in ("format", "series_uid", "orientation", "modality", "volume_index",
                                          "num_series_found") if prov.get(k) is not None}
        kept["volume_shape"] = list(volume.shape)
    return InferenceInput(source=path, kind=kind, image=image, slice=sl, window=window, provenance=kept)


# --------------------------------------------------------------------------- records
def _corner_grid(bbox: Sequence[float]) -> dict[str, tuple[float, float]]:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return {"top_left": (x1, y1), "top_right": (x2, y1), "bottom_left": (x1, y2), "bottom_right": (x2, y2),
            "centre": ((x1 + x2) / 2, (y1 + y2) / 2)}


def detection_record(det: dict[str, Any], item: InferenceInput, tail: Sequence[str]) -> dict[str, Any]:
    """One detection for the JSON: pixel box and its corners/centre in world coordinates.

    Volumes give RAS mm via ``pixel_to_world(y - 0.5, x - 0.5)`` (pixel centres at
    integers); 2D images have no patient geometry, so their "world" is ``(x, y) ×``
    pixel spacing in mm from the image's top-left corner.
    """
    points = _corner_grid(det["bbox"])
    rec = {"bbox_xyxy": [float(v) for v in det["bbox"]], "score": float(det["score"]),
           "class_index": int(det["class_index"]), "class_name": str(det["class_name"]),
           "tail": det["class_name"] in set(tail)}
    if item.kind == "image2d":
        row_sp, col_sp = item.slice.pixel_spacing
        rec["world"] = {"frame": "image_mm", **{k: [x * col_sp, y * row_sp] for k, (x, y) in points.items()}}
    else:
        xy = np.array(list(points.values()))
        world = item.slice.pixel_to_world(xy[:, 1] - 0.5, xy[:, 0] - 0.5)
        rec["world"] = {"frame": "RAS_mm", **{k: [float(v) for v in w] for k, w in zip(points, world)}}
    return rec


def _input_record(item: InferenceInput, dets: list[dict[str, Any]], detector: Detector, conf: float,
                  name: str, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    sl = item.slice
    rows, cols = item.image.shape
    if item.kind == "image2d":
        slice_info = {"index": None, "axis": None, "world_x": None,
                      "pixel_spacing": [float(v) for v in sl.pixel_spacing],
                      "note": "2D image: no patient geometry; world = pixel × pixel spacing (mm) from the "
                              "top-left corner" + (", spacing assumed 1 mm" if item.provenance.get(
                                  "pixel_spacing_assumed", True) else "")}
    else:
        slice_info = {"index": sl.index, "axis": sl.axis, "world_x": sl.world_x,
                      "pixel_spacing": [float(v) for v in sl.pixel_spacing], "row_axis": sl.row_axis,
                      "col_axis": sl.col_axis, "flip_rows": sl.flip_rows, "flip_cols": sl.flip_cols,
                      "affine": np.asarray(sl.affine).tolist(), "display": "superior up, anterior left"}
    return {
        "source": name,
        "kind": item.kind,
        "slice": slice_info,
        "window": item.window,
        "image_size": {"height": rows, "width": cols},
        "image_dtype": str(item.image.dtype),
        "provenance": item.provenance,
        "checkpoint": checkpoint,
        "framework": detector.framework,
        "class_names": list(detector.names),
        "tail_classes": list(detector.tail),
        "conf": float(conf),
        "coordinates": "bbox_xyxy in continuous pixels of the slice as shown (0,0 = top-left corner of the "
                       "first pixel); world corners of volumes are RAS mm from SagittalSlice.pixel_to_world("
                       "y - 0.5, x - 0.5)",
        "overlay": f"{name}.png",
        "num_detections": len(dets),
        "detections": [detection_record(d, item, detector.tail) for d in dets],
    }


def _relative_input(path: Path, source: Path) -> str:
    """The input's path inside the source (POSIX), or its own name when the source is the input."""
    try:
        rel = path.relative_to(source)
    except ValueError:
        rel = Path(path.name)
    return rel.as_posix() if str(rel) not in ("", ".") else path.name


def output_name(item: InferenceInput, source: Path, key: str | bytes) -> str:
    """The keyed pseudonym naming an input's outputs.

    A DICOM series is named by its pseudonymised series UID (the same input gives the same
    name in every run under the same key); any other input by the pseudonym of its path
    inside the source. Nothing of the input's name or folder survives.
    """
    uid = item.provenance.get("series_uid")
    if item.kind == "dicom" and uid:
        return str(uid)
    return pseudonymise(f"input:{_relative_input(item.source, source)}", key)


def _output_names(items: Sequence[InferenceInput], source: Path, key: str | bytes) -> list[str]:
    """Pseudonyms per input, made unique with ``-2``, ``-3``… suffixes (one series given twice)."""
    used: set[str] = set()
    names = []
    for item in items:
        base = output_name(item, source, key)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names.append(name)
    return names


def _checkpoint_record(weights: Any) -> dict[str, Any] | None:
    """The checkpoint by file name and SHA-256 (never its folder: a path can name a patient or a user)."""
    if weights is None or not Path(weights).is_file():
        return None
    digest = hashlib.sha256()
    with Path(weights).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"file": Path(weights).name, "sha256": digest.hexdigest()}


def _names_csv(names: Sequence[str], items: Sequence[InferenceInput], source: Path) -> str:
    import csv
    import io

    base = source.parent
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "input"])
    for name, item in zip(names, items):
        writer.writerow([name, _relative_input(item.source, base)])
    return buf.getvalue()


# --------------------------------------------------------------------------- runner
@dataclass
class InferenceSummary:
    """What :func:`run_inference` did.

    Attributes:
        out_dir: the output folder.
        outputs: (overlay PNG, JSON) per input written.
        num_detections: detections over all inputs.
        skipped: (input, reason) of bad inputs left out with ``skip_bad``.
    """

    out_dir: Path
    outputs: list[tuple[Path, Path]] = field(default_factory=list)
    num_detections: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        """Inputs written."""
        return len(self.outputs)

    def line(self) -> str:
        """The one-line summary the command line prints."""
        skipped = f", {len(self.skipped)} bad input(s) skipped" if self.skipped else ""
        return (f"{self.num_inputs} input(s), {self.num_detections} detection(s){skipped}; "
                f"overlays and JSON in {self.out_dir}")


def run_inference(
    weights: str | os.PathLike | Detector,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    conf: float = 0.25,
    device: str | None = None,
    expected_names: Sequence[str] | None = None,
    skip_bad: bool = False,
    progress: bool | None = None,
    batch: int = 16,
    series: Any = None,
    key: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    keep_names: bool = False,
) -> InferenceSummary:
    """Detect on every input of ``source``; write ``<name>.png`` (overlay) and ``<name>.json`` to ``out``.

    ``<name>`` is a keyed pseudonym (:func:`output_name`), never the input's name. Order:
    load the detector, read and validate all inputs, predict, then write — a bad input (or
    a wrong checkpoint) fails before anything is written.

    Args:
        weights: a checkpoint path (see :func:`load_detector`) or a ready :class:`Detector`.
        source: DICOM folder or file, NIfTI file, PNG/JPEG, or a folder of them
            (see :func:`collect_inputs`).
        out: output folder (created).
        conf: score threshold in [0, 1].
        device: for :func:`load_detector`.
        expected_names: the class list the checkpoint must have.
        skip_bad: with several inputs, log and skip bad ones instead of failing.
        progress: tqdm bars (default :func:`progress_enabled`).
        batch: slices per forward pass (``tools/evaluate.py --weights`` uses the same, so
            both give the same detections).
        series: DICOM inputs holding several series or patients: which one (an index or
            the keyed hash their error listing shows).
        key: de-identification key (see :func:`welde_det.engine.convert.resolve_key`).
        key_file: file holding it (outside ``out``).
        keep_names: also write ``names.csv`` (pseudonym, input path inside the source's
            folder) — the only output that names the inputs.

    Returns:
        An :class:`InferenceSummary`.

    Raises:
        InferenceInputError: a bad input (all bad inputs are listed), unless ``skip_bad``
            and at least one input is good.
        CheckpointError: not a welde_det detector checkpoint, another class list.
        UserError: bad ``conf`` or de-identification key.
    """
    if not 0.0 <= float(conf) <= 1.0:
        raise UserError(f"conf must be in [0, 1], got {conf}")
    progress = progress_enabled() if progress is None else progress
    try:
        if isinstance(weights, Detector):
            detector = weights
            detector.check_names(expected_names)
        else:
            detector = load_detector(weights, device, expected_names=expected_names)
    except UserError:
        raise
    except ValueError as exc:  # the checkpoint the user passed: another class list, not a detector
        raise CheckpointError(str(exc)) from exc
    from welde_det.engine.convert import resolve_key

    try:
        secret = resolve_key(key, key_file, out_dir=out)
    except UserError:
        raise
    except ValueError as exc:  # an empty or missing key file, a key file inside the output folder
        raise UserError(f"de-identification key: {exc}") from exc
    paths = collect_inputs(source)
    items: list[InferenceInput] = []
    bad: list[tuple[Path, str]] = []
    for p in _bar(paths, progress, "reading"):
        try:
            items.append(read_input(p, series=series, key=secret))
        except InferenceInputError as exc:
            bad.append((p, str(exc)))
    if bad and (not skip_bad or not items):
        listing = "\n  ".join(reason for _, reason in bad)
        hint = "" if skip_bad or len(paths) == 1 else " (pass --skip-bad / skip_bad=True to skip them)"
        raise InferenceInputError(f"{len(bad)} of {len(paths)} input(s) cannot be used{hint}; nothing written:\n  "
                                  f"{listing}")
    for p, reason in bad:
        logger.warning("skipping %s: %s", p, reason)
    predictions: list[list[dict[str, Any]]] = []
    for start in _bar(range(0, len(items), max(1, int(batch))), progress, "detecting"):
        predictions += detector.predict_batch([it.image for it in items[start:start + max(1, int(batch))]], conf)
    # render everything in memory first: a failure here must not leave some inputs written
    from welde_det.viz.overlay import render_detections

    out_dir = Path(out)
    src = Path(source)
    tail = set(detector.tail)
    checkpoint = _checkpoint_record(detector.weights)
    names = _output_names(items, src, secret)
    rendered = []
    for item, name, dets in zip(items, names, predictions):
        n_tail = sum(d["class_name"] in tail for d in dets)
        title = f"{name}: {len(dets)} detection(s), {n_tail} tail (conf ≥ {conf:g})"
        png, _ = render_detections(item.image, dets, detector.names, detector.tail, title=title)
        record = _input_record(item, dets, detector, conf, name, checkpoint)
        rendered.append((out_dir / f"{name}.png", png, out_dir / f"{name}.json", record))
    summary = InferenceSummary(out_dir=out_dir, skipped=bad)
    for png_path, png, json_path, record in rendered:
        atomic_write_bytes(png_path, png)
        atomic_write_json(json_path, record)
        summary.outputs.append((png_path, json_path))
        summary.num_detections += record["num_detections"]
    if keep_names:
        atomic_write_text(out_dir / NAMES_FILE, _names_csv(names, items, src))
    logger.info("%s", summary.line())
    return summary


def _bar(seq: Sequence[Any], enabled: bool, desc: str):
    if not enabled or len(seq) < 2:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=desc, leave=False)
