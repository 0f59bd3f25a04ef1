"""RSNA 2024 lumbar converter on a tiny synthetic archive written with pydicom.

PHI is planted in every identifying DICOM field; afterwards no PHI string may appear in any
output: file names, COCO JSON (info included), PNG chunks, YAML, or the report.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage  # noqa: E402

from welde_det.datasets.coco import load_coco  # noqa: E402
from welde_det.datasets.sources.common import (  # noqa: E402
    ConversionError,
    MissingColumnsError,
    UnknownClassError,
)
from welde_det.datasets.sources.rsna_lsdc import convert_rsna_lsdc  # noqa: E402

KEY = "test-secret-key-outside-dataset"



PHI = {
    "PatientName": "Doe^Johnathan",
    "PatientID": "PHI-PID-7731",
    "PatientBirthDate": "19610203",
    "StudyDate": "20230405",
    "SeriesDate": "20230406",
    "AccessionNumber": "ACC80813",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "Phiphysician^Greta",
    "StudyDescription": "LUMBAR for Johnathan",
    "SeriesDescription": "SAG T2 Johnathan",
    "StudyID": "STUDYID5555",
    "OtherPatientIDs": "OTHERPID4242",
    "PatientAddress": "12 Secret Lane",
}
STUDY, SERIES_SAG, SERIES_AX = "918273645", "564738291", "192837465"
UID_ROOT = "1.2.826.0.1.3680043.8.498.7777"
# positions (LPS x, mm) of the five sagittal slices and their (shuffled) instance numbers
SAG_X = [-10.0, -5.0, 0.0, 5.0, 10.0]
SAG_INSTANCES = [3, 1, 5, 2, 4]
ROWS, COLS = 48, 40
SPACING = (0.5, 0.8)  # row_mm, col_mm


def _write_dicom(path: Path, *, instance: int, ipp, iop, series_uid: str, pixels: np.ndarray, burned=False):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.{series_uid[-3:]}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for name, value in PHI.items():
        setattr(ds, name, value)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"{UID_ROOT}.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = list(SPACING)
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 2.0
    ds.RescaleIntercept = -10.0
    if burned:
        ds.BurnedInAnnotation = "YES"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _pattern(marker_row: int, marker_col: int) -> np.ndarray:
    img = np.full((ROWS, COLS), 100, np.uint16)
    img[marker_row : marker_row + 4, marker_col : marker_col + 6] = 1000  # asymmetric bright block
    return img


def _make_archive(root: Path, *, extra_rows=(), coord_columns=None) -> Path:
    rng = np.random.default_rng(0)
    sag = root / "train_images" / STUDY / SERIES_SAG
    sag.mkdir(parents=True)
    names = rng.permutation(len(SAG_X))  # shuffled file names, unrelated to position
    for k, (x, inst) in enumerate(zip(SAG_X, SAG_INSTANCES)):
        _write_dicom(sag / f"{names[k] + 100}.dcm", instance=inst, ipp=[x, -50.0, 60.0],
                     iop=[0, 1, 0, 0, 0, -1], series_uid=f"{UID_ROOT}.2", pixels=_pattern(5 + k, 3))
    ax = root / "train_images" / STUDY / SERIES_AX
    ax.mkdir(parents=True)
    for inst in (1, 2):
        _write_dicom(ax / f"{inst}.dcm", instance=inst, ipp=[-20.0, -20.0, 10.0 * inst], iop=[1, 0, 0, 0, 1, 0],
                     series_uid=f"{UID_ROOT}.3", pixels=_pattern(30, 20), burned=True)
    cols = coord_columns or ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    rows = [
        [STUDY, SERIES_SAG, 5, "Spinal Canal Stenosis", "L4/L5", 20.0, 30.0],   # x=0 -> 3rd slice
        [STUDY, SERIES_SAG, 5, "Spinal Canal Stenosis", "L5/S1", 22.0, 40.0],
        [STUDY, SERIES_SAG, 1, "Left Neural Foraminal Narrowing", "L4/L5", 1.0, 2.0],  # x=-5
        [STUDY, SERIES_AX, 2, "Right Subarticular Stenosis", "L4/L5", 25.0, 20.0],
        *extra_rows,
    ]
    with (root / "train_label_coordinates.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([r[: len(cols)] for r in rows])
    with (root / "train_series_descriptions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "series_id", "series_description"])
        w.writerow([STUDY, SERIES_SAG, "Sagittal T2/STIR"])
        w.writerow([STUDY, SERIES_AX, "Axial T2"])
    sev_cols = [f"{c}_{lv}" for c in ("spinal_canal_stenosis", "left_neural_foraminal_narrowing",
                                      "right_subarticular_stenosis") for lv in ("l4_l5", "l5_s1")]
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", *sev_cols])
        w.writerow([STUDY, "Severe", "Moderate", "Normal/Mild", "Normal/Mild", "Moderate", "Moderate"])
    return root


def _png_chunks(data: bytes) -> list[str]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, types = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8].decode("ascii"))
        pos += 12 + length
    return types


def test_boxes_slices_and_geometry(tmp_path, pycocotools_check):
    import cv2

    root = _make_archive(tmp_path / "rsna")
    res = convert_rsna_lsdc(root, tmp_path / "out", key=KEY, box_mm=8.0, yolo=True, fractions=None)
    coco = load_coco(res.coco)
    assert coco["categories"][0]["name"] == "Spinal Canal Stenosis"
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 4
    sag = sorted((img for img in coco["images"] if "world_x" in img), key=lambda i: i["slice_index"])
    # instance 1 sits at LPS x=-5 (RAS x=+5), instance 5 at x=0: ranks by position along the
    # normal (-x_LPS), i.e. RAS x ascending: x_RAS = [-10,-5,0,5,10] -> LPS x = 10,5,0,-5,-10
    assert [(i["instance_number"], i["slice_index"], i["world_x"]) for i in sag] == [(5, 2, 0.0), (1, 3, 5.0)]
    for img in coco["images"]:
        assert img["pixel_spacing"] == list(SPACING) and (img["width"], img["height"]) == (COLS, ROWS)
    img5 = sag[0]
    boxes = sorted(a["bbox"] for a in coco["annotations"] if a["image_id"] == img5["id"])
    # 8 mm box: 8/0.8 = 10 px wide, 8/0.5 = 16 px high, centred on the point
    assert boxes[0] == pytest.approx([15.0, 22.0, 10.0, 16.0])
    assert boxes[1] == pytest.approx([17.0, 32.0, 10.0, 16.0])
    clipped = next(a for a in coco["annotations"] if a["point"] == [1.0, 2.0])
    assert clipped["bbox"] == pytest.approx([0.0, 0.0, 6.0, 10.0]) and clipped["area"] == pytest.approx(60.0)
    # the PNG is the instance's own pixel grid: slice x=0 was written with its bright block at row 5+2
    png = cv2.imread(str(res.out_dir / "images" / img5["file_name"]), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and png.shape == (ROWS, COLS)
    rows, cols = np.nonzero(png == png.max())
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (7, 3, 10, 8)
    report = json.loads(res.report.read_text())
    assert report["series_with_burned_in_annotation"] == 1
    assert res.data_yaml is not None and res.data_yaml.is_file()
    pycocotools_check(res.coco)


def test_no_phi_anywhere_in_outputs(tmp_path, pycocotools_check):
    root = _make_archive(tmp_path / "rsna")
    res = convert_rsna_lsdc(root, tmp_path / "out", key=KEY, yolo=True, bit_depth=16,
                            fractions={"train": 0.5, "val": 0.5})
    forbidden = [v.split("^")[0].lower() for v in PHI.values()] + [STUDY, SERIES_SAG, SERIES_AX, UID_ROOT, KEY]
    forbidden += ["johnathan", "greta", "elsewhere"]
    checked = 0
    for path in res.out_dir.rglob("*"):
        rel = str(path.relative_to(res.out_dir)).lower()
        for word in forbidden:
            assert word.lower() not in rel, (word, rel)
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes().lower()
            for word in forbidden:
                assert word.lower().encode() not in data, (word, path)
            if path.suffix == ".png":
                assert set(_png_chunks(path.read_bytes())) == {"IHDR", "IDAT", "IEND"}
            checked += 1
    assert checked >= 3 + 1 + 2 + 1  # pngs, annotations, splits, report
    coco = load_coco(res.coco)
    assert set(coco["info"]) <= {"description", "version", "source"}
    assert len({img["patient_id"] for img in coco["images"]}) == 1
    pycocotools_check(res.coco, *res.splits.values())


def test_class_schemes_and_map(tmp_path):
    root = _make_archive(tmp_path / "rsna")
    res = convert_rsna_lsdc(root, tmp_path / "sev", key=KEY, class_by="severity", fractions=None)
    coco = load_coco(res.coco)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    got = sorted((a["point"][0], names[a["category_id"]]) for a in coco["annotations"])
    assert got == [(1.0, "Normal/Mild"), (20.0, "Severe"), (22.0, "Moderate"), (25.0, "Moderate")]
    res = convert_rsna_lsdc(
        root, tmp_path / "map", key=KEY, fractions=None,
        class_map={"Spinal Canal Stenosis": "SCS", "Left Neural Foraminal Narrowing": "NFN",
                   "Right Neural Foraminal Narrowing": "NFN", "Left Subarticular Stenosis": None,
                   "Right Subarticular Stenosis": None},
    )
    coco = load_coco(res.coco)
    assert [c["name"] for c in coco["categories"]] == ["SCS", "NFN"] and len(coco["annotations"]) == 3
    res = convert_rsna_lsdc(root, tmp_path / "sag", key=KEY, fractions=None, series_types=["Sagittal T2/STIR"])
    assert res.num_images == 2


def test_unknown_condition_names_the_csv_line(tmp_path):
    root = _make_archive(tmp_path / "rsna", extra_rows=[[STUDY, SERIES_SAG, 2, "Spinal Fracture", "L4/L5", 5, 5]])
    with pytest.raises(UnknownClassError, match=r"train_label_coordinates\.csv:6: unknown condition 'Spinal Fracture'"):
        convert_rsna_lsdc(root, tmp_path / "out", key=KEY)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rsna"]


def test_missing_columns(tmp_path):
    root = _make_archive(tmp_path / "rsna", coord_columns=["study_id", "series_id", "instance_number", "condition"])
    with pytest.raises(MissingColumnsError, match=r"missing column\(s\) \['level', 'x', 'y'\]"):
        convert_rsna_lsdc(root, tmp_path / "out", key=KEY)
    assert not (tmp_path / "out").exists()


def test_corrupt_dicom_and_missing_instance(tmp_path):
    root = _make_archive(tmp_path / "rsna")
    bad = root / "train_images" / STUDY / SERIES_AX / "9.dcm"
    bad.write_bytes(b"this is not a dicom file at all")
    with pytest.raises(ConversionError, match=r"9\.dcm: not a readable DICOM"):
        convert_rsna_lsdc(root, tmp_path / "out", key=KEY, fractions=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rsna"]
    res = convert_rsna_lsdc(root, tmp_path / "out", key=KEY, fractions=None, skip_bad=True)
    report = json.loads(res.report.read_text())
    assert res.num_images == 2 and len(report["series_skipped"]) == 1
    assert SERIES_AX not in res.report.read_text()
    bad.unlink()
    # header fine, pixel data truncated, on a labelled instance
    labelled = root / "train_images" / STUDY / SERIES_AX / "2.dcm"
    ds = pydicom.dcmread(labelled)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(labelled)
    with pytest.raises(ConversionError, match=r"2\.dcm: cannot decode pixel data"):
        convert_rsna_lsdc(root, tmp_path / "out3", key=KEY, fractions=None)
    assert not (tmp_path / "out3").exists()
    root2 = _make_archive(tmp_path / "rsna2", extra_rows=[[STUDY, SERIES_SAG, 17, "Spinal Canal Stenosis", "L1/L2", 5, 5]])
    with pytest.raises(ConversionError, match="instance_number 17 is not in the series headers"):
        convert_rsna_lsdc(root2, tmp_path / "out2", key=KEY)
    assert not (tmp_path / "out2").exists()


def test_process_pool_gives_the_same_dataset(tmp_path):
    root = _make_archive(tmp_path / "rsna")
    a = convert_rsna_lsdc(root, tmp_path / "a", key=KEY, workers=1)
    b = convert_rsna_lsdc(root, tmp_path / "b", key=KEY, workers=2)
    assert a.coco.read_text() == b.coco.read_text()
    for png in (a.out_dir / "images").rglob("*.png"):
        assert png.read_bytes() == (b.out_dir / "images" / png.relative_to(a.out_dir / "images")).read_bytes()
