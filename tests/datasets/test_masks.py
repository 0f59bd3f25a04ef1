"""NIfTI label masks -> boxes: label maps, per-label/per-component boxes, display orientation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from welde_det.datasets.coco import load_coco
from welde_det.datasets.sources.common import ConversionError, UnknownClassError, slice_like
from welde_det.datasets.sources.masks import (
    SPIDER_LABEL_MAP,
    convert_masks,
    mask_boxes,
    parse_label_map,
)

KEY = "mask-test-key"





def _reoriented(array, affine, perm, flips):
    """The same image stored with permuted/flipped voxel axes (and the matching affine)."""
    out = np.transpose(array, perm)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for new_ax, old_ax in enumerate(perm):
        n = array.shape[old_ax]
        if flips[new_ax]:
            out = np.flip(out, axis=new_ax)
            m[old_ax, new_ax] = -1
            m[old_ax, 3] = n - 1
        else:
            m[old_ax, new_ax] = 1
    return np.ascontiguousarray(out), affine @ m


def _ras_volume():
    """(x=R, y=A, z=S) volume with a block near superior-anterior and one near inferior-posterior."""
    arr = np.zeros((7, 20, 30), np.int16)
    arr[3, 15:18, 24:28] = 2  # anterior, superior
    arr[3, 2:4, 3:5] = 1  # posterior, inferior
    affine = np.diag([1.5, 0.8, 0.6, 1.0])
    affine[:3, 3] = [-5, -8, -9]
    return arr, affine


def test_slice_like_matches_mid_sagittal_in_all_48_orientations():
    from welde_det.io import Volume, mid_sagittal

    arr, affine = _ras_volume()
    want = mid_sagittal(Volume(arr.astype(np.float32), affine)).image
    rows, cols = np.nonzero(want == 2)
    # superior block (z 24..27) at the top rows, anterior block (y 15..17) at the left columns
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (29 - 27, 29 - 24, 19 - 17, 19 - 15)
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            arr2, aff2 = _reoriented(arr, affine, perm, flips)
            labels2 = (arr2 == 2).astype(np.int64) * 7  # a label volume on the same grid
            sag = mid_sagittal(Volume(arr2.astype(np.float32), aff2))
            np.testing.assert_array_equal(slice_like(arr2, sag), sag.image)
            np.testing.assert_array_equal(slice_like(labels2, sag) == 7, want == 2)
            assert sag.pixel_spacing == pytest.approx((0.6, 0.8))
            other = 1 if not flips[perm.index(0)] else arr.shape[0] - 2  # physical slice x index 1
            np.testing.assert_array_equal(slice_like(arr2, sag, other), np.zeros_like(want))
    with pytest.raises(ConversionError, match="outside"):
        slice_like(arr, mid_sagittal(Volume(arr.astype(np.float32), affine)), 7)


def test_parse_label_map_ranges_and_errors():
    values, names = parse_label_map("spider")
    assert names == ["vertebra", "spinal_canal", "disc"]
    assert values[1] == values[25] == "vertebra" and values[100] == "spinal_canal" and values[212] == "disc"
    assert 26 not in values
    values, names = parse_label_map({"1-2": "a", 5: None, "7": "b"})
    assert values == {1: "a", 2: "a", 5: None, 7: "b"} and names == ["a", "b"]
    with pytest.raises(ConversionError, match="mapped twice"):
        parse_label_map({"1-3": "a", "3": "b"})
    with pytest.raises(ConversionError, match="not an integer"):
        parse_label_map({"one": "a"})
    with pytest.raises(ConversionError, match="background"):
        parse_label_map({"0-2": "a"})
    assert SPIDER_LABEL_MAP["100"] == "spinal_canal"


def test_mask_boxes_per_label_and_component():
    mask = np.zeros((10, 12), np.int64)
    mask[1:3, 2:5] = 3  # rows 1-2, cols 2-4
    mask[6:9, 8:10] = 3  # second component of the same label
    mask[5, 0] = 9  # ignored label (mapped to None)
    vmap = {3: "disc", 9: None}
    (box,) = mask_boxes(mask, vmap, per="label")
    assert box.class_name == "disc" and box.bbox == (2.0, 1.0, 8.0, 8.0) and box.extra == {"label_value": 3}
    boxes = mask_boxes(mask, vmap, per="component")
    assert sorted(b.bbox for b in boxes) == [(2.0, 1.0, 3.0, 2.0), (8.0, 6.0, 2.0, 3.0)]
    assert len(mask_boxes(mask, vmap, per="component", min_pixels=7)) == 0
    mask[0, 0] = 4
    with pytest.raises(UnknownClassError, match=r"m\.nii\.gz: label value 4 is not in the label map"):
        mask_boxes(mask, vmap, source="m.nii.gz")


def _write_case(folder, name, arr, affine, labels):
    nib = pytest.importorskip("nibabel")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(folder / "images" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), str(folder / "masks" / f"{name}.nii.gz"))


def _spider_like():
    """Sagittal-ish volume with a vertebra (label 5), a disc (205) and the canal (100) on the mid slice."""
    arr = np.random.default_rng(0).normal(100, 10, (9, 24, 32))
    labels = np.zeros(arr.shape, np.int16)
    labels[4, 14:20, 10:16] = 5  # y (A) 14..19, z (S) 10..15
    labels[4, 14:20, 17:19] = 205
    labels[4, 4:7, 5:25] = 100
    labels[1, 2:4, 2:4] = 7  # off the mid slice: must not appear
    affine = np.diag([2.0, 0.5, 0.5, 1.0])
    return arr, affine, labels


def test_convert_masks_end_to_end(tmp_path, pycocotools_check):
    arr, affine, labels = _spider_like()
    src = tmp_path / "spider"
    for case in ("12_t1", "12_t2", "13_t1"):
        _write_case(src, case, arr, affine, labels)
    res = convert_masks(src, tmp_path / "out", key=KEY, label_map="spider", patient_pattern=r"^(\d+)_",
                        fractions={"train": 0.5, "val": 0.5}, yolo=True)
    coco = load_coco(res.coco)
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 9
    assert len({img["patient_id"] for img in coco["images"]}) == 2
    names = {c["id"]: c["name"] for c in coco["categories"]}
    img = coco["images"][0]
    assert img["slice_index"] == 4 and img["slice_axis"] == 0 and img["pixel_spacing"] == [0.5, 0.5]
    assert (img["width"], img["height"]) == (24, 32)
    got = {names[a["category_id"]]: a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]}
    # rows: z flipped (row = 31 - z), columns: y flipped (col = 23 - y)
    assert got["vertebra"] == [23 - 19, 31 - 15, 6, 6]
    assert got["disc"] == [23 - 19, 31 - 18, 6, 2]
    assert got["spinal_canal"] == [23 - 6, 31 - 24, 3, 20]
    for split in res.splits.values():
        part = json.loads(split.read_text())
        assert len({i["patient_id"] for i in part["images"]}) <= 1  # 2 patients, 2 splits: never mixed
    pycocotools_check(res.coco, *res.splits.values())


def test_convert_masks_bad_input(tmp_path):
    arr, affine, labels = _spider_like()
    src = tmp_path / "src"
    _write_case(src, "a", arr, affine, labels)
    with pytest.raises(UnknownClassError, match=r"a\.nii\.gz: label value 5"):
        convert_masks(src, tmp_path / "out", key=KEY, label_map={"100": "canal", "201-225": "disc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (src / "masks" / "a.nii.gz").unlink()
    with pytest.raises(ConversionError, match="no partner"):
        convert_masks(src, tmp_path / "out", key=KEY)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(ConversionError, match=r"no \.nii"):
        convert_masks(empty, tmp_path / "out", key=KEY)
    assert not (tmp_path / "out").exists()


def test_convert_masks_without_a_single_box_is_an_error(tmp_path):
    """Masks that are background on every mid slice give no boxes: a DataError naming the
    converter, nothing written (the rule every converter shares, in write_dataset)."""
    from welde_det.datasets.resolve import DataError

    arr, affine, labels = _spider_like()
    labels[4] = 0  # only the off-mid-slice label remains
    src = tmp_path / "src"
    _write_case(src, "a", arr, affine, labels)
    with pytest.raises(DataError, match=r"the converted dataset has no boxes \(1 image\(s\), 0 boxes\)"):
        convert_masks(src, tmp_path / "out", key=KEY, label_map="spider")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
