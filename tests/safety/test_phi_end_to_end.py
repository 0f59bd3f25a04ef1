"""Planted PHI through convert, train, infer and evaluate: no output byte and no output name carries it.

A patient's name, ID, birth date and institution are planted in DICOM tags and in file and
folder names (DICOM series folders, a boxes table, a YOLO/PNG set). Every output folder is then
walked: every file and folder name, every byte of every file, every member of every zip
(``.pt`` checkpoints), every text chunk of every PNG (decompressed) and every link target is
searched case-insensitively for each planted string and its DICOM-formatted variants.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tests.io.dicom_factory import ORIENTATIONS, PHI, affine_from_dirs, write_series
from tests.safety.test_outputs_run import planted_yolo_folder

ROOT = Path(__file__).resolve().parents[2]
KEY = "phi-end-to-end-key"
NAME, PID, BIRTH, PLACE = "Quixote^Marigold", "QX20938471", "19420817", "Rosewater Clinic"
#: every planted string, with the variants a DICOM value or a file name would give
NEEDLES = ("Quixote", "Marigold", "QUIXOTE^MARIGOLD", "Quixote_Marigold", "Marigold Quixote", PID, "20938471",
           BIRTH, "1942-08-17", "17.08.1942", "Rosewater", PLACE)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(png):
        n = int.from_bytes(png[pos:pos + 4], "big")
        out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _texts(path: Path) -> list[tuple[str, bytes]]:
    """(where, bytes) to search for one output entry: its name, its bytes, and what they contain."""
    found = [("name", path.name.encode())]
    if path.is_symlink():
        return [*found, ("link target", os.readlink(path).encode())]
    if not path.is_file():
        return found
    data = path.read_bytes()
    found.append(("bytes", data))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            found += [(f"zip member {m.filename}", m.filename.encode() + b"\n" + zf.read(m)) for m in zf.infolist()]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for ctype, payload in _chunks(data):
            if ctype in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
                found.append((f"PNG {ctype.decode()} chunk", payload))
                if ctype == b"zTXt":
                    found.append(("PNG zTXt text", zlib.decompress(payload.split(b"\0", 1)[1][1:])))
    return found


def phi_leaks(folder: Path, needles: tuple[str, ...] = NEEDLES) -> list[str]:
    """Every (entry, where, needle) under ``folder`` holding a planted string (case-insensitive)."""
    leaks = []
    for path in sorted(folder.rglob("*")):
        for where, blob in _texts(path):
            low = blob.lower()
            leaks += [f"{path.relative_to(folder)} ({where}): {n!r}" for n in needles if n.lower().encode() in low]
    return leaks


def png_text_chunk_files(folder: Path) -> list[str]:
    return [f"{p.relative_to(folder)}: {[c.decode() for c, _ in _chunks(p.read_bytes()) if c in (b'tEXt', b'zTXt', b'iTXt')]}"
            for p in sorted(folder.rglob("*.png")) if p.is_file() and not p.is_symlink()
            and any(c in (b"tEXt", b"zTXt", b"iTXt") for c, _ in _chunks(p.read_bytes()))]


def _dicom_study(root: Path) -> tuple[Path, Path]:
    """Three patients' sagittal series in folders named after the first patient, a boxes table naming them."""
    tags = {**PHI, "PatientName": NAME, "PatientID": PID, "PatientBirthDate": BIRTH, "InstitutionName": PLACE,
            "StudyDescription": f"LSPINE {NAME}", "ImageComments": f"{NAME} born {BIRTH}"}
    rows = ["volume,class,x,y,w,h,patient"]
    for p in range(3):
        folder = root / f"{NAME}_{PID}" / f"{BIRTH}_series{p}"
        i, j, k = np.meshgrid(np.arange(40), np.arange(48), np.arange(5), indexing="ij")
        vol = (200 + 5 * i + 9 * j + 40 * k + 10 * p).astype(np.float32)
        affine = affine_from_dirs(ORIENTATIONS["sagittal"], (0.8, 0.9, 3.5), (-7.0, 60.0, 40.0))
        write_series(folder, vol, affine, phi={**tags, "PatientID": f"{PID}{p}"}, seed=p)
        rows.append(f"{folder.relative_to(root).as_posix()},DDD,10,12,14,16,{NAME} {PID}{p}")
    table = root / f"boxes_{NAME}.csv"
    table.write_text("\n".join(rows) + "\n")
    return table, root / f"{NAME}_{PID}" / f"{BIRTH}_series0"


def test_planted_phi_reaches_no_output(tmp_path):
    from welde_det.classes import LUMBAR_CLASSES
    from welde_det.engine.convert import run_convert
    from welde_det.engine.infer import run_inference
    from welde_det.engine.run import run_training

    raw = tmp_path / "raw"
    table, series = _dicom_study(raw)
    yolo = planted_yolo_folder(raw / f"{NAME}_{PID}" / "yolo", tmp_path / "gen",
                               stem=f"{NAME}_{PID}_{BIRTH}_{PLACE}".replace("^", "_"))
    out = tmp_path / "out"
    # convert: the DICOM series through the boxes table, the YOLO/PNG set through the YOLO converter
    run_convert("boxes", table, out / "conv_boxes", key=KEY, root=raw, class_names=list(LUMBAR_CLASSES),
                fractions=None)
    run_convert("yolo", yolo, out / "conv_yolo", key=KEY, keep_source_splits=True, fractions=None, yolo=True)
    # train on the converted set
    run = run_training(ROOT / "configs" / "yolo_ce.yaml", [
        "epochs=1", "imgsz=64", "batch=4", "workers=0", "warmup_steps=1", "class_floor=1",
        f"data.source={out / 'conv_yolo'}", f"output={out / 'runs'}"])
    weights = run / "weights" / "model.pt"
    # infer on the DICOM folder and on the PNGs
    run_inference(weights, series, out / "infer_dicom", conf=0.0, key=KEY, device="cpu")
    run_inference(weights, yolo / "images" / "val", out / "infer_png", conf=0.0, key=KEY, device="cpu")
    # evaluate through the tool
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "WELDE_DEID_KEY": KEY, "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--weights", str(weights), "--data",
                          str(out / "conv_yolo"), "--split", "val", "--out", str(out / "evaluate"), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["conv_boxes", "conv_yolo", "evaluate", "infer_dicom", "infer_png", "runs"]
    assert sum(1 for _ in out.rglob("*")) > 50  # the walk below has something to search
    assert phi_leaks(out) == []
    # nothing names the inputs' folders either (absolute or relative)
    assert phi_leaks(out, (str(raw), str(raw.resolve()), f"{NAME}_{PID}")) == []
    assert png_text_chunk_files(out) == []
    # the planted strings are really there in the inputs (the search would find them)
    assert phi_leaks(raw) and any("zip" in leak or "bytes" in leak for leak in phi_leaks(raw))
