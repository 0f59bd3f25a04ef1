"""Tests of the synthetic lumbar phantom: frequencies, geometry, contrast, exports, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from welde_det.classes import LUMBAR_CLASSES, ClassStats
from welde_det.datasets.phantom import (
    DEFAULT_FREQUENCIES,
    generate_study,
    make_phantom_dataset,
    phantom_cache_dir,
    resolve_frequencies,
    solve_plan,
)
from welde_det.datasets.phantom.findings import P_TOP
from welde_det.datasets.phantom.writers import crop_box, write_dicom_series, write_nifti

NAMES = list(LUMBAR_CLASSES)


# ---------------------------------------------------------------------------- frequencies


def test_plan_expected_counts_equal_targets_exactly():
    for freqs in (DEFAULT_FREQUENCIES, resolve_frequencies({"Normal_IVD": 5, "LDB": 2, "SS": 2, "DDD": 1,
                                                           "TDB": 0.3, "Spondylolisthesis": 0.4})):
        plan = solve_plan(freqs)
        expected = plan.expected_counts()
        np.testing.assert_allclose(expected / expected.sum(), freqs, atol=1e-9)
        assert expected.sum() == pytest.approx(plan.boxes_per_image)
        for probs in plan.disc_probs.values():
            assert min(probs) >= 0 and sum(probs) == pytest.approx(1.0)
    # the public set: 8991 boxes on 1038 images = 8.66 per image
    assert solve_plan(DEFAULT_FREQUENCIES).boxes_per_image == pytest.approx((6 + P_TOP) / 0.772, rel=2e-3)
    # TDB only at the thoracic levels, LDB never there
    plan = solve_plan(DEFAULT_FREQUENCIES)
    for level, (_, ldb, _, tdb) in plan.disc_probs.items():
        if level in ("T11-T12", "T12-L1"):
            assert ldb == 0 and tdb > 0
        else:
            assert tdb == 0 and ldb > 0


def test_class_frequencies_over_500_studies_within_1_5_points():
    counts = np.zeros(len(NAMES))
    per_image = []
    for seed in range(500):
        study = generate_study(seed, render=False)
        counts += np.bincount(study.labels, minlength=len(NAMES))
        per_image.append(len(study.labels))
    freq = counts / counts.sum()
    for name, got, want in zip(NAMES, freq, DEFAULT_FREQUENCIES):
        assert abs(got - want) <= 0.015, f"{name}: {100 * got:.2f}% vs target {100 * want:.2f}%"
    assert 8.0 <= np.mean(per_image) <= 9.0
    assert counts[NAMES.index("TDB")] > 0 and counts[NAMES.index("Spondylolisthesis")] > 0


def test_custom_frequencies_are_followed():
    target = resolve_frequencies({"Normal_IVD": 40, "LDB": 20, "SS": 20, "DDD": 12, "TDB": 4,
                                  "Spondylolisthesis": 4})
    counts = np.zeros(len(NAMES))
    for seed in range(300):
        counts += np.bincount(generate_study(seed, render=False, class_frequencies=target).labels,
                              minlength=len(NAMES))
    np.testing.assert_allclose(counts / counts.sum(), target, atol=0.015)


def test_bad_frequencies_and_arguments_raise():
    with pytest.raises(ValueError, match="unknown classes"):
        resolve_frequencies({"Herniation": 1.0})
    with pytest.raises(ValueError, match="need 6"):
        resolve_frequencies([1, 2, 3])
    with pytest.raises(ValueError, match="not all zero"):
        resolve_frequencies([0] * 6)
    with pytest.raises(ValueError, match="not reachable"):
        solve_plan(resolve_frequencies({"SS": 0.9, "Normal_IVD": 0.1}))
    with pytest.raises(ValueError, match="seed"):
        generate_study(-1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_study(0, difficulty=1.5)
    with pytest.raises(ValueError, match="contrast"):
        generate_study(0, contrast="pd")


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_boxes_inside_image_and_centred_on_their_structure(difficulty):
    seen = set()
    for seed in range(40):
        study = generate_study(seed, difficulty=difficulty, render=False)
        h, w = study.image_size
        assert len(study.boxes) == len(study.labels) == len(study.structures)
        assert np.all(study.boxes[:, 0] >= 0) and np.all(study.boxes[:, 1] >= 0)
        assert np.all(study.boxes[:, 2] <= w) and np.all(study.boxes[:, 3] <= h)
        assert np.all(study.boxes[:, 2] - study.boxes[:, 0] > 5)
        assert np.all(study.boxes[:, 3] - study.boxes[:, 1] > 3)
        for box, label, mask, struct in zip(study.boxes, study.labels, study.box_masks(), study.structures):
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            assert mask[cy, cx], f"seed {seed}: centre of {NAMES[label]} box not on {struct}"
            # the box is the structure's extent: it covers its mask
            _ys, xs = np.nonzero(mask)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1
            seen.add(NAMES[label])
            if NAMES[label] in ("TDB",):
                assert struct in ("disc_T11-T12", "disc_T12-L1")
            if NAMES[label] == "SS":
                assert struct.startswith("canal_L") or struct == "canal_L5-S1"
    assert {"Normal_IVD", "LDB", "SS", "DDD"} <= seen


def test_difficulty_moves_findings_towards_look_alikes():
    def collect(d):
        bulge, t2, height, slip = [], [], [], []
        for seed in range(150):
            f = generate_study(seed, difficulty=d, render=False).findings
            for level, label in f.disc_labels.items():
                par = f.levels[level]
                if label == "LDB":
                    bulge.append(par["bulge_mm"])
                if label == "DDD":
                    t2.append(par["nucleus_t2"])
                    height.append(par["height_factor"])
            if f.spondy is not None:
                slip.append(f.levels[{"L3": "L3-L4", "L4": "L4-L5", "L5": "L5-S1"}[f.spondy]]["slip_mm"])
        return np.mean(bulge), np.mean(t2), np.mean(height), np.mean(slip)

    easy, hard = collect(0.0), collect(1.0)
    assert easy[0] > 2 * hard[0]          # LDB bulge shrinks towards the normal 0-1 mm
    assert easy[1] < 0.5 * hard[1]        # DDD signal rises towards normal
    assert easy[2] < hard[2]              # DDD height loss shrinks
    assert easy[3] > 2.5 * hard[3]        # slips shrink towards alignment noise


# ---------------------------------------------------------------------------- images


def _eroded(mask, px=3):
    return cv2.erode(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


def test_t2_disc_brighter_than_vertebra_and_t1_darker():
    ratios = {"t1": [], "t2": []}
    for seed in range(6):
        study = generate_study(seed, difficulty=0.5, contrast="both", volume=False)
        for contrast in ("t1", "t2"):
            img = study.series[contrast].mid_slice.astype(np.float64)
            for level, label in study.findings.disc_labels.items():
                if label != "Normal_IVD" or level in ("T11-T12", "T12-L1"):
                    continue
                disc = _eroded(study.masks[f"disc_{level}"], 2)
                upper = level.split("-")[0]
                body = _eroded(study.masks[f"body_{upper}"], 4)
                if disc.sum() > 20 and body.sum() > 50:
                    ratios[contrast].append(img[disc].mean() / img[body].mean())
    assert len(ratios["t2"]) >= 10
    assert np.median(ratios["t2"]) > 1.2 and min(ratios["t2"]) > 1.0
    assert np.median(ratios["t1"]) < 0.8 and max(ratios["t1"]) < 1.0


def test_determinism_and_lateral_slices_differ():
    a = generate_study(11, contrast="both")
    b = generate_study(11, contrast="both")
    c = generate_study(12, contrast="both")
    for k in ("t1", "t2"):
        np.testing.assert_array_equal(a.series[k].volume, b.series[k].volume)
        np.testing.assert_array_equal(a.series[k].affine, b.series[k].affine)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.series["t2"].mid_slice, c.series["t2"].mid_slice)
    vol = a.series["t2"].volume.astype(np.float64)
    n = vol.shape[0]
    assert 9 <= n <= 15 and vol.shape[1:] == (384, 384)
    mid = a.series["t2"].mid_index
    np.testing.assert_array_equal(a.series["t2"].mid_slice, a.series["t2"].volume[mid])
    corr_lateral = np.corrcoef(vol[mid].ravel(), vol[0].ravel())[0, 1]
    corr_neighbour = np.corrcoef(vol[mid].ravel(), vol[mid + 1].ravel())[0, 1]
    assert corr_lateral < corr_neighbour < 0.999
    # the canal (CSF, bright on T2) is in the mid slice but not in the most lateral one
    canal = a.masks[next(s for s in a.polygons if s.startswith("canal_L3"))]
    assert vol[mid][canal].mean() > 1.3 * vol[0][canal].mean()
    # acquisition geometry: sagittal, 3-4 mm slices, 0.5-0.9 mm pixels
    aff = a.affine
    assert abs(aff[0, 0]) >= 3.0 and abs(aff[0, 0]) <= 4.6
    assert 0.45 <= a.pixel_spacing[1] <= a.pixel_spacing[0] <= 0.95


def test_crop_box_keeps_centre_and_size():
    img = np.zeros((100, 100), np.uint8)
    img[40:60, 30:70] = 200
    crop = crop_box(img, np.array([30.0, 40.0, 70.0, 60.0]), size=32, context=1.0)
    assert crop.shape == (32, 32)
    # 40 mm side, box 40 x 20: rows 8..24 bright, all columns
    assert crop[16, :].min() > 150 and crop[2, 16] < 20 and crop[29, 16] < 20


# ---------------------------------------------------------------------------- DICOM / NIfTI


def _canonical(path):
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_dicom_series_reads_back_as_the_nifti_voxels(tmp_path):
    import pydicom

    study = generate_study(5, contrast="t2", matrix=192)
    files = write_dicom_series(tmp_path / "dicom", study, "t2", series_number=2)
    nii = write_nifti(tmp_path / "ref.nii.gz", study.series["t2"])
    assert len(files) == study.volume.shape[0]
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    assert [round(float(v)) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert str(ds.PatientName) == study.patient["PatientName"] and ds.PatientBirthDate
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == len(files)
    np.testing.assert_array_equal(pydicom.dcmread(files[3]).pixel_array, study.volume[3])
    out = tmp_path / "conv"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "conv", "-o", str(out), str(tmp_path / "dicom")],
                   check=True, capture_output=True)
    got, got_aff = _canonical(out / "conv.nii")
    ref, ref_aff = _canonical(nii)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got_aff, ref_aff, atol=1e-3)


def test_dicom_reads_back_through_welde_det_io(tmp_path):
    io = pytest.importorskip("welde_det.io")
    if not hasattr(io, "read_volume"):
        pytest.skip("welde_det.io.read_volume has not landed yet")
    study = generate_study(6, contrast="t1", matrix=160)
    write_dicom_series(tmp_path / "dicom", study, "t1", series_number=1)
    write_nifti(tmp_path / "ref.nii.gz", study.series["t1"])
    a = io.read_volume(tmp_path / "dicom")
    b = io.read_volume(tmp_path / "ref.nii.gz")
    # the two files may store the axes in different orders: compare voxel by voxel in the world
    to_b = np.linalg.inv(np.asarray(b.affine)) @ np.asarray(a.affine)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in a.shape), indexing="ij"), -1).reshape(-1, 3)
    b_ijk = ijk @ to_b[:3, :3].T + to_b[:3, 3]
    assert np.abs(b_ijk - np.rint(b_ijk)).max() < 1e-3
    r = np.rint(b_ijk).astype(int)
    np.testing.assert_array_equal(np.asarray(a.array).reshape(-1), np.asarray(b.array)[r[:, 0], r[:, 1], r[:, 2]])


# ---------------------------------------------------------------------------- datasets


def test_dataset_exports_coco_yolo_crops_and_caches(tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "ph"
    ds = make_phantom_dataset(out, 7, seed=3, difficulty=0.5, contrast="both", workers=1, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["n_images"] == 14 and man["params"]["seed"] == 3
    total = 0
    for split in ("train", "val", "test"):
        coco = COCO(str(ds.annotations(split)))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
        for img in coco.dataset["images"]:
            assert (ds.images_dir / img["file_name"]).is_file()
            assert img["width"] == img["height"] == 384
        total += len(coco.dataset["annotations"])
        # patient-level: both contrasts of a study in the same split
        studies = [img["study_id"] for img in coco.dataset["images"]]
        assert all(studies.count(s) == 2 for s in studies)
    assert total == sum(sum(v["boxes"].values()) for v in man["splits"].values())
    crops = np.load(ds.crops)
    assert sorted(crops.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
    assert crops["train_images"].shape[1:] == (64, 64) and crops["train_images"].dtype == np.uint8
    assert crops["train_labels"].shape == (len(crops["train_images"]), 1)
    assert len(crops["train_images"]) + len(crops["val_images"]) + len(crops["test_images"]) == total
    stats = ds.class_stats
    assert isinstance(stats, ClassStats) and list(stats.names) == NAMES
    assert list(stats.instance_counts) == [man["splits"]["train"]["boxes"][n] for n in NAMES] or stats.floor == 1
    assert ds.data_yaml.is_file() and "names" in ds.data_yaml.read_text()
    assert len(list((out / "dicom").rglob("*.dcm"))) > 0 and len(list((out / "nifti").glob("*.nii.gz"))) == 14
    # cache hit: nothing is rewritten
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = make_phantom_dataset(out, 7, seed=3, difficulty=0.5, contrast="both", workers=1, progress=False)
    assert again.root == ds.root and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other parameters"):
        make_phantom_dataset(out, 8, seed=3, workers=1, progress=False)


def test_dataset_fast_path_and_process_pool_match(tmp_path):
    kw = dict(seed=1, difficulty=0.2, contrast="t2", formats=("coco", "crops"), progress=False)
    a = make_phantom_dataset(tmp_path / "a", 4, workers=1, **kw)
    b = make_phantom_dataset(tmp_path / "b", 4, workers=2, **kw)
    assert not (tmp_path / "a" / "dicom").exists() and not (tmp_path / "a" / "yolo").exists()
    for split in ("train", "val", "test"):
        ja = json.loads(a.annotations(split).read_text())
        jb = json.loads(b.annotations(split).read_text())
        assert ja["annotations"] == jb["annotations"]
    ca, cb = np.load(a.crops), np.load(b.crops)
    np.testing.assert_array_equal(ca["train_images"], cb["train_images"])
    assert phantom_cache_dir(tmp_path, 4, **{k: v for k, v in kw.items() if k != "progress"}) != \
        phantom_cache_dir(tmp_path, 5, **{k: v for k, v in kw.items() if k != "progress"})


def test_dataset_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_studies"):
        make_phantom_dataset(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="unknown format"):
        make_phantom_dataset(tmp_path / "x", 2, formats=("coco", "mp4"))
    with pytest.raises(ValueError, match="add 'coco'"):
        make_phantom_dataset(tmp_path / "x", 2, formats=("yolo",))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a phantom dataset"):
        make_phantom_dataset(tmp_path / "busy", 2, workers=1, progress=False)


def test_make_phantom_tool_end_to_end(tmp_path):
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "make_phantom.py"
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(tool), "--out", str(out), "--n-studies", "3", "--contrast", "t1",
                          "--formats", "coco", "crops", "--workers", "1", "--difficulty", "0.8",
                          "--frequencies", '{"Normal_IVD": 0.5, "LDB": 0.2, "SS": 0.2, "DDD": 0.1}'],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == str(out.absolute())
    man = json.loads((out / "manifest.json").read_text())
    assert man["params"]["difficulty"] == 0.8 and man["params"]["contrast"] == "t1"
    assert man["params"]["class_frequencies"]["TDB"] == 0.0 and man["n_images"] == 3
    bad = subprocess.run([sys.executable, str(tool), "--n-studies", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--out" in bad.stderr
