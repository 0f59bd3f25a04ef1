"""Geometry is checked, not trusted (#17 item 2): a generated bad-input corpus.

Each case asserts the typed error, that the message names the bad file relative to the input
(never the absolute temporary path), that no raw UID, PatientID or patient name is printed, and —
through the ``boxes`` converter and ``tools/convert.py`` — that nothing is written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.io.dicom_factory import ORIENTATIONS, PHI, affine_from_dirs, phantom_volume, write_series
from tests.io.test_dicom import _assert_same_geometry, _dcm2niix, needs_dcm2niix
from welde_det.datasets.sources.common import ConversionError
from welde_det.engine.convert import run_convert
from welde_det.io import (
    AmbiguousSeriesError,
    DuplicateSliceError,
    InvalidAffineError,
    MultiplePatientsError,
    UnreadableSliceError,
    Volume,
    WeldeIOError,
    check_affine,
    list_series,
    mid_sagittal,
    read_volume,
    series_choices,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "geometry-test-key"
# the patient's name is also the input folder's name, as it often is in real exports
PATIENT_DIR = "Doe^Jane^Q"


@pytest.fixture(autouse=True)
def _key(monkeypatch, tmp_path):
    """A known key; and the user's config dir in tmp, so no test writes a key file into $HOME."""
    monkeypatch.setenv("WELDE_DEID_KEY", KEY)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def _affine(name="sagittal", spacing=(0.7, 0.8, 3.5), origin=(-20.0, 35.0, 40.0)):
    return affine_from_dirs(ORIENTATIONS[name], spacing, origin)


def _assert_clean(message: str, tmp_path: Path, *, forbidden: tuple[str, ...] = ()) -> None:
    """No absolute path, no raw identifier in a user-facing message."""
    assert str(tmp_path) not in message, message
    assert str(tmp_path.resolve()) not in message, message
    for value in (*PHI.values(), *forbidden):
        assert str(value) not in message, (value, message)


