"""Write small synthetic DICOM MR series with pydicom for the reader tests.

Planted PHI (names, IDs, dates, institution, free text) lets the de-identification tests
look for leaks.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PHI = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-99871",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC77123",
    "StudyDate": "20240117",
    "SeriesDate": "20240117",
    "StudyTime": "101112",
    "InstitutionName": "St Elsewhere General",
    "ReferringPhysicianName": "House^Gregory",
    "StudyID": "STUDY4242",
    "StudyDescription": "LSPINE Jane Doe urgent",
    "ImageComments": "patient Jane Doe called 555-0199",
}

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def phantom_volume(shape=(12, 10, 7), seed=0) -> np.ndarray:
    """Asymmetric integer pattern: a ramp along every axis plus a marker in one corner."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    vol = (100 + 7 * i + 13 * j + 29 * k).astype(np.int16)
    vol[0, 0, 0] = 2000
    vol[shape[0] - 1, 1, shape[2] // 2] = 1500
    return vol


def affine_from_dirs(dirs_ras, spacing, origin) -> np.ndarray:
    """4x4 RAS affine whose columns are unit directions times spacing."""
    a = np.eye(4)
    for c, (d, s) in enumerate(zip(dirs_ras, spacing)):
        d = np.asarray(d, float)
        a[:3, c] = d / np.linalg.norm(d) * s
    a[:3, 3] = origin
    return a


def rotation(axis: str, deg: float) -> np.ndarray:
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


ORIENTATIONS = {
    # RAS directions of increasing i (columns), j (rows), k (slices)
    "sagittal": ([0, -1, 0], [0, 0, -1], [1, 0, 0]),
    "axial": ([-1, 0, 0], [0, -1, 0], [0, 0, 1]),
    "coronal": ([-1, 0, 0], [0, 0, -1], [0, 1, 0]),
    "oblique": tuple((rotation("z", 20) @ rotation("x", 12) @ np.array(d, float)).tolist()
                     for d in ([0, -1, 0], [0, 0, -1], [1, 0, 0])),
}


def write_series(
    folder: Path,
    array: np.ndarray,
    affine_ras: np.ndarray,
    *,
    series_uid: str | None = None,
    description: str = "T2 SAG",
    reverse_instance: bool = False,
    shuffle_names: bool = True,
    slope: float = 1.0,
    intercept: float = 0.0,
    phi: dict | None = None,
    seed: int = 0,
) -> list[Path]:
    """One file per slice k of ``array`` (I, J, K) placed by ``affine_ras``."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine_ras
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    col_sp, row_sp = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    n = array.shape[2]
    names = [f"IM{idx:04d}.dcm" for idx in range(n)]
    if shuffle_names:
        random.Random(seed).shuffle(names)
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.SeriesNumber = 1
        ds.InstanceNumber = (n - k) if reverse_instance else (k + 1)
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [float(row_sp), float(col_sp)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.EchoTime = 90.0
        ds.RepetitionTime = 3000.0
        for tag, value in (phi or PHI).items():
            setattr(ds, tag, value)
        stored = np.rint((array[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(path: Path, array: np.ndarray, affine_ras: np.ndarray) -> Path:
    """One enhanced multi-frame MR file (frames in reverse slice order) of ``array``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path.parent.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine_ras
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    col_sp, row_sp = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    n = array.shape[2]
    order = list(range(n))[::-1]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = array.shape[1], array.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [float(row_sp), float(col_sp)]
    pm.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        f = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        f.PlanePositionSequence = Sequence([pp])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(np.stack([array[:, :, k].T for k in order]).astype(np.int16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


