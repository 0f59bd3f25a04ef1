"""NIfTI reading in every orientation; mid-sagittal display; 2D images; windowing."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from welde_det.io import WeldeIOError, mid_sagittal, read_volume, window_image
from welde_det.io.volume import Volume

# base volume: i -> R (lateral), j -> A, k -> S; odd lateral size plus an even-size variant
BASE_AFFINE = np.array([[0.9, 0, 0, -10.0], [0, 0.8, 0, -40.0], [0, 0, 0.7, 5.0], [0, 0, 0, 1.0]])


def _base(shape):
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=shape).astype(np.int16)


def _reorient(data, affine, perm, flips):
    """Same world content stored with permuted and flipped voxel axes."""
    out = np.transpose(data, perm)
    new_aff = affine[:, [*list(perm), 3]].copy()
    for ax, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=ax)
            n = out.shape[ax]
            new_aff[:3, 3] = new_aff[:3, 3] + new_aff[:3, ax] * (n - 1)
            new_aff[:3, ax] = -new_aff[:3, ax]
    return np.ascontiguousarray(out), new_aff


@pytest.mark.parametrize("shape", [(7, 12, 10), (6, 12, 10)])
def test_all_48_orientations_give_the_same_mid_sagittal_slice(tmp_path, shape):
    data = _base(shape)
    ref = mid_sagittal(Volume(data, BASE_AFFINE))
    # superior up: rows run inferior; anterior left: columns run posterior
    expected = data[ref.index][::-1, ::-1].T
    np.testing.assert_array_equal(ref.image, expected)
    seen = 0
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            d, a = _reorient(data, BASE_AFFINE, perm, flips)
            path = tmp_path / f"v_{''.join(map(str, perm))}_{''.join(str(int(f)) for f in flips)}.nii.gz"
            nib.save(nib.Nifti1Image(d, a), str(path))
            s = mid_sagittal(read_volume(path))
            np.testing.assert_array_equal(s.image, ref.image, err_msg=f"perm={perm} flips={flips}")
            assert s.world_x == pytest.approx(ref.world_x)
            assert s.pixel_spacing == pytest.approx(ref.pixel_spacing)
            seen += 1
    assert seen == 48


def test_pixel_to_world_round_trip():
    data = _base((7, 12, 10))
    d, a = _reorient(data, BASE_AFFINE, (2, 0, 1), (True, False, True))
    s = mid_sagittal(Volume(d, a))
    rows, cols = np.meshgrid(np.arange(s.image.shape[0]), np.arange(s.image.shape[1]), indexing="ij")
    world = s.pixel_to_world(rows, cols)
    assert np.allclose(world[..., 0], s.world_x)
    # moving down a row goes inferior, moving right a column goes posterior
    assert np.all(np.diff(world[..., 2], axis=0) < 0)
    assert np.all(np.diff(world[..., 1], axis=1) < 0)


def test_nifti_4d_and_qform_sform(tmp_path):
    vol = np.stack([_base((5, 6, 4)) + t for t in range(3)], axis=-1)
    img = nib.Nifti1Image(vol, BASE_AFFINE)
    nib.save(img, str(tmp_path / "v4.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "v4.nii.gz", volume_index=2).array, vol[..., 2])
    with pytest.raises(WeldeIOError, match="volume_index 5"):
        read_volume(tmp_path / "v4.nii.gz", volume_index=5)
    # qform only: nibabel's affine falls back to it
    img = nib.Nifti1Image(_base((5, 6, 4)), None)
    img.set_qform(BASE_AFFINE, code=1)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "q.nii"))
    np.testing.assert_allclose(read_volume(tmp_path / "q.nii").affine, BASE_AFFINE, atol=1e-5)


def test_nibabel_shipped_files_load():
    data_dir = Path(nib.__file__).parent / "tests" / "data"
    loaded = 0
    for name in ("example4d.nii.gz", "anatomical.nii", "example_nifti2.nii.gz", "standard.nii.gz"):
        path = data_dir / name
        if not path.is_file():
            continue
        vol = read_volume(path)
        assert vol.array.ndim == 3 and vol.affine.shape == (4, 4)
        s = mid_sagittal(vol)
        assert s.image.ndim == 2
        loaded += 1
    assert loaded >= 2


def test_corrupt_nifti(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(WeldeIOError, match="not a readable NIfTI"):
        read_volume(tmp_path / "bad.nii.gz")


def test_png_8_and_16_bit_and_rgb_grey(tmp_path):
    img8 = (np.arange(40 * 30) % 251).reshape(40, 30).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img8)
    s = mid_sagittal(read_volume(tmp_path / "a.png"))
    np.testing.assert_array_equal(s.image, img8)
    img16 = (np.arange(40 * 30) * 37 % 65000).reshape(40, 30).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "b.png"), img16)
    vol = read_volume(tmp_path / "b.png")
    assert vol.array.dtype == np.uint16 and vol.provenance["bit_depth"] == 16
    np.testing.assert_array_equal(mid_sagittal(vol).image, img16)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([img8] * 3))
    np.testing.assert_array_equal(mid_sagittal(read_volume(tmp_path / "c.png")).image, img8)
    colour = np.dstack([img8, img8 // 2, 255 - img8])
    cv2.imwrite(str(tmp_path / "d.png"), colour)
    with pytest.raises(WeldeIOError, match="colour image"):
        read_volume(tmp_path / "d.png")


def test_real_sample_png_is_a_slice():
    root = Path(__file__).resolve().parents[3] / "shared" / "real_samples"
    pngs = sorted(root.glob("*.png"))
    if not pngs:
        pytest.skip("../shared/real_samples not present")
    s = mid_sagittal(read_volume(pngs[0]))
    assert s.image.shape == (384, 384)


def test_window_image():
    img = np.array([[0.0, 50.0], [100.0, 200.0]])
    out = window_image(img, center=100, width=101)
    # DICOM linear VOI: lo = 100 - 0.5 - 50 = 49.5, hi = 149.5
    assert out.tolist() == [[0, 1], [129, 255]]  # (100 - 49.5) / 100 * 255 = 128.8
    assert window_image(img, bit_depth=16, percentiles=(0, 100)).tolist() == [[0, 16384], [32768, 65535]]
    with pytest.raises(ValueError, match="both"):
        window_image(img, center=1)


def test_refinement_moves_to_the_canal_slice():
    rng = np.random.default_rng(1)
    vol = rng.normal(100, 5, size=(11, 40, 30)).astype(np.float32)  # i = lateral
    vol[6, 14:16, 4:28] = 400.0  # a long bright superior-inferior (vertical) column, one slice off centre
    v = Volume(vol, BASE_AFFINE)
    assert mid_sagittal(v).index == 5
    refined = mid_sagittal(v, refine=True)
    assert refined.index == 6
    far = mid_sagittal(v, refine=True, max_shift_mm=0.5)  # less than one 0.9 mm slice: stays
    assert far.index == 5
