"""De-identification: planted PHI never reaches metadata, provenance or pseudonyms."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.io.dicom_factory import ORIENTATIONS, PHI, affine_from_dirs, phantom_volume, write_series
from welde_det.io import read_volume
from welde_det.io.deid import (
    burned_in_annotation,
    default_key_path,
    load_key,
    obtain_key,
    png_text_chunks,
    pseudonymise,
    safe_metadata,
)

REPO = Path(__file__).resolve().parents[2]

IDENTIFYING = ["Jane", "Doe", "Gregory", "House", "99871", "19610203", "ACC77123", "20240117", "101112",
               "Elsewhere", "STUDY4242", "555-0199"]


def _leaks(text: str) -> list[str]:
    values = [v for v in PHI.values()]
    return [t for t in values + IDENTIFYING if t.lower() in text.lower()]


def test_safe_metadata_and_provenance_carry_no_phi(tmp_path):
    aff = affine_from_dirs(ORIENTATIONS["sagittal"], (0.7, 0.7, 3.5), (0, 0, 0))
    paths = write_series(tmp_path / "Doe_Jane" / "PID-99871", phantom_volume((6, 6, 4)), aff)
    ds = pydicom.dcmread(paths[0])
    meta = safe_metadata(ds, key=b"secret")
    assert _leaks(json.dumps(meta)) == []
    assert meta["Modality"] == "MR" and len(meta["patient"]) == 16
    vol = read_volume(tmp_path, deid_key=b"secret")
    prov = {k: v for k, v in vol.provenance.items() if k not in ("source_files", "description")}
    assert _leaks(json.dumps(prov, default=str)) == []
    assert vol.provenance["series_uid"] == pseudonymise(ds.SeriesInstanceUID, b"secret")
    assert ds.SeriesInstanceUID not in json.dumps(prov, default=str)


def test_pseudonymise_is_keyed_and_stable():
    a = pseudonymise("1.2.3", "k1")
    assert a == pseudonymise("1.2.3", b"k1") and a != pseudonymise("1.2.3", "k2")
    assert len(pseudonymise("x", "k", length=12)) == 12
    with pytest.raises(ValueError, match="secret key"):
        pseudonymise("x", "")


def test_load_key_refuses_key_inside_dataset(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "key.txt").write_text("abc\n")
    with pytest.raises(ValueError, match="inside the dataset"):
        load_key(tmp_path / "data" / "key.txt", dataset_root=tmp_path / "data")
    (tmp_path / "key.txt").write_text("abc\n")
    assert load_key(tmp_path / "key.txt", dataset_root=tmp_path / "data") == b"abc"
    monkeypatch.delenv("WELDE_DEID_KEY", raising=False)
    with pytest.raises(ValueError, match="WELDE_DEID_KEY"):
        load_key()
    monkeypatch.setenv("WELDE_DEID_KEY", "envkey")
    assert load_key() == b"envkey"


def test_burned_in_annotation_flag():
    ds = pydicom.Dataset()
    assert not burned_in_annotation(ds)
    ds.BurnedInAnnotation = "YES"
    assert burned_in_annotation(ds)
    ds2 = pydicom.Dataset()
    ds2.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    assert burned_in_annotation(ds2)


def test_png_text_chunks_audit(tmp_path):
    import cv2
    from PIL import PngImagePlugin

    ok, buf = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok and png_text_chunks(buf.tobytes()) == []
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Jane Doe")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "t.png", pnginfo=info)
    chunks = png_text_chunks((tmp_path / "t.png").read_bytes())
    assert chunks and b"Jane Doe" in chunks[0][1]


def test_first_run_creates_a_private_key_outside_the_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("WELDE_DEID_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    path = tmp_path / "cfg" / "welde_det" / "deid.key"
    assert default_key_path() == path
    with pytest.raises(ValueError, match="no de-identification key"):
        obtain_key(create=False)
    assert not path.exists()
    first = obtain_key(dataset_root=tmp_path / "out")
    assert first.origin == "created" and first.path == path.absolute()
    assert str(path) in first.describe()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.key) == 64 and int(first.key, 16) >= 0  # 256 random bits as hex
    again = obtain_key()
    assert again.origin == "user_key" and again.key == first.key
    # an explicit key, a key file or WELDE_DEID_KEY always wins over the user's file
    assert obtain_key("given").key == b"given" and obtain_key("given").origin == "argument"
    (tmp_path / "k").write_text("fromfile\n")
    assert obtain_key(key_file=tmp_path / "k").key == b"fromfile"
    monkeypatch.setenv("WELDE_DEID_KEY", "envkey")
    assert obtain_key().key == b"envkey" and obtain_key().origin == "env"
    with pytest.raises(ValueError, match="empty"):
        obtain_key("")
    # the user's key file may not lie inside the output it protects
    monkeypatch.delenv("WELDE_DEID_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "out" / "cfg"))
    with pytest.raises(ValueError, match="inside the dataset"):
        obtain_key(dataset_root=tmp_path / "out")


def _yolo_source(root: Path) -> Path:
    for split, stem in (("train", "T1_0001_S8 "), ("val", "0001_T2_TSE_SAG_384_0002_0001_008_R")):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        Image.fromarray(np.full((16, 12), 90, np.uint8)).save(root / split / "images" / f"{stem}.png")
        (root / split / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("path: .\ntrain: train/images\nval: val/images\nnames: [a, b]\n")
    return root


def _convert(src: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "yolo", str(src), str(out), "--keep-source-splits",
           "--patient-pattern", "lumbar6"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={"PATH": os.environ.get("PATH", ""), "WELDE_NO_PROGRESS": "1", **env})


def _patient_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "images").iterdir())


def test_convert_tool_first_run_without_key_and_stable_pseudonyms(tmp_path):
    src = _yolo_source(tmp_path / "src")
    cfg = tmp_path / "cfg"
    first = _convert(src, tmp_path / "a", {"XDG_CONFIG_HOME": str(cfg)})
    assert first.returncode == 0, first.stderr
    key_file = cfg / "welde_det" / "deid.key"
    assert f"created a new random de-identification key at {key_file}" in first.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not any(p.name == "deid.key" for p in (tmp_path / "a").rglob("*"))
    key = key_file.read_bytes().strip()
    # both slices are patient 0001 (lumbar6 naming), pseudonymised with the created key
    assert _patient_dirs(tmp_path / "a") == [pseudonymise("patient:0001", key, length=12)]
    second = _convert(src, tmp_path / "b", {"XDG_CONFIG_HOME": str(cfg)})
    assert second.returncode == 0 and "created" not in second.stderr
    assert _patient_dirs(tmp_path / "b") == _patient_dirs(tmp_path / "a")
    # WELDE_DEID_KEY gives the same pseudonyms anywhere and creates no key file
    env = {"WELDE_DEID_KEY": "shared-secret", "XDG_CONFIG_HOME": str(tmp_path / "cfg2")}
    third = _convert(src, tmp_path / "c", env)
    assert third.returncode == 0, third.stderr
    assert _patient_dirs(tmp_path / "c") == [pseudonymise("patient:0001", "shared-secret", length=12)]
    assert not (tmp_path / "cfg2").exists()
