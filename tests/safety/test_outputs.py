"""Inference outputs carry no identifiers: pseudonymous names, no paths, nothing in the pixels' title,
no PNG text chunks; the name mapping only on request; several series are an error unless --series picks one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.io.dicom_factory import ORIENTATIONS, PHI, affine_from_dirs, write_series
from welde_det.io.deid import png_text_chunks

ROOT = Path(__file__).resolve().parents[2]
KEY = "outputs-test-key"
#: planted identifiers (case-insensitive), with the DICOM-formatted variants
PLANTED = ("doe", "jane", "PID-99871", "99871", "19610203", "Elsewhere", "ACC77123", "STUDY4242")
PNG_CHUNKS_ALLOWED = {b"IHDR", b"pHYs", b"IDAT", b"IEND"}


def png_chunk_types(data: bytes) -> list[bytes]:
    """Every chunk type of a PNG file, in order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        types.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return types


def leaks(folder: Path, needles: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> list[str]:
    """Every (file, needle) where a needle is in a file/folder name or a file's bytes (case-insensitive)."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.name in skip:
            continue
        hay = [rel.lower().encode()]
        if path.is_file():
            hay.append(path.read_bytes().lower())
        for needle in needles:
            if any(needle.lower().encode() in h for h in hay):
                found.append(f"{rel}: {needle}")
    return found


def yolo_checkpoint(path: Path) -> Path:
    """A random-init YOLOv8n detector in the one checkpoint schema (as the YOLO backend writes it)."""
    import torch

    from welde_det.checkpoint import save_checkpoint
    from welde_det.classes import LUMBAR_CLASSES, LUMBAR_COUNTS, ClassStats
    from welde_det.engine.backends.base import welde_spec
    from welde_det.engine.backends.yolo import _plain
    from welde_det.engine.config import config_to_dict, load_config
    from welde_det.integrations.yolo import WELDEDetectionModel

    cfg = load_config(ROOT / "configs" / "yolo_ce.yaml", ["imgsz=64", "data.channels=1"])
    stats = ClassStats.from_counts(LUMBAR_CLASSES, LUMBAR_COUNTS)
    spec = welde_spec(cfg, cfg.components, "single", "sigmoid")
    torch.manual_seed(0)
    model = WELDEDetectionModel(cfg.model.arch, ch=1, nc=len(LUMBAR_CLASSES), verbose=False,
                                class_counts=list(stats.effective_counts), **spec.model_kwargs())
    return save_checkpoint(path, framework="yolo", arch=cfg.model.arch, model_state=model.state_dict(),
                           class_stats=stats.to_dict(), config=config_to_dict(cfg), stage="train",
                           welde=spec.to_dict(), epoch=0, extra={"yaml": _plain(model.yaml), "channels": 1,
                                                                 "imgsz": 64})


def _series(folder: Path, *, patient: dict | None = None, seed: int = 0) -> Path:
    i, j, k = np.meshgrid(np.arange(40), np.arange(48), np.arange(5), indexing="ij")
    vol = (200 + 5 * i + 9 * j + 40 * k + seed).astype(np.float32)
    affine = affine_from_dirs(ORIENTATIONS["sagittal"], (0.8, 0.9, 3.5), (-7.0, 60.0, 40.0))
    write_series(folder, vol, affine, phi={**PHI, **(patient or {})}, seed=seed)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return yolo_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A source folder named after the patient, holding a DICOM series in a folder named after the patient and
    PNG slices named after the patient."""
    import cv2

    base = tmp_path_factory.mktemp("src") / "Doe^Jane_PID-99871"
    _series(base / "DOE_JANE_19610203")
    png = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (60, 1))
    cv2.imwrite(str(base / "Jane Doe PID-99871 19610203.png"), png)
    cv2.imwrite(str(base / "doe_jane_st_elsewhere.png"), png[::-1])
    return base


def _infer(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "MPLBACKEND": "Agg",
           "WELDE_DEID_KEY": KEY}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)


