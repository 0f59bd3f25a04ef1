"""Writers for phantom studies: DICOM series (pydicom), NIfTI (nibabel), PNG slices, crops.

The DICOM files are ordinary single-frame MR Image Storage objects with sagittal
geometry (ImageOrientationPatient ``0\\1\\0\\0\\0\\-1``: rows run posterior, columns
inferior), one file per slice, and carry patient-like identity (name, ID, birth date,
accession number, institution, physicians) on purpose: the de-identification path has
to strip it. UIDs are derived from the study seed, so rewriting a study gives the same
files.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from welde_det.datasets.phantom.study import Series, Study
from welde_det.io import window_image
from welde_det.utils.fileio import atomic_write_bytes

__all__ = ["crop_box", "to_uint8", "write_dicom_series", "write_nifti", "write_png"]

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_UID_ROOT = "2.25."
_SEQ = {
    "t1": {"description": "T1_TSE_SAG", "tr": 550.0, "te": 10.0, "etl": 3, "flip": 150.0},
    "t2": {"description": "T2_TSE_SAG", "tr": 3500.0, "te": 100.0, "etl": 17, "flip": 150.0},
}


def _uid(*parts: object) -> str:
    """Deterministic UID under the 2.25 root, always 43 characters (38 digits after the root)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()[:16]
    return _UID_ROOT + str(10**37 + int.from_bytes(digest, "big") % (9 * 10**37))


