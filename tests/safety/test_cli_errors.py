"""Every tool reports an ordinary user error in one line and exits 2 (#17 item 6).

Each case runs ``sys.executable tools/<tool>.py ...`` as a user would, with one ordinary mistake (an
unknown key, a bad value, a missing file, a GPU this machine does not have, a bad label file), and
asserts: exit status 2, stderr exactly one line starting with ``error:`` that names the culprit (when
the tool had already logged its progress before meeting the error: stderr ending with that one line),
no ``Traceback``. With ``--debug`` the same call shows the traceback. Inputs are generated in ``tmp_path``
and nothing may be written where the tool would have written its output.

Tool owners (issue #17 is split): ``tools/train.py`` and ``tools/infer.py`` are wired to ``run_cli`` by
helper A, ``tools/convert.py`` by helper B, ``tools/evaluate.py`` and ``tools/make_phantom.py`` by C.
The train/infer/convert cases below check their work; they fail while a tool still prints a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "rcnn_ce.yaml")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


no_cuda_only = pytest.mark.skipif(_has_cuda(), reason="checks the missing-GPU error; this machine has CUDA")


def run_tool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WELDE_DEID_KEY": "test-key", "WELDE_NO_PROGRESS": "1", "YOLO_OFFLINE": "1"}
    env.pop("WELDE_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line(out: subprocess.CompletedProcess, *fragments: str, after_log: bool = False) -> str:
    """Exit 2, no traceback, and the error as one ``error: ...`` line naming ``fragments``.

    An error found before the tool starts working leaves stderr exactly that one line. With
    ``after_log`` the tool had already logged its progress (run folder, class table: INFO records,
    some spanning lines) before it met the error: stderr must then *end* with the one error line,
    and hold no other ``error:`` line.
    """
    err = out.stderr
    assert "Traceback" not in err, err
    assert out.returncode == 2, (out.returncode, err)
    lines = err.splitlines()
    if after_log:
        assert lines and [i for i, line in enumerate(lines) if line.startswith("error")] == [len(lines) - 1], err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_debug_traceback(out: subprocess.CompletedProcess, error_class: str) -> None:
    assert out.returncode != 0
    assert "Traceback (most recent call last)" in out.stderr and error_class in out.stderr, out.stderr


def make_yolo(root: Path, bad_line: str | None = None, *, labels: bool = True) -> Path:
    """A 2-split YOLO folder of 32x32 images; ``bad_line`` is line 2 of labels/train/img1.txt."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32), 50 * (i + 1), np.uint8)).save(root / "images" / split / f"img{i}.png")
            if labels:
                extra = f"{bad_line}\n" if bad_line and split == "train" and i == 1 else ""
                (root / "labels" / split / f"img{i}.txt").write_text(f"0 0.5 0.5 0.3 0.3\n{extra}")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [A, B]\n")
    return root


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------- tools/train.py (helper A)
TRAIN_CASES = [
    ("unknown_key", ["nosuchkey=1"], ["unknown override key 'nosuchkey'"], "ConfigError"),
    ("bad_value", ["train.lr=abc"], ["train.lr must be a number"], "ConfigError"),
    ("bad_yaml_value", ["train.lr=[0.1"], ["train.lr=[0.1", "not valid YAML"], "ConfigError"),
    ("non_finite", ["train.lr=nan"], ["train.lr must be a finite number"], "ConfigError"),
]