def test_inference_outputs_name_no_patient_and_no_path(tmp_path, ckpt, planted):
    out = tmp_path / "out"
    res = _infer(["--weights", str(ckpt), "--source", str(planted), "--out", str(out), "--conf", "0.0"], tmp_path)
    assert res.returncode == 0, res.stderr
    files = sorted(out.iterdir())
    assert len(files) == 6 and not (out / "names.csv").exists()
    assert leaks(out, PLANTED) == []
    # no absolute path and no input path anywhere (the source, the checkpoint's folder, the working folder)
    assert leaks(out, (str(tmp_path), str(planted), str(ckpt.parent), "Doe^Jane")) == []
    for f in files:
        if f.suffix == ".png":
            assert set(png_chunk_types(f.read_bytes())) <= PNG_CHUNKS_ALLOWED and not png_text_chunks(f.read_bytes())
        else:
            rec = json.loads(f.read_text())
            assert rec["source"] == f.stem and rec["overlay"] == f"{f.stem}.png"
            assert rec["checkpoint"]["file"] == "model.pt"
    kinds = sorted(json.loads(f.read_text())["kind"] for f in files if f.suffix == ".json")
    assert kinds == ["dicom", "image2d", "image2d"]


def test_overlay_title_shows_the_pseudonym_not_the_name(tmp_path, planted, monkeypatch):
    """What is drawn into the pixels: the title is the pseudonym (checked on the title handed to the renderer)."""
    import welde_det.viz.overlay as overlay
    from tests.engine.test_infer import FIXED
    from welde_det.engine.infer import run_inference

    titles = []
    real = overlay.render_detections

    def spy(*a, **kw):
        titles.append(kw.get("title", ""))
        return real(*a, **kw)

    monkeypatch.setattr(overlay, "render_detections", spy)
    monkeypatch.setenv("WELDE_DEID_KEY", KEY)
    summary = run_inference(FIXED, planted, tmp_path / "out")
    names = sorted(p.stem for _, p in summary.outputs)
    assert len(titles) == 3 and sorted(t.split(":")[0] for t in titles) == names
    assert not any(n.lower() in t.lower() for t in titles for n in PLANTED)


def test_keep_names_writes_the_mapping_and_only_there(tmp_path, ckpt, planted):
    out = tmp_path / "out"
    res = _infer(["--weights", str(ckpt), "--source", str(planted), "--out", str(out), "--keep-names"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = (out / "names.csv").read_text().splitlines()
    assert rows[0] == "name,input" and len(rows) == 4
    mapping = dict(r.split(",", 1) for r in rows[1:])
    assert set(mapping) == {p.stem for p in out.glob("*.json")}
    assert sorted(mapping.values()) == sorted(f"{planted.name}/{p.name}" for p in planted.iterdir())
    assert leaks(out, PLANTED, skip=("names.csv",)) == []  # the mapping is the only file naming the inputs
    assert not any(str(tmp_path) in v for v in mapping.values())  # relative to the source's folder


def test_several_series_need_series_and_the_error_lists_them_pseudonymised(tmp_path, ckpt):
    src = _series(tmp_path / "two", seed=0)
    for f in _series(tmp_path / "b", patient={"PatientID": "PID-12345", "PatientName": "Roe^Richard"},
                     seed=1).iterdir():
        f.rename(src / f"B{f.name}")
    out = tmp_path / "out"
    res = _infer(["--weights", str(ckpt), "--source", str(src), "--out", str(out)], tmp_path)
    # one DICOM folder holding two patients' series: an error listing them pseudonymised, nothing written
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]  # one line, no traceback
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "#0" in line and "#1" in line and "series=" in line  # both listed, and how to pick one
    assert not any(n.lower() in line.lower() for n in (*PLANTED, "roe", "12345"))
    assert not out.exists()
    from welde_det.engine.infer import run_inference

    # --series reaches the reader (the CLI passes it through unchanged, as a string)
    run_inference(ckpt, src, out, series="1", key=KEY, device="cpu")
    (rec_path,) = out.glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["kind"] == "dicom" and rec["source"] == rec["provenance"]["series_uid"] == rec_path.stem
    run_inference(ckpt, src, tmp_path / "o2", series="0", key=KEY, device="cpu")
    assert [p.stem for p in (tmp_path / "o2").glob("*.json")] != [rec_path.stem]  # the other series, its own name
