"""DICOM reader: geometry against dcm2niix, series discovery, real test files, bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.io.dicom_factory import (
    ORIENTATIONS,
    affine_from_dirs,
    phantom_volume,
    write_enhanced,
    write_series,
)
from welde_det.io import (
    MissingSliceError,
    NoSagittalSeriesError,
    NotDicomError,
    UnevenSpacingError,
    WeldeIOError,
    list_series,
    mid_sagittal,
    read_volume,
    series_report,
)

DCM2NIIX = shutil.which("dcm2niix")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed (apt-get install dcm2niix)")


def _affine(name, spacing=(0.7, 0.8, 3.5), origin=(-20.0, 35.0, 40.0)):
    return affine_from_dirs(ORIENTATIONS[name], spacing, origin)


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    files = sorted(out.glob("ref*.nii"))
    assert len(files) == 1, [f.name for f in out.iterdir()]
    return nib.load(str(files[0]))


def _corners(shape):
    return np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)


def _assert_same_geometry(ours, ref_img):
    ref = np.asanyarray(ref_img.dataobj)
    ref_aff = ref_img.affine
    world = _corners(ours.shape) @ ours.affine[:3, :3].T + ours.affine[:3, 3]
    ref_world = _corners(ref.shape) @ ref_aff[:3, :3].T + ref_aff[:3, 3]
    # the same eight corner points in the world, whatever the storage order (0.01 mm)
    d = np.linalg.norm(world[:, None, :] - ref_world[None, :, :], axis=2)
    assert d.min(axis=1).max() < 0.01, d.min(axis=1)
    # every voxel: same value at the same world position
    to_ref = np.linalg.inv(ref_aff) @ ours.affine
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in ours.shape), indexing="ij"), -1).reshape(-1, 3)
    ref_ijk = ijk @ to_ref[:3, :3].T + to_ref[:3, 3]
    assert np.abs(ref_ijk - np.rint(ref_ijk)).max() < 1e-3
    r = np.rint(ref_ijk).astype(int)
    np.testing.assert_array_equal(ours.array.reshape(-1), ref[r[:, 0], r[:, 1], r[:, 2]])


@needs_dcm2niix
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_geometry_matches_dcm2niix(tmp_path, orientation):
    vol = phantom_volume()
    aff = _affine(orientation)
    write_series(tmp_path / "dcm", vol, aff, reverse_instance=orientation == "coronal")
    ours = read_volume(tmp_path / "dcm", series=0)
    # slices are stacked along the normal (row x column), whichever way they were written
    _assert_same_geometry(ours, nib.Nifti1Image(vol, aff))
    _assert_same_geometry(ours, _dcm2niix(tmp_path / "dcm", tmp_path / "nii"))


@needs_dcm2niix
def test_shuffled_reversed_and_mixed_series(tmp_path):
    vol = phantom_volume((9, 11, 6))
    write_series(tmp_path / "study" / "a", vol, _affine("sagittal"), reverse_instance=True, seed=3)
    write_series(tmp_path / "study" / "b", phantom_volume((8, 8, 5)), _affine("axial"), description="T2 AX")
    series = list_series(tmp_path / "study")
    assert [s.orientation for s in series] == ["sagittal", "axial"]
    assert series[1].skip_reason.startswith("not sagittal")
    assert series[0].warnings == []  # reversed numbering is consistent with positions
    ours = read_volume(tmp_path / "study")  # picks the sagittal series
    _assert_same_geometry(ours, nib.Nifti1Image(vol, _affine("sagittal")))
    _assert_same_geometry(ours, _dcm2niix(tmp_path / "study" / "a", tmp_path / "nii"))
    assert "skipped: not sagittal" in series_report(series)


def test_same_uid_split_by_geometry(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_series(tmp_path / "x", phantom_volume((6, 6, 4)), _affine("sagittal"), series_uid=uid)
    write_series(tmp_path / "y", phantom_volume((6, 6, 4)), _affine("axial"), series_uid=uid)
    series = list_series(tmp_path)
    assert len(series) == 2 and {s.orientation for s in series} == {"sagittal", "axial"}


def test_rescale_slope_intercept(tmp_path):
    vol = phantom_volume((5, 6, 4)).astype(np.float32) * 2.0 - 50.0
    write_series(tmp_path / "d", vol, _affine("sagittal"), slope=2.0, intercept=-50.0)
    np.testing.assert_allclose(read_volume(tmp_path / "d").array, vol)


def test_enhanced_multiframe_equals_classic(tmp_path):
    vol = phantom_volume((7, 9, 5))
    aff = _affine("oblique")
    write_enhanced(tmp_path / "enh" / "multi.dcm", vol, aff)
    ours = read_volume(tmp_path / "enh", series=0)
    _assert_same_geometry(ours, nib.Nifti1Image(vol, aff))


def test_missing_slice_and_uneven_spacing(tmp_path):
    vol = phantom_volume((6, 6, 8))
    paths = write_series(tmp_path / "d", vol, _affine("sagittal"), shuffle_names=False)
    paths[4].unlink()
    with pytest.raises(MissingSliceError, match=r"gap\(s\) of \[7\.0\] mm") as err:
        read_volume(tmp_path / "d")
    assert err.value.gaps == [pytest.approx(7.0)]
    assert read_volume(tmp_path / "d", spacing_tolerance=4.0).shape == (6, 6, 7)


def test_uneven_spacing_error(tmp_path):
    import pydicom

    paths = write_series(tmp_path / "d", phantom_volume((6, 6, 6)), _affine("sagittal"), shuffle_names=False)
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0] + 0.6, *ds.ImagePositionPatient[1:]]
    ds.save_as(paths[2])
    with pytest.raises(UnevenSpacingError, match="uneven slice spacing"):
        read_volume(tmp_path / "d")


def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeldeIOError, match="empty"):
        list_series(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    (tmp_path / "junk" / "broken.dcm").write_bytes(b"DICM" * 10)
    series = list_series(tmp_path / "junk")
    assert {s.orientation for s in series} == {"unreadable"}
    assert all("not a readable DICOM" in s.skip_reason for s in series)
    with pytest.raises(NotDicomError, match="no readable DICOM series"):
        read_volume(tmp_path / "junk")
    with pytest.raises(NotDicomError):
        read_volume(tmp_path / "junk" / "notes.txt")
    write_series(tmp_path / "ax", phantom_volume((6, 6, 4)), _affine("axial"))
    with pytest.raises(NoSagittalSeriesError, match="found: #0 axial"):
        read_volume(tmp_path / "ax")
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "missing")


def test_truncated_pixel_data_is_typed(tmp_path):
    paths = write_series(tmp_path / "d", phantom_volume((6, 6, 4)), _affine("sagittal"), shuffle_names=False)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 40])
    with pytest.raises(WeldeIOError):
        read_volume(tmp_path / "d")


def _pydicom_file(name):
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped with this pydicom")
    return path


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
                                  "MR_small_padded.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_real_pydicom_mr_files(name):
    from welde_det.io import UnsupportedTransferSyntaxError

    path = _pydicom_file(name)
    ref = read_volume(_pydicom_file("MR_small.dcm"), series=0)
    try:
        vol = read_volume(path, series=0)
    except UnsupportedTransferSyntaxError as exc:
        assert "pip install" in str(exc)
        return
    assert vol.shape == (64, 64, 1)
    np.testing.assert_allclose(vol.affine, ref.affine)
    np.testing.assert_array_equal(vol.array, ref.array)


def test_real_truncated_file_is_typed():
    with pytest.raises(WeldeIOError):
        read_volume(_pydicom_file("MR_truncated.dcm"), series=0)


def test_mid_sagittal_of_dicom_series(tmp_path):
    vol = phantom_volume((12, 10, 7))
    write_series(tmp_path / "d", vol, _affine("sagittal"))
    s = mid_sagittal(read_volume(tmp_path / "d"))
    assert s.axis == 2 and s.index == 3
    # i runs posterior -> columns as stored (anterior left); j runs inferior -> rows as stored
    np.testing.assert_array_equal(s.image, vol[:, :, 3].T)
    assert s.pixel_spacing == pytest.approx((0.8, 0.7))
    world = s.pixel_to_world(np.array([0.0]), np.array([0.0]))[0]
    np.testing.assert_allclose(world, _affine("sagittal") @ np.array([0, 0, 3, 1.0]) @ np.eye(4)[:, :3], atol=1e-6)
