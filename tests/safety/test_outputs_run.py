"""Run folders of a training on a raw YOLO folder: no user file names, no absolute input path, the user's
data folder untouched (Ultralytics' label cache included), paths relative to the run folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from welde_det.checkpoint import load_checkpoint
from welde_det.engine.run import RUN_RELATIVE_MARK, run_training

ROOT = Path(__file__).resolve().parents[2]
#: planted in the user's file names
PLANTED_NAMES = ("Doe", "Jane", "PID-99871", "19610203")


def planted_yolo_folder(dest: Path, cache: Path, *, n_images: int = 6, stem: str = "Doe_Jane_PID-99871_19610203"
                        ) -> Path:
    """A raw YOLO folder (data.yaml without ``path``, images/ + labels/ per split) whose file names carry a
    patient's name, ID and birth date: the phantom's slices, copied and renamed."""
    from welde_det.datasets.phantom import make_phantom_dataset

    ds = make_phantom_dataset(cache, n_images, formats=("coco", "yolo"), workers=1, progress=False)
    src = Path(ds.data_yaml).parent
    for split in ("train", "val"):
        for i, img in enumerate(sorted((src / "images" / split).iterdir())):
            label = src / "labels" / split / f"{img.stem}.txt"
            name = f"{stem}_{split}{i:02d}"
            (dest / "images" / split).mkdir(parents=True, exist_ok=True)
            (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img.resolve(), dest / "images" / split / f"{name}.png")
            shutil.copyfile(label, dest / "labels" / split / f"{name}.txt")
    names = yaml.safe_load((src / "data.yaml").read_text())["names"]
    (dest / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    return dest


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: (kind, mtime_ns, size, sha256) — what "unchanged" means here."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[path.relative_to(folder).as_posix()] = ("dir" if path.is_dir() else "file", st.st_mtime_ns,
                                                   st.st_size if path.is_file() else None, digest)
    out["."] = ("dir", folder.stat().st_mtime_ns, None, None)
    return out


def find_bytes(folder: Path, needles: tuple[str, ...]) -> list[str]:
    """(entry, needle) for each needle in a name, a file's bytes or a link target under ``folder``."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        hay = [rel.lower().encode()]
        if path.is_symlink():
            hay.append(os.readlink(path).lower().encode())
        elif path.is_file():
            hay.append(path.read_bytes().lower())
        found += [f"{rel}: {n}" for n in needles if any(n.lower().encode() in h for h in hay)]
    return found


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("yolo_run")
    data = planted_yolo_folder(base / "user_data", base / "gen")
    before = snapshot(data)
    run = run_training(ROOT / "configs" / "yolo_ce.yaml", [
        "epochs=1", "imgsz=64", "batch=4", "workers=0", "warmup_steps=1", "class_floor=1", "conf=0.0",
        f"data.source={data}", f"output={base / 'runs'}"])
    return base, data, before, run


def test_the_users_data_folder_is_byte_for_byte_unchanged(yolo_run):
    _, data, before, run = yolo_run
    assert snapshot(data) == before  # no labels.cache, no new file, no touched mtime
    assert not list(data.rglob("*.cache"))
    # Ultralytics' label cache was written in the run's view (it lists absolute paths, so it is removed once
    # the stage is finished: backends.yolo.scrub_stage), never beside the user's labels
    assert not list(run.rglob("*.cache"))


def test_the_run_folder_carries_no_user_file_name_and_no_input_path(yolo_run):
    base, data, _, run = yolo_run
    assert (run / "report.json").is_file()
    assert find_bytes(run, PLANTED_NAMES) == []  # gt/*.json, ground_truth.json, detections, reports, caches
    # Ultralytics records the working directory's git repository (path, branch, commit message...) in its
    # checkpoints; ours carry none of it (the tests run inside this package's repository, so there is one)
    from welde_det.checkpoint import safe_load

    for ckpt in run.rglob("*.pt"):
        git = safe_load(ckpt, allow_modules=True).get("git")
        assert git is None or not any(git.values()), (ckpt, git)
    # no symbolic link into the user's data, and the data folder's absolute path nowhere in the run folder
    assert not [p for p in run.rglob("*") if p.is_symlink() and str(data) in os.path.realpath(p)]
    assert find_bytes(run, (str(data), str(data.resolve()))) == []
    # the files the run writes itself hold no absolute path at all
    for name in ("config.yaml", "eval_split.json", "report.json", "report.md", "ground_truth.json",
                 "detections.json", "class_stats.json"):
        text = (run / name).read_text()
        assert str(base) not in text and str(base.resolve()) not in text, name
    gt = json.loads((run / "ground_truth.json").read_text())
    assert gt["images"] and all(Path(im["file_name"]).stem.isdigit() for im in gt["images"])
    ckpt = load_checkpoint(run / "weights" / "model.pt")
    assert not os.path.isabs(ckpt.config["data"]["source"]) and not os.path.isabs(ckpt.config["output"])
    assert str(base) not in json.dumps(ckpt.config) and str(base) not in json.dumps(ckpt.extra, default=str)


def test_config_yaml_paths_are_relative_to_the_run_folder(yolo_run):
    _, data, _, run = yolo_run
    text = (run / "config.yaml").read_text()
    assert text.splitlines()[0] == RUN_RELATIVE_MARK
    cfg = yaml.safe_load(text)
    assert not os.path.isabs(cfg["data"]["source"])
    assert (run / cfg["data"]["source"]).resolve() == data.resolve()
    split = json.loads((run / "eval_split.json").read_text())
    assert split["images"] == "data/images" and (run / split["images"]).is_dir()
