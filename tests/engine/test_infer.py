"""Inference: checkpoint dispatch, inputs (DICOM, NIfTI, PNG), world coordinates, overlays, bad input, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.io.dicom_factory import ORIENTATIONS, affine_from_dirs, write_series
from welde_det.checkpoint import CheckpointError, UnsafeCheckpointError, save_checkpoint
from welde_det.classes import LUMBAR_CLASSES, LUMBAR_COUNTS, ClassStats
from welde_det.engine.config import config_to_dict, load_config
from welde_det.engine.infer import (
    Detector,
    InferenceInputError,
    collect_inputs,
    load_detector,
    read_input,
    run_inference,
)
from welde_det.integrations.detectors import RCNNDetector
from welde_det.io import mid_sagittal, read_volume
from welde_det.viz import class_colour, draw_detections

ROOT = Path(__file__).resolve().parents[2]
STATS = ClassStats.from_counts(LUMBAR_CLASSES, LUMBAR_COUNTS)
KEY = "test-infer-key"


@pytest.fixture(autouse=True)
def _deid_key(monkeypatch):
    """Outputs are named by keyed pseudonyms: a fixed key (never the user's key file)."""
    monkeypatch.setenv("WELDE_DEID_KEY", KEY)


def _outputs(folder: Path) -> dict[str, dict]:
    """The JSON records of an inference output folder, by kind of input."""
    return {json.loads(p.read_text())["kind"]: json.loads(p.read_text()) for p in folder.glob("*.json")}


class FixedDetector(Detector):
    """Known boxes (pixel coordinates relative to the image size), no model."""

    framework = "fixed"

    def __init__(self, boxes):
        super().__init__(STATS, channels=1, imgsz=128)
        self.boxes = boxes

    def predict(self, image, conf=0.25):
        h, w = image.shape
        out = []
        for (fx1, fy1, fx2, fy2), c, s in self.boxes:
            if s >= conf:
                out.append({"bbox": [fx1 * w, fy1 * h, fx2 * w, fy2 * h], "score": s, "class_index": c,
                            "class_name": self.names[c]})
        return out


FIXED = FixedDetector([((0.25, 0.3, 0.6, 0.7), 1, 0.9), ((0.1, 0.1, 0.3, 0.2), 5, 0.5)])  # Normal_IVD, TDB


@pytest.fixture(scope="module")
def rcnn_ckpt(tmp_path_factory):
    """A random-init Faster R-CNN checkpoint in the one schema, built as the rcnn backend builds it."""
    from welde_det.engine.backends.base import welde_spec
    from welde_det.integrations.rcnn import build_rcnn_model

    cfg = load_config(ROOT / "configs" / "rcnn_ce.yaml", ["imgsz=128"])
    spec = welde_spec(cfg, cfg.components, "single", "softmax")
    torch.manual_seed(0)
    model = build_rcnn_model(cfg.model.arch, list(STATS.effective_counts), spec.to_dict(), channels=1, imgsz=128)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, framework="rcnn", arch=cfg.model.arch, model_state=model.state_dict(),
                    class_stats=STATS.to_dict(), config=config_to_dict(cfg), stage="train", welde=spec.to_dict(),
                    epoch=0, extra={"channels": 1, "imgsz": 128})
    return path