def _uids(folder: Path) -> set[str]:
    out = set()
    for p in folder.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        out |= {str(ds.get(t)) for t in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID") if t in ds}
    return out


# ---------------------------------------------------------------------------- NIfTI affines
def _write_nifti(path: Path, affine: np.ndarray, *, sform_code: int = 1, qform_code: int = 0) -> Path:
    """A NIfTI whose header holds exactly ``affine`` as its sform (nibabel would not write a bad one)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((6, 5, 4))
    hdr.set_data_dtype(np.int16)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"] = sform_code
    hdr["qform_code"] = qform_code
    hdr["pixdim"][1:4] = np.abs(np.diag(affine)[:3]) if np.isfinite(affine).all() else 1.0
    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(6, 5, 4), None, header=hdr)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    # the header as written is what the reader sees
    back = nib.load(str(path)).header
    assert int(back["sform_code"]) == sform_code
    return path


SHEARED = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
BAD_AFFINES = {
    "singular": (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    "rank2": (np.array([[1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]]), "singular"),
    "nan": (np.where(np.eye(4) > 0, np.nan, 0.0), "non-finite"),
    "inf": (np.diag([1.0, np.inf, 1.0, 1.0]), "non-finite"),
    "sheared": (SHEARED, "sheared"),
}


@pytest.mark.parametrize("case", sorted(BAD_AFFINES))
def test_nifti_bad_affine_is_typed_and_names_the_file(tmp_path, case):
    affine, what = BAD_AFFINES[case]
    path = _write_nifti(tmp_path / PATIENT_DIR / f"{case}.nii.gz", affine)
    with pytest.raises(InvalidAffineError, match=what) as err:
        read_volume(path)
    msg = str(err.value)
    assert msg.startswith(f"{case}.nii.gz (sform affine"), msg
    _assert_clean(msg, tmp_path, forbidden=(PATIENT_DIR,))


def test_nifti_zero_codes_use_the_pixdim_affine_and_say_so(tmp_path):
    path = _write_nifti(tmp_path / "nocodes.nii", np.diag([0.8, 0.9, 3.0, 1.0]), sform_code=0, qform_code=0)
    vol = read_volume(path)
    assert vol.provenance["affine_source"] == "pixdim"
    assert vol.spacing == pytest.approx((0.8, 0.9, 3.0))
    assert np.isfinite(mid_sagittal(vol).world_x)


def test_nifti_zero_pixdim_with_zero_codes_is_singular(tmp_path):
    path = _write_nifti(tmp_path / "zero.nii", np.diag([1.0, 1.0, 1.0, 1.0]), sform_code=0, qform_code=0)
    data = bytearray(path.read_bytes())
    data[88:92] = np.float32(0.0).tobytes()  # pixdim[3] (nibabel would not write a zero)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidAffineError, match=r"zero\.nii: the voxel sizes .*pixdim affine"):
        read_volume(path)


def test_no_volume_with_a_bad_affine_from_any_path():
    arr = np.zeros((3, 3, 3), np.float32)
    for affine, what in BAD_AFFINES.values():
        with pytest.raises(InvalidAffineError, match=what):
            Volume(arr, affine, {"source_files": ["/abs/secret/x.nii"]})
    with pytest.raises(InvalidAffineError, match=r"volume read from x\.nii"):
        Volume(arr, SHEARED, {"source_files": ["/abs/secret/x.nii"]})
    # rotations, flips and anisotropic voxels are fine; a shear just inside the tolerance too
    rot = np.eye(4)
    rot[:3, :3] = np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]]) @ np.diag([0.5, 0.7, 4.0])
    check_affine(rot)
    tiny = np.eye(4)
    tiny[0, 1] = 5e-4
    check_affine(tiny)
    with pytest.raises(InvalidAffineError, match="sheared"):
        tiny[0, 1] = 5e-3
        check_affine(tiny)


def test_bad_pixel_spacing_of_a_2d_image(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "s.png"), np.full((16, 16), 7, np.uint8))
    for spacing in ((0.0, 1.0), (float("nan"), 1.0), (1.0, -2.0)):
        with pytest.raises(InvalidAffineError, match=r"s\.png: pixel spacing"):
            read_volume(tmp_path / "s.png", pixel_spacing=spacing)


def test_series_is_refused_for_single_volume_files(tmp_path):
    path = _write_nifti(tmp_path / "ok.nii", np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(WeldeIOError, match="series= applies to DICOM input only"):
        read_volume(path, series=0)


# ---------------------------------------------------------------------------- damaged DICOM slices
def _truncate(path: Path, where: str) -> None:
    data = path.read_bytes()
    if where == "before-uid":  # cut inside the dataset, before SeriesInstanceUID
        cut = data.index(b"\x20\x00\x0e\x00")  # (0020,000E)
    elif where == "before-position":  # SeriesInstanceUID kept, ImagePositionPatient lost
        cut = data.index(b"\x20\x00\x32\x00")  # (0020,0032)
    elif where == "before-spacing":  # Rows/Columns kept, PixelSpacing lost
        cut = data.index(b"\x28\x00\x30\x00")  # (0028,0030)
    elif where == "pixels":  # the header is whole, the pixel data cut
        cut = len(data) - 40
    else:
        raise AssertionError(where)
    path.write_bytes(data[:cut])


@pytest.mark.parametrize("where", ["before-uid", "before-position", "before-spacing", "pixels"])
@pytest.mark.parametrize("slice_k", [0, 3, 6], ids=["edge-first", "middle", "edge-last"])
def test_a_damaged_slice_anywhere_is_an_error_naming_it(tmp_path, where, slice_k):
    series = tmp_path / PATIENT_DIR / "t2"
    paths = write_series(series, phantom_volume((6, 6, 7)), _affine(), shuffle_names=False)
    uids = _uids(tmp_path)
    _truncate(paths[slice_k], where)
    with pytest.raises(UnreadableSliceError) as err:
        read_volume(tmp_path / PATIENT_DIR)
    msg = str(err.value)
    assert f"t2/IM{slice_k:04d}.dcm" in msg, msg
    assert err.value.file == f"t2/IM{slice_k:04d}.dcm"
    _assert_clean(msg, tmp_path, forbidden=(PATIENT_DIR, *uids))


def test_a_damaged_slice_of_another_series_does_not_block_a_pick(tmp_path):
    a = write_series(tmp_path / "in" / "a", phantom_volume((6, 6, 5)), _affine(), shuffle_names=False)
    write_series(tmp_path / "in" / "b", phantom_volume((6, 6, 3)), _affine(origin=(0.0, 0.0, 0.0)),
                 shuffle_names=False)
    _truncate(a[0], "before-spacing")  # its SeriesInstanceUID is readable: it belongs to series a
    b_key = next(s for s in list_series(tmp_path / "in") if s.size[2] == 3)
    choices = series_choices(list_series(tmp_path / "in"), KEY)
    b_hash = next(c["series"] for c in choices if c["slices"] == 3)
    assert read_volume(tmp_path / "in", series=b_hash).shape == (6, 6, 3)
    assert read_volume(tmp_path / "in", series=b_key).shape == (6, 6, 3)
    # series a, which lost a slice, is refused when picked (and when it is the default)
    a_index = next(c["index"] for c in choices if c["series"] != b_hash)
    with pytest.raises(UnreadableSliceError, match=r"a/IM0000\.dcm"):
        read_volume(tmp_path / "in", series=a_index)


def test_a_non_finite_position_is_an_unreadable_slice(tmp_path):
    paths = write_series(tmp_path / "d", phantom_volume((6, 6, 5)), _affine(), shuffle_names=False)
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient = ["nan", "0", "0"]
    ds.save_as(paths[4])
    with pytest.raises(UnreadableSliceError, match=r"IM0004\.dcm: ImagePositionPatient holds a non-finite"):
        read_volume(tmp_path / "d")


def test_a_sheared_dicom_stack_is_an_invalid_affine(tmp_path):
    aff = _affine()
    aff[:3, 2] += aff[:3, 0] / np.linalg.norm(aff[:3, 0]) * 1.0  # each slice 1 mm further along the rows
    write_series(tmp_path / "d", phantom_volume((6, 6, 5)), aff, shuffle_names=False)
    with pytest.raises(InvalidAffineError, match="sheared") as err:
        read_volume(tmp_path / "d")
    assert "IM0000.dcm .. IM0004.dcm" in str(err.value)
    _assert_clean(str(err.value), tmp_path)


def test_duplicate_slice_position_names_both_files(tmp_path):
    paths = write_series(tmp_path / PATIENT_DIR, phantom_volume((6, 6, 5)), _affine(), shuffle_names=False)
    shutil.copy(paths[2], tmp_path / PATIENT_DIR / "copy_of_2.dcm")
    with pytest.raises(DuplicateSliceError, match="duplicate slice position") as err:
        read_volume(tmp_path / PATIENT_DIR)
    msg = str(err.value)
    assert "no sagittal series" not in msg
    assert set(err.value.files) == {"IM0002.dcm", "copy_of_2.dcm"}
    assert "IM0002.dcm" in msg and "copy_of_2.dcm" in msg
    _assert_clean(msg, tmp_path, forbidden=(PATIENT_DIR, *_uids(tmp_path)))


# ---------------------------------------------------------------------------- several series / patients
def _two_series(folder: Path, *, second_patient: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    va, vb = phantom_volume((12, 10, 7)), phantom_volume((12, 10, 5), seed=1) + 300
    write_series(folder / "t2", va, _affine())
    phi = dict(PHI, PatientID=second_patient, PatientName="Roe^Richard") if second_patient else None
    write_series(folder / "t1", vb, _affine(spacing=(0.7, 0.8, 4.0), origin=(-16.0, 35.0, 40.0)),
                 description="T1 SAG", phi=phi)
    return va, vb


def test_two_series_are_listed_pseudonymised_and_one_can_be_picked(tmp_path):
    folder = tmp_path / PATIENT_DIR
    va, vb = _two_series(folder)
    uids = _uids(tmp_path)
    with pytest.raises(AmbiguousSeriesError) as err:
        read_volume(folder)
    assert not isinstance(err.value, MultiplePatientsError)
    msg = str(err.value)
    _assert_clean(msg, tmp_path, forbidden=(PATIENT_DIR, *uids, "T2 SAG", "T1 SAG"))
    choices = err.value.choices
    assert [(c["index"], c["orientation"], c["modality"]) for c in choices] == [(0, "sagittal", "MR"),
                                                                               (1, "sagittal", "MR")]
    assert sorted(c["slices"] for c in choices) == [5, 7]
    assert len({c["patient"] for c in choices}) == 1
    for c in choices:
        assert f"#{c['index']} MR sagittal {c['slices']} slices series={c['series']}" in msg
        assert len(c["series"]) == 8 and int(c["series"], 16) >= 0
    # the hash is keyed: another key gives other hashes
    assert {c["series"] for c in series_choices(list_series(folder), "another key")}.isdisjoint(
        c["series"] for c in choices)
    by_slices = {c["slices"]: c for c in choices}
    # pick by hash or by index (int or digits, as --series passes it)
    np.testing.assert_array_equal(read_volume(folder, series=by_slices[5]["series"]).array, vb)
    np.testing.assert_array_equal(read_volume(folder, series=str(by_slices[7]["index"])).array, va)
    np.testing.assert_array_equal(read_volume(folder, series=by_slices[5]["index"]).array, vb)
    with pytest.raises(WeldeIOError, match="no series matches 'deadbeef'") as err2:
        read_volume(folder, series="deadbeef")
    _assert_clean(str(err2.value), tmp_path, forbidden=tuple(uids))
    with pytest.raises(WeldeIOError, match=r"series index 2 is outside 0\.\.1"):
        read_volume(folder, series=2)


@needs_dcm2niix
def test_picked_series_matches_dcm2niix_and_gives_its_own_mid_slice(tmp_path):
    folder = tmp_path / "study"
    _va, vb = _two_series(folder)
    with pytest.raises(AmbiguousSeriesError) as err:
        read_volume(folder)
    pick = next(c for c in err.value.choices if c["slices"] == 5)
    ours = read_volume(folder, series=pick["series"])
    _assert_same_geometry(ours, _dcm2niix(folder / "t1", tmp_path / "nii"))
    s = mid_sagittal(ours)
    assert s.axis == 2 and s.index == 2  # the picked 5-slice series' middle, not the 7-slice one's (3)
    np.testing.assert_array_equal(s.image, vb[:, :, 2].T)
    aff = _affine(spacing=(0.7, 0.8, 4.0), origin=(-16.0, 35.0, 40.0))
    assert s.world_x == pytest.approx((aff @ np.array([5.5, 4.5, 2, 1.0]))[0])


def test_two_patients_are_an_error_even_with_one_sagittal_series(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder / "a", phantom_volume((6, 6, 5)), _affine())
    write_series(folder / "b", phantom_volume((6, 6, 4)), _affine("axial"), description="T2 AX",
                 phi=dict(PHI, PatientID="PID-12345", PatientName="Roe^Richard"))
    with pytest.raises(MultiplePatientsError, match="2 different patients") as err:
        read_volume(folder)
    msg = str(err.value)
    _assert_clean(msg, tmp_path, forbidden=("PID-12345", "Roe^Richard", *_uids(tmp_path)))
    assert len({c["patient"] for c in err.value.choices}) == 2
    sag = next(c for c in err.value.choices if c["orientation"] == "sagittal")
    assert read_volume(folder, series=sag["series"]).shape == (6, 6, 5)


def test_one_sagittal_series_beside_an_axial_one_is_read(tmp_path):
    # not ambiguous: only one series can give a mid-sagittal slice (same patient)
    write_series(tmp_path / "s" / "sag", phantom_volume((6, 6, 5)), _affine())
    write_series(tmp_path / "s" / "ax", phantom_volume((6, 6, 4)), _affine("axial"), description="T2 AX")
    assert read_volume(tmp_path / "s").shape == (6, 6, 5)


# ---------------------------------------------------------------------------- through the converter
def _table(tmp_path: Path, volume: str, series: str | None = None) -> Path:
    header = "volume,class,x,y,w,h" + (",series" if series is not None else "")
    row = f"{volume},disc,1,1,3,3" + (f",{series}" if series is not None else "")
    path = tmp_path / "boxes.csv"
    path.write_text(f"{header}\n{row}\n")
    return path


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    if not out.parent.exists():
        return
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.", f"{out.name}."))]
    assert leftovers == []


@pytest.mark.parametrize("case", ["nifti-nan", "dicom-two-series", "dicom-truncated-edge"])
def test_convert_writes_nothing_for_bad_geometry(tmp_path, case):
    if case == "nifti-nan":
        _write_nifti(tmp_path / "vols" / "v.nii", BAD_AFFINES["nan"][0])
        volume, cause = "v.nii", InvalidAffineError
    elif case == "dicom-two-series":
        _two_series(tmp_path / "vols" / PATIENT_DIR)
        volume, cause = PATIENT_DIR, AmbiguousSeriesError
    else:
        paths = write_series(tmp_path / "vols" / PATIENT_DIR, phantom_volume((6, 6, 5)), _affine(),
                             shuffle_names=False)
        _truncate(paths[0], "before-position")
        volume, cause = PATIENT_DIR, UnreadableSliceError
    out = tmp_path / "out" / "ds"
    with pytest.raises(ConversionError) as err:
        run_convert("boxes", _table(tmp_path, volume), out, key=KEY, root=tmp_path / "vols", fractions=None)
    assert isinstance(err.value.__cause__, cause)
    assert str(err.value).startswith("boxes.csv:2: cannot read the row's volume")
    _assert_clean(str(err.value), tmp_path, forbidden=tuple(_uids(tmp_path)))
    _nothing_written(tmp_path, out)


def test_convert_tool_series_flag_picks_one_and_writes_finite_geometry(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert as convert_tool
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from welde_det.utils.cli import run_cli

    _va, vb = _two_series(tmp_path / "vols" / PATIENT_DIR)
    table = _table(tmp_path, PATIENT_DIR)
    out = tmp_path / "out" / "ds"
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY)
    argv = ["boxes", str(table), str(out), "--root", str(tmp_path / "vols"), "--no-split", "--key-file", str(key_file)]
    assert run_cli(convert_tool.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: boxes.csv:2: cannot read the row's volume") and err.count("\n") == 1
    assert "AmbiguousSeriesError" not in err and "Traceback" not in err
    _assert_clean(err, tmp_path, forbidden=tuple(_uids(tmp_path)))
    _nothing_written(tmp_path, out)
    pick = next(c for c in series_choices(list_series(tmp_path / "vols" / PATIENT_DIR), KEY) if c["slices"] == 5)
    assert f"series={pick['series']}" in err  # the hash the tool shows is the one --series takes
    assert run_cli(convert_tool.main, [*argv, "--series", pick["series"]]) == 0
    coco = json.loads((out / "annotations.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-finite {c} in annotations.json"))
    (image,) = coco["images"]
    assert image["slice_index"] == 2 and np.isfinite(image["world_x"])
    assert image["pixel_spacing"] == pytest.approx([0.8, 0.7])
    assert (image["height"], image["width"]) == vb[:, :, 2].T.shape


# ---------------------------------------------------------------------------- other converters' geometry
def test_rsna_non_finite_position_is_refused_before_anything_is_written(tmp_path):
    from tests.datasets.test_rsna_lsdc import SERIES_SAG, STUDY, _make_archive
    from welde_det.datasets.sources.rsna_lsdc import convert_rsna_lsdc

    root = _make_archive(tmp_path / "rsna")
    victim = sorted((root / "train_images" / STUDY / SERIES_SAG).glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    ds.ImagePositionPatient = ["nan", "-50", "60"]
    ds.save_as(victim)
    out = tmp_path / "out" / "ds"
    with pytest.raises(ConversionError, match=rf"{victim.name}: malformed geometry values"):
        convert_rsna_lsdc(root, out, key=KEY, fractions=None)
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("spacing", [(float("nan"), 1.0), (0.0, 1.0), (1.0, float("inf"))])
def test_yolo_pixel_spacing_must_be_finite(tmp_path, spacing):
    from tests.datasets.test_yolo_dir import _lumbar_folder
    from welde_det.datasets.sources.yolo_dir import convert_yolo_dir

    src = _lumbar_folder(tmp_path / "src", n=2)
    out = tmp_path / "out" / "ds"
    with pytest.raises(ConversionError, match=r"pixel_spacing .* must be two positive finite numbers"):
        convert_yolo_dir(src, out, key=KEY, class_names=list("abcdef"), pixel_spacing=spacing, fractions=None)
    _nothing_written(tmp_path, out)
