"""A finished run folder holds no absolute path in any byte: Ultralytics' stage files (``args.yaml``,
``last.pt``'s ``train_args`` and its model's ``args``, the label caches) are scrubbed once a stage is
finished, the YOLO view links relatively, and Faster R-CNN / classifier checkpoints store their config
relative to the run folder. A resume after the scrub still reads the scrubbed files and grows a stage."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from welde_det.checkpoint import load_checkpoint, safe_load
from welde_det.engine.config import ConfigError
from welde_det.engine.run import run_training

ROOT = Path(__file__).resolve().parents[2]
TINY = ["imgsz=64", "n_images=6", "batch=4", "workers=0", "warmup_steps=1", "class_floor=1"]


def absolute_paths(folder: Path, needles: tuple[str, ...]) -> list[str]:
    """Where a needle occurs under ``folder``: entry names, link targets, file bytes, and every member of a
    zip archive (``torch.save`` files) read out — the entry and the needle for each hit."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        hay = [(rel, rel.encode())]
        if path.is_symlink():
            hay.append((f"{rel} -> link", os.readlink(path).encode()))
        elif path.is_file():
            hay.append((rel, path.read_bytes()))
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    hay += [(f"{rel}!{m}", z.read(m)) for m in z.namelist()]
        found += [f"{where}: {n}" for where, data in hay for n in needles if n.encode() in data]
    return found


def _needles(base: Path) -> tuple[str, ...]:
    # the test's folder (runs, phantom cache) as given and resolved, and the code's checkout (Ultralytics'
    # git record names it)
    return tuple(dict.fromkeys((str(base), str(base.resolve()), str(ROOT))))


@pytest.fixture(scope="module")
def welde_run(tmp_path_factory):
    """A finished two-stage YOLO WELDE run (stage1 then the frozen stage2) on the phantom, selected on a
    holdout (so Ultralytics validates and writes best.pt too)."""
    base = tmp_path_factory.mktemp("abs_run")
    run = run_training(ROOT / "configs" / "yolo_welde.yaml", [
        "stage1_epochs=1", "epochs=1", *TINY, "n_images=12", "select=holdout", f"cache_dir={base / 'gen'}",
        f"output={base / 'runs'}"])
    return base, Path(run)


def test_a_finished_yolo_run_folder_holds_no_absolute_path(welde_run):
    base, run = welde_run
    assert (run / "report.json").is_file()
    for stage in ("stage1", "stage2"):  # Ultralytics' own files were there and are kept, scrubbed
        for name in ("args.yaml", "weights/last.pt", "weights/best.pt"):
            assert (run / stage / name).is_file(), f"{stage}/{name}"
    assert absolute_paths(run, _needles(base)) == []
    args = yaml.safe_load((run / "stage2" / "args.yaml").read_text())
    assert args["project"] == "." and args["save_dir"] == "stage2" and args["data"] == "data/yolo/data.yaml"
    ck = safe_load(run / "stage1" / "weights" / "last.pt", allow_modules=True)  # still passes the safe gate
    assert ck["train_args"]["save_dir"] == "stage1" and ck["epoch"] == 0 and "root" not in ck["git"]
    assert ck["ema"].args.save_dir == "stage1"
    assert not list(run.rglob("*.cache"))  # Ultralytics' label caches list absolute image paths: removed
    links = [p for p in (run / "data" / "yolo" / "images").rglob("*") if p.is_symlink()]
    assert links and all(p.resolve().is_file() and not os.path.isabs(os.readlink(p)) for p in links)
    assert "path" not in yaml.safe_load((run / "data" / "yolo" / "data.yaml").read_text())


def test_resume_after_the_scrub(welde_run, tmp_path, monkeypatch):
    """Growing a finished (scrubbed) stage is still refused by reading its scrubbed last.pt; a stage that had
    not begun grows and trains from the scrubbed folder, from another working folder, and the finished run
    again holds no absolute path."""
    base, run = welde_run
    copy = run.parent / "resumed"
    shutil.copytree(run, copy, symlinks=True)
    shutil.rmtree(copy / "stage2")  # as if killed before stage 2's first checkpoint
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="cannot extend a finished YOLO stage"):
        run_training(None, ["stage1_epochs=2"], resume=copy)
    assert run_training(None, ["epochs=2"], resume=copy) == copy
    assert json.loads((copy / "stage2" / "done.json").read_text())["epochs"] == 2
    assert (copy / "stage2" / "results.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert absolute_paths(copy, (*_needles(base), str(tmp_path))) == []


def test_rcnn_and_classifier_checkpoints_store_paths_relative_to_the_run(tmp_path, monkeypatch):
    from tests.integrations.test_classify import write_npz

    npz = tmp_path / "data" / "cls.npz"
    npz.parent.mkdir()
    write_npz(npz)
    monkeypatch.chdir(tmp_path / "data")  # the working folder is not the run folder's parent
    run = run_training(ROOT / "configs" / "cls_ce.yaml", [
        f"data.source={npz}", f"output={tmp_path / 'runs'}", "epochs=1", "model.arch=small_cnn", "batch=16"])
    ck = load_checkpoint(run / "weights" / "model.pt")
    for config in (ck.config, json.loads((run / "report.json").read_text())["config"]):
        assert not os.path.isabs(config["data"]["source"])
        assert (run / config["data"]["source"]).resolve() == npz.resolve()
        assert (run / config["output"]).resolve() == (tmp_path / "runs").resolve()
    assert str(tmp_path) not in json.dumps(ck.config)

    run = run_training(ROOT / "configs" / "rcnn_ce.yaml", [
        f"output={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'gen'}", "epochs=1", "n_images=6", "imgsz=96",
        "batch=2", "warmup_steps=1", "workers=0", "class_floor=1"])
    for pt in ("weights/model.pt", "train/weights/model.pt", "train/weights/last.pt"):
        config = load_checkpoint(run / pt).config
        assert (run / config["data"]["cache_dir"]).resolve() == (tmp_path / "gen").resolve(), pt
        assert (run / config["output"]).resolve() == (tmp_path / "runs").resolve(), pt
    assert absolute_paths(run, _needles(tmp_path)) == []