def _sagittal_series(folder: Path) -> Path:
    i, j, k = np.meshgrid(np.arange(40), np.arange(48), np.arange(5), indexing="ij")
    vol = (200 + 5 * i + 9 * j + 40 * k).astype(np.float32)
    vol[10:30, 12:36, 2] += 400
    affine = affine_from_dirs(ORIENTATIONS["sagittal"], (0.8, 0.9, 3.5), (-7.0, 60.0, 40.0))
    write_series(folder, vol, affine)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A folder holding a DICOM series sub-folder, a NIfTI volume and an 8-bit PNG."""
    import nibabel as nib

    base = tmp_path_factory.mktemp("src")
    _sagittal_series(base / "study_dcm")
    rng = np.random.default_rng(0)
    nii = rng.integers(0, 1000, (9, 50, 44)).astype(np.int16)
    affine = np.array([[1.2, 0, 0, -5], [0, 0, -0.7, 30], [0, -0.75, 0, 20], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(nii, affine), base / "vol.nii.gz")
    png = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (60, 1))
    cv2.imwrite(str(base / "slice.png"), png)
    return base


def test_detector_interface_and_rcnn_predictions(rcnn_ckpt):
    det = load_detector(rcnn_ckpt, "cpu")
    assert isinstance(det, RCNNDetector)
    assert det.names == list(LUMBAR_CLASSES) and det.tail == list(STATS.tail_names)
    assert (det.channels, det.imgsz, det.weights) == (1, 128, rcnn_ckpt)
    batch = det.predict_batch([np.zeros((96, 112), np.uint16), np.zeros((96, 112), np.uint16)], conf=0.0)
    assert len(batch) == 2 and batch[0] == batch[1]
    image = (np.random.default_rng(1).random((96, 112)) * 65535).astype(np.uint16)
    dets = det.predict(image, conf=0.0)
    assert dets, "a random model still proposes boxes at conf 0"
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)
    for d in dets:
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 <= x2 <= 112 and 0 <= y1 <= y2 <= 96  # input pixels, not the resized 128
        assert d["class_name"] == LUMBAR_CLASSES[d["class_index"]]
    high = det.predict(image, conf=0.5 * (scores[0] + scores[-1]))
    assert 0 < len(high) < len(dets) and all(d["score"] >= 0.5 * (scores[0] + scores[-1]) for d in high)
    with pytest.raises(ValueError, match="2D slice"):
        det.predict(image[None], conf=0.0)


def test_checkpoint_dispatch_errors(tmp_path, rcnn_ckpt):
    other = list(LUMBAR_CLASSES[:5])
    with pytest.raises(ValueError, match="another class list") as exc:
        load_detector(rcnn_ckpt, "cpu", expected_names=other)
    assert str(other) in str(exc.value) and str(list(LUMBAR_CLASSES)) in str(exc.value)
    torch.save({"model": {}, "epoch": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"not a welde_det checkpoint"):
        load_detector(tmp_path / "plain.pt", "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_detector(tmp_path / "junk.pt", "cpu")
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this runs ``os.system``: the classic planted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_is_refused_by_every_loader_and_never_runs(tmp_path):
    """load_detector, tools/infer.py, tools/evaluate.py --weights, model.weights (YOLO and Faster R-CNN)."""
    from welde_det.engine.evaluate import evaluate_checkpoint
    from welde_det.engine.run import run_training
    from welde_det.integrations.yolo import load_init_model

    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    torch.save({"schema": "welde_det.checkpoint/1", "framework": "rcnn", "model_state": _Payload(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_detector(bad, "cpu")
    with pytest.raises(UnsafeCheckpointError):
        evaluate_checkpoint(bad, tmp_path, tmp_path / "rep")
    with pytest.raises(UnsafeCheckpointError):
        load_init_model(bad)
    for config in ("rcnn_ce", "yolo_ce"):
        with pytest.raises(UnsafeCheckpointError):
            run_training(ROOT / "configs" / f"{config}.yaml", [
                f"model.weights={bad}", "epochs=1", "n_images=6", "imgsz=64", "class_floor=1", "workers=0",
                f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    png = tmp_path / "s.png"
    cv2.imwrite(str(png), np.zeros((32, 32), np.uint8))
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), "--weights", str(bad), "--source",
                          str(png), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and "system" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()  # the payload never ran


def test_a_planted_file_is_refused_by_the_classifier_loaders(tmp_path):
    """The classifier's backbone weights (model.weights) and a classifier checkpoint through the registry."""
    from welde_det.integrations.classify import build_backbone
    from welde_det.integrations.registry import load_model

    marker = tmp_path / "pwned"
    bad = tmp_path / "backbone.pt"
    torch.save({"state_dict": _Payload(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        build_backbone("small_cnn", 1, bad)
    ckpt = tmp_path / "model.pt"
    torch.save({"schema": "welde_det.checkpoint/1", "framework": "classify", "model_state": _Payload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_model(ckpt, "cpu")
    assert not marker.exists()  # the payload never ran


def test_inputs_of_a_folder_and_their_slices(sources):
    inputs = collect_inputs(sources)
    assert [p.name for p in inputs] == ["slice.png", "study_dcm", "vol.nii.gz"]
    assert collect_inputs(sources / "study_dcm") == [sources / "study_dcm"]
    dcm = read_input(sources / "study_dcm")
    assert dcm.kind == "dicom" and dcm.image.dtype == np.uint8 and dcm.image.shape == (48, 40)
    assert dcm.window == {"percentiles": [0.5, 99.5]}
    one_file = read_input(sorted((sources / "study_dcm").iterdir())[0])
    assert one_file.kind == "dicom" and one_file.image.shape == (48, 40)
    nii = read_input(sources / "vol.nii.gz")
    assert nii.kind == "nifti" and nii.image.shape == (50, 44) and nii.slice.index == 4
    png = read_input(sources / "slice.png")
    assert png.kind == "image2d" and png.image.dtype == np.uint8
    np.testing.assert_array_equal(png.image, cv2.imread(str(sources / "slice.png"), cv2.IMREAD_UNCHANGED))


def test_one_png_and_json_per_input_with_world_coordinates(tmp_path, sources):
    summary = run_inference(FIXED, sources, tmp_path / "out", conf=0.25)
    recs = _outputs(tmp_path / "out")
    assert sorted(recs) == ["dicom", "image2d", "nifti"]
    # named by keyed pseudonyms, never by the input's name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{r['source']}.{ext}" for r in recs.values() for ext in ("json", "png"))
    assert all(len(r["source"]) == 16 and int(r["source"], 16) >= 0 for r in recs.values())
    assert summary.num_inputs == 3 and summary.num_detections == 6
    rec = recs["dicom"]
    assert rec["source"] == rec["provenance"]["series_uid"] and rec["image_size"] == {"height": 48, "width": 40}
    assert rec["class_names"] == list(LUMBAR_CLASSES) and rec["tail_classes"] == list(STATS.tail_names)
    assert rec["slice"]["index"] == 2 and rec["slice"]["pixel_spacing"] == pytest.approx([0.9, 0.8])
    d = rec["detections"][0]
    assert d["bbox_xyxy"] == pytest.approx([10.0, 14.4, 24.0, 33.6]) and d["class_name"] == "Normal_IVD"
    sl = mid_sagittal(read_volume(sources / "study_dcm"))
    assert rec["slice"]["world_x"] == pytest.approx(sl.world_x)
    x1, y1, x2, y2 = d["bbox_xyxy"]
    assert d["world"]["top_left"] == pytest.approx(sl.pixel_to_world(y1 - 0.5, x1 - 0.5).tolist())
    assert d["world"]["bottom_right"] == pytest.approx(sl.pixel_to_world(y2 - 0.5, x2 - 0.5).tolist())
    # by hand: display column c is voxel i = c (anterior left = i increasing posterior), row r is j = r,
    # slice k = 2; RAS = origin + i*0.8*(0,-1,0) + j*0.9*(0,0,-1) + k*3.5*(1,0,0)
    assert d["world"]["top_left"] == pytest.approx([-7.0 + 2 * 3.5, 60.0 - 9.5 * 0.8, 40.0 - 13.9 * 0.9])
    assert d["world"]["centre"] == pytest.approx([0.0, 60.0 - 16.5 * 0.8, 40.0 - 23.5 * 0.9])
    flat = recs["image2d"]
    assert flat["slice"]["index"] is None and "no patient geometry" in flat["slice"]["note"]
    assert flat["detections"][0]["world"]["top_left"] == pytest.approx([16.0, 18.0])  # 1 mm pixels
    assert [x["tail"] for x in flat["detections"]] == [False, True]


def test_boxes_are_drawn_in_class_colours(tmp_path):
    image = np.full((100, 120), 128, np.uint8)
    dets = [{"bbox": [20, 30, 70, 80], "score": 0.8, "class_index": 1, "class_name": "Normal_IVD"},
            {"bbox": [80, 10, 110, 40], "score": 0.4, "class_index": 5, "class_name": "TDB"}]
    layout = draw_detections(image, dets, list(LUMBAR_CLASSES), ["TDB"], tmp_path / "o.png", title="t")
    out = cv2.imread(str(layout.path))[:, :, ::-1]  # RGB
    assert out.shape[:2] == layout.size[::-1] and layout.scale == 5
    x, y = layout.to_output(20, 60)  # left edge of the solid box
    expected = tuple(int(class_colour(1)[i:i + 2], 16) for i in (1, 3, 5))
    assert np.abs(out[y, x].astype(int) - expected).max() <= 40
    gx, gy = layout.to_output(45, 60)  # inside the box: untouched grey
    assert tuple(out[gy, gx]) == (128, 128, 128)
    edge = out[layout.to_output(80, 10)[1]:layout.to_output(80, 40)[1], layout.to_output(80, 10)[0]]
    coloured = np.ptp(edge.astype(int), axis=1) > 30
    assert 0.3 < coloured.mean() < 0.95  # dashed: the tail box's edge has gaps


def test_bad_inputs_fail_before_writing(tmp_path, sources):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "good.png").write_bytes((sources / "slice.png").read_bytes())
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[..., 2] = 200
    cv2.imwrite(str(src / "photo.png"), colour)
    cv2.imwrite(str(src / "line.png"), np.zeros((1, 64), np.uint8))
    (src / "broken.nii").write_bytes(b"\0" * 10)
    out = tmp_path / "out"
    with pytest.raises(InferenceInputError) as exc:
        run_inference(FIXED, src, out)
    msg = str(exc.value)
    assert "3 of 4" in msg and "--skip-bad" in msg
    assert "photo.png" in msg and "colour" in msg and "line.png" in msg and "broken.nii" in msg
    assert not out.exists()
    with pytest.raises(InferenceInputError, match="grey 2D slice"):
        run_inference(FIXED, src / "photo.png", out)
    assert not out.exists()
    summary = run_inference(FIXED, src, out, skip_bad=True)
    (good,) = out.glob("*.json")
    assert sorted(p.name for p in out.iterdir()) == [good.name, good.with_suffix(".png").name]
    assert "good" not in good.name
    assert sorted(p.name for p, _ in summary.skipped) == ["broken.nii", "line.png", "photo.png"]


def test_failure_while_rendering_writes_nothing(tmp_path, sources, monkeypatch):
    import welde_det.viz.overlay as overlay

    real = overlay.render_detections
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(overlay, "render_detections", flaky)
    with pytest.raises(RuntimeError):
        run_inference(FIXED, sources, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unique_output_names(tmp_path, sources):
    src = tmp_path / "dup"
    src.mkdir()
    for name in ("a.png", "a.jpg", "a b.png"):
        cv2.imwrite(str(src / name), cv2.imread(str(sources / "slice.png")))
    run_inference(FIXED, src, tmp_path / "out")
    names = sorted(p.stem for p in (tmp_path / "out").glob("*.json"))
    assert len(names) == 3 and not any(n == "a" or " " in n for n in names)
    sources_seen = {json.loads(p.read_text())["source"] for p in (tmp_path / "out").glob("*.json")}
    assert sources_seen == set(names)
    # the same input gets the same name under the same key, another under another key
    run_inference(FIXED, src, tmp_path / "again")
    assert sorted(p.stem for p in (tmp_path / "again").glob("*.json")) == names
    run_inference(FIXED, src, tmp_path / "other", key="another key")
    assert not set(names) & {p.stem for p in (tmp_path / "other").glob("*.json")}


def test_cli_on_a_dicom_series(tmp_path, rcnn_ckpt):
    series = _sagittal_series(tmp_path / "series")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), "--weights", str(rcnn_ckpt),
                          "--source", str(series), "--out", str(tmp_path / "out"), "--conf", "0.0",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    (rec_path,) = (tmp_path / "out").glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["checkpoint"]["file"] == "model.pt" and rec["framework"] == "rcnn"
    assert rec["checkpoint"]["sha256"] == __import__("hashlib").sha256(rcnn_ckpt.read_bytes()).hexdigest()
    assert res.stdout.strip().splitlines()[-1].startswith(f"1 input(s), {rec['num_detections']} detection(s)")
    assert str(tmp_path / "out") in res.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), "--weights", str(rcnn_ckpt),
                          "--source", str(series), "--out", str(tmp_path / "out2"), "--classes", "A,B"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "another class list" in bad.stderr and not (tmp_path / "out2").exists()