@pytest.mark.parametrize(("over", "fragments", "cls"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_config_errors(tmp_path, over, fragments, cls):
    runs = tmp_path / "runs"
    out = run_tool("train", "--config", CONFIG, f"output={runs}", *over, cwd=tmp_path)
    assert_one_line(out, *fragments)
    assert tree(runs) == []  # no run folder


def test_train_missing_config_file_and_debug(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line(run_tool("train", "--config", str(missing), cwd=tmp_path), str(missing), "not found")
    assert_debug_traceback(run_tool("train", "--config", str(missing), "--debug", cwd=tmp_path), "ConfigError")


def test_train_bad_label_file(tmp_path):
    data = make_yolo(tmp_path / "ds", "inf 0.5 0.5 0.2 0.2")
    runs = tmp_path / "runs"
    out = run_tool("train", "--config", CONFIG, f"data.source={data}", f"output={runs}", "epochs=1", "imgsz=64",
                   cwd=tmp_path)
    assert_one_line(out, "labels/train/img1.txt:2:", "class 'inf'", after_log=True)
    assert tree(runs) == []
    assert tree(data / "labels") == ["train", "train/img0.txt", "train/img1.txt", "val", "val/img0.txt",
                                     "val/img1.txt"]  # nothing written into the user's data


def test_train_dataset_without_boxes(tmp_path):
    data = make_yolo(tmp_path / "ds", labels=False)
    out = run_tool("train", "--config", CONFIG, f"data.source={data}", f"output={tmp_path / 'runs'}", "epochs=1",
                   "imgsz=64", cwd=tmp_path)
    assert_one_line(out, "the training split has no boxes", after_log=True)


@no_cuda_only
def test_train_missing_gpu(tmp_path):
    data = make_yolo(tmp_path / "ds")
    args = ["--config", CONFIG, f"data.source={data}", f"output={tmp_path / 'runs'}", "epochs=1", "imgsz=64",
            "batch=2", "workers=0", "data.class_floor=1", "train.device=0"]
    assert_one_line(run_tool("train", *args, cwd=tmp_path), "train.device='0'", "no CUDA device", after_log=True)
    assert tree(tmp_path / "runs") == []  # the run folder of a run that never started is removed


# ----------------------------------------------------------------------------- tools/infer.py (helper A)
@no_cuda_only
def test_infer_missing_gpu(tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(src)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not read: the device is checked first")
    out = run_tool("infer", "--weights", str(weights), "--source", str(src), "--out", str(tmp_path / "out"),
                   "--device", "cuda", cwd=tmp_path)
    assert_one_line(out, "--device 'cuda'", "no CUDA device")
    assert not (tmp_path / "out").exists()


def test_infer_missing_weights_and_debug(tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(src)
    weights = tmp_path / "missing.pt"
    args = ["--weights", str(weights), "--source", str(src), "--out", str(tmp_path / "out")]
    assert_one_line(run_tool("infer", *args, cwd=tmp_path), "missing.pt")
    assert not (tmp_path / "out").exists()
    assert_debug_traceback(run_tool("infer", *args, "--debug", cwd=tmp_path), "Error")


# ----------------------------------------------------------------------------- tools/convert.py (helper B)
def test_convert_bad_label_file_and_debug(tmp_path):
    data = make_yolo(tmp_path / "ds", "0 0.5 nan 0.2 0.2")
    out_dir = tmp_path / "out"
    out = run_tool("convert", "yolo", str(data), str(out_dir), cwd=tmp_path)
    assert_one_line(out, "labels/train/img1.txt:2:", "non-finite cy", after_log=True)
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert_debug_traceback(run_tool("convert", "yolo", str(data), str(out_dir), "--debug", cwd=tmp_path),
                           "ConversionError")


def test_convert_folder_without_labels(tmp_path):
    data = make_yolo(tmp_path / "ds", labels=False)
    out_dir = tmp_path / "out"
    out = run_tool("convert", "yolo", str(data), str(out_dir), cwd=tmp_path)
    assert_one_line(out, str(data), "has no boxes (4 image(s), 0 boxes)", after_log=True)
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_convert_unknown_class_index(tmp_path):
    data = make_yolo(tmp_path / "ds", "5 0.5 0.5 0.2 0.2")
    out = run_tool("convert", "yolo", str(data), str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line(out, "labels/train/img1.txt:2:", "class '5' is not an index in 0..1", after_log=True)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tools/evaluate.py (C)
@pytest.fixture
def eval_inputs(tmp_path):
    import json

    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "A"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8],
                                                     "score": 0.9}]))
    (tmp_path / "bad_dets.json").write_text(json.dumps([{"image_id": 1, "category_id": 3, "bbox": [4, 4, 8, 8],
                                                         "score": 0.9}]))
    (tmp_path / "stats.json").write_text(json.dumps({"oops": 1}))
    return tmp_path


EVAL_CASES = [
    ("missing_gt", ["--gt", "{d}/missing.json", "--dets", "{d}/dets.json"], ["missing.json", "no such file"]),
    ("unknown_category", ["--gt", "{d}/gt.json", "--dets", "{d}/bad_dets.json"], ["bad_dets.json", "category_id 3"]),
    ("unknown_category_compare", ["--gt", "{d}/gt.json", "--dets", "{d}/dets.json", "--compare", "{d}/bad_dets.json"],
     ["bad_dets.json", "category_id 3"]),
    ("bad_class_stats", ["--gt", "{d}/gt.json", "--dets", "{d}/dets.json", "--class-stats", "{d}/stats.json"],
     ["stats.json", "not a ClassStats JSON"]),
    ("missing_weights", ["--weights", "{d}/missing.pt", "--data", "{d}", "--device", "cpu"], ["missing.pt"]),
]


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_evaluate_errors(eval_inputs, args, fragments):
    report = eval_inputs / "report"
    out = run_tool("evaluate", *[a.format(d=eval_inputs) for a in args], "--out", str(report), "--no-plots",
                   cwd=eval_inputs)
    assert_one_line(out, *fragments)
    assert not report.exists()


@no_cuda_only
def test_evaluate_missing_gpu(eval_inputs):
    args = ["--gt", str(eval_inputs / "gt.json"), "--dets", str(eval_inputs / "dets.json"), "--out",
            str(eval_inputs / "report"), "--device", "cuda"]
    assert_one_line(run_tool("evaluate", *args, cwd=eval_inputs), "--device 'cuda'", "no CUDA device",
                    "--device cpu")
    assert not (eval_inputs / "report").exists()


# ----------------------------------------------------------------------------- tools/make_phantom.py (C)
PHANTOM_CASES = [
    ("zero_studies", ["--n-studies", "0"], ["n_studies must be a positive integer, got 0"]),
    ("difficulty", ["--n-studies", "2", "--difficulty", "2"], ["difficulty must be a number in [0, 1]"]),
    ("frequencies", ["--n-studies", "2", "--frequencies", '{"nope": 1}'], ["unknown classes ['nope']"]),
]


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in PHANTOM_CASES], ids=[c[0] for c in PHANTOM_CASES])
def test_make_phantom_errors(tmp_path, args, fragments):
    out_dir = tmp_path / "ph"
    assert_one_line(run_tool("make_phantom", "--out", str(out_dir), *args, cwd=tmp_path), *fragments)
    assert not out_dir.exists()


def test_make_phantom_missing_folder_and_debug(tmp_path):
    args = ["--figure", str(tmp_path / "f.png"), "--real", str(tmp_path / "missing")]
    assert_one_line(run_tool("make_phantom", *args, cwd=tmp_path), "missing", "need 3 T1 and 3 T2 PNGs")
    assert not (tmp_path / "f.png").exists()
    assert_debug_traceback(run_tool("make_phantom", "--out", str(tmp_path / "ph"), "--n-studies", "0", "--debug",
                                    cwd=tmp_path), "PhantomError")
