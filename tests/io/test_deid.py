"""De-identification: planted PHI never reaches metadata, provenance or pseudonyms."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from tests.io.dicom_factory import ORIENTATIONS, PHI, affine_from_dirs, phantom_volume, write_series
from welde_det.io import read_volume
from welde_det.io.deid import (
    burned_in_annotation,
    load_key,
    png_text_chunks,
    pseudonymise,
    safe_metadata,
)

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
    from PIL import Image, PngImagePlugin

    ok, buf = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok and png_text_chunks(buf.tobytes()) == []
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Jane Doe")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "t.png", pnginfo=info)
    chunks = png_text_chunks((tmp_path / "t.png").read_bytes())
    assert chunks and b"Jane Doe" in chunks[0][1]