def _ds(value: float) -> str:
    """Fixed-width Decimal String (10 characters), so per-slice values can be patched in place."""
    text = f"{value:+010.4f}"
    if len(text) != 10:
        raise ValueError(f"DICOM position {value} mm is outside the phantom's +-9999 mm range")
    return text


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Percentile window of a slice to 8 bits (``low``/``high`` percentiles)."""
    img = image.astype(np.float32)
    lo, hi = np.percentile(img, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _write(path: str | os.PathLike, data: bytes, atomic: bool) -> Path:
    if atomic:
        return atomic_write_bytes(path, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_png(path: str | os.PathLike, image: np.ndarray, *, bit_depth: int = 8, atomic: bool = True) -> Path:
    """Write a grey slice as PNG: the 0.5-99.5 percentile window in 8 or 16 bits
    (:func:`to_uint8`, or :func:`welde_det.io.window_image` over 0-65535).

    16 bits keep the windowed intensities without 8-bit quantisation (readers divide by
    65535, as :func:`welde_det.engine.infer.image_to_float` and the YOLO/Faster R-CNN loaders do).

    ``atomic=False`` skips the temporary-file-and-fsync dance, for files written into a
    staging folder that is itself moved into place.
    """
    if bit_depth == 8:
        data = to_uint8(image)
    elif bit_depth == 16:
        data = window_image(image, percentiles=(0.5, 99.5), bit_depth=16)
    else:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return _write(path, buf.tobytes(), atomic)


def write_nifti(path: str | os.PathLike, series: Series, *, atomic: bool = True) -> Path:
    """Write a series' volume as NIfTI-1 (voxel axes slice, row, col; RAS affine as qform/sform).

    ``.nii.gz`` paths are gzip-compressed at level 1 (the noise floor barely compresses).
    """
    import gzip

    import nibabel as nib

    if series.volume is None:
        raise ValueError(f"{path}: the series has no volume (generated with volume=False)")
    img = nib.Nifti1Image(series.volume, series.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(series.affine, code=1)
    img.set_sform(series.affine, code=1)
    raw = img.to_bytes()
    data = gzip.compress(raw, compresslevel=1) if str(path).endswith(".gz") else raw
    return _write(path, data, atomic)


def write_dicom_series(folder: str | os.PathLike, study: Study, contrast: str, series_number: int) -> list[Path]:
    """Write one series of ``study`` as single-frame MR DICOM files ``IM0001.dcm``...

    The files are written into a temporary sibling folder that is renamed to ``folder``
    at the end, so the series appears complete or not at all.

    Args:
        folder: series folder to create.
        study: a study rendered with ``volume=True``.
        contrast: which series.
        series_number: DICOM SeriesNumber.

    Returns:
        The written paths, in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    series = study.series[contrast]
    if series.volume is None:
        raise ValueError(f"study {study.study_id}: series {contrast} has no volume (generated with volume=False)")
    subj = study.subject
    pat = study.patient
    seq = _SEQ[contrast]
    folder = Path(folder)
    study_uid = _uid("study", study.seed, study.study_id)
    series_uid = _uid("series", study.seed, study.study_id, contrast)
    frame_uid = _uid("frame", study.seed, study.study_id)
    aff = series.affine
    flip = np.diag([-1.0, -1.0, 1.0])
    row_dir = flip @ aff[:3, 2] / np.linalg.norm(aff[:3, 2])   # along a row = column index
    col_dir = flip @ aff[:3, 1] / np.linalg.norm(aff[:3, 1])   # down a column = row index
    normal = np.cross(row_dir, col_dir)
    pr, pc = subj.pixel_spacing
    vol = series.volume
    centre = int(np.percentile(vol[series.mid_index], 60))
    width = int(max(2 * np.percentile(vol[series.mid_index], 99.5), 1))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MR_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _UID_ROOT + "1234567890123"
    ds = Dataset()
    ds.file_meta = meta
    # one header, with the per-slice elements replaced in the loop below
    if True:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = _MR_IMAGE_STORAGE
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.Manufacturer = "welde_det phantom"
        ds.ManufacturerModelName = "LumbarPhantom"
        ds.StationName = "PHANTOM-MR1"
        ds.BodyPartExamined = "LSPINE"
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                    "InstitutionName", "InstitutionAddress", "OperatorsName", "StudyID"):
            setattr(ds, key, pat[key])
        ds.PatientWeight = str(pat["PatientWeight"])
        ds.SeriesDate = pat["StudyDate"]
        ds.AcquisitionDate = pat["StudyDate"]
        ds.ContentDate = pat["StudyDate"]
        ds.SeriesTime = pat["StudyTime"]
        ds.ContentTime = pat["StudyTime"]
        ds.StudyDescription = "MRI LUMBAR SPINE"
        ds.SeriesDescription = seq["description"]
        ds.ProtocolName = seq["description"]
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = seq["tr"]
        ds.EchoTime = seq["te"]
        ds.EchoTrainLength = seq["etl"]
        ds.FlipAngle = seq["flip"]
        ds.MagneticFieldStrength = pat["field_strength"]
        ds.ImagingFrequency = round(42.577478 * pat["field_strength"], 6)
        ds.AcquisitionMatrix = [0, series.acquisition.matrix_cols, series.acquisition.matrix_rows, 0]
        ds.SliceThickness = round(subj.slice_thickness, 4)
        ds.SpacingBetweenSlices = round(subj.slice_spacing, 4)
        ds.PixelSpacing = [round(pr, 6), round(pc, 6)]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = centre
        ds.WindowWidth = width
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    # Per-slice elements get fixed-width placeholders; the file is serialised once and
    # every slice is the template with those bytes replaced (pydicom per file is ~10x slower).
    uid_ph = _UID_ROOT + "1" * 38
    ipp_ph = "\\".join(["+7777.7777"] * 3)
    loc_ph = "+6666.6666"
    meta.MediaStorageSOPInstanceUID = uid_ph
    ds.SOPInstanceUID = uid_ph
    ds.InstanceNumber = "9999"
    ds.ImagePositionPatient = ipp_ph.split("\\")
    ds.SliceLocation = loc_ph
    ds.PixelData = np.zeros(vol.shape[1:], np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    n_pix = vol.shape[1] * vol.shape[2] * 2
    head = template[:-n_pix]
    spots = {
        uid_ph: [_value_offset(head, 0x0002, 0x0003, b"UI"), _value_offset(head, 0x0008, 0x0018, b"UI")],
        ipp_ph: [_value_offset(head, 0x0020, 0x0032, b"DS")],
        loc_ph: [_value_offset(head, 0x0020, 0x1041, b"DS")],
        "9999": [_value_offset(head, 0x0020, 0x0013, b"IS")],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        names = []
        for k in range(vol.shape[0]):
            pos_lps = flip @ (aff[:3, :3] @ np.array([k, 0, 0]) + aff[:3, 3])
            values = {
                uid_ph: _uid("image", study.seed, study.study_id, contrast, k),
                ipp_ph: "\\".join(_ds(float(v)) for v in pos_lps),
                loc_ph: _ds(float(pos_lps @ normal)),
                "9999": f"{k + 1:<4d}",
            }
            out = bytearray(head)
            for ph, where in spots.items():
                new_bytes = values[ph].encode()
                for at in where:
                    out[at:at + len(new_bytes)] = new_bytes
            name = f"IM{k + 1:04d}.dcm"
            with open(staging / name, "wb") as handle:
                handle.write(out)
                handle.write(np.ascontiguousarray(vol[k], dtype="<u2").tobytes())
            names.append(name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [folder / n for n in names]


def _value_offset(data: bytes, group: int, element: int, vr: bytes) -> int:
    """Byte offset of an explicit-VR little-endian element's value (short-length VRs)."""
    import struct

    tag = struct.pack("<HH", group, element) + vr
    at = data.find(tag)
    if at < 0 or data.find(tag, at + 1) >= 0:
        raise RuntimeError(f"DICOM template: element ({group:04X},{element:04X}) not found exactly once")
    return at + 8


def crop_box(image: np.ndarray, box: np.ndarray, size: int = 64, context: float = 1.25,
             spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Square crop (in millimetres) centred on a box, resized to ``size`` x ``size``.

    The crop side is ``context`` times the box's larger side in mm, so discs, canal
    segments and slipped segments keep their true aspect on anisotropic pixels.

    Args:
        image: 8-bit slice.
        box: ``x0 y0 x1 y1`` in pixels.
        size: output side.
        context: crop side over the box's larger side.
        spacing: (row, column) pixel spacing.

    Shape:
        ``image``: ``(H, W)``; returns ``(size, size)`` uint8.
    """
    pr, pc = spacing
    cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
    side_mm = context * max((box[2] - box[0]) * pc, (box[3] - box[1]) * pr)
    hw, hh = side_mm / (2 * pc), side_mm / (2 * pr)
    src = np.float32([[cx - hw, cy - hh], [cx + hw, cy - hh], [cx - hw, cy + hh]])
    dst = np.float32([[0, 0], [size, 0], [0, size]])
    mat = cv2.getAffineTransform(src, dst)
    return cv2.warpAffine(image, mat, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
