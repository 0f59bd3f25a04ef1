"""Detections that do not fit their ground truth (#17 item 8): unknown image or category ids, non-finite
or negative boxes and scores are a ``CocoResultsError`` naming the detections file and the ids (first few
and their count), for ``--dets`` and ``--compare`` alike, before anything is written. A CUDA ``--device``
on a machine without one is a ``DeviceError``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from welde_det.datasets.coco import CocoFormatError, CocoResultsError
from welde_det.engine.evaluate import (
    eval_device,
    load_detections,
    read_ground_truth,
    write_detection_report,
)
from welde_det.utils.device import DeviceError

ROOT = Path(__file__).resolve().parents[2]


def gt_dict() -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [8, 8, 20, 20], "area": 400,
                         "iscrowd": 0} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
    }


def det(image_id=1, category_id=2, bbox=(8, 8, 20, 20), score=0.9) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def good_dets() -> list[dict]:
    return [det(1, 2), det(2, 1), det(3, 2, score=0.5)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict()))
    (tmp_path / "good.json").write_text(json.dumps(good_dets()))
    return tmp_path


# (name, detections planted after the good ones, error text as a regex)
BAD = [
    ("unknown_images", [det(7), det(9), det(9), det(42)],
     r"4 detection\(s\) name image_id 7, 9, 42 \(3 distinct\), which the images of .*gt\.json do not have"),
    ("unknown_category", [det(1, 5), det(2, 0)],
     r"2 detection\(s\) name category_id 0, 5 \(2 distinct\), which the categories of .*gt\.json do not have"),
    ("many_unknown_images", [det(100 + i) for i in range(12)],
     r"12 detection\(s\) name image_id 100, 101, 102, 103, 104, 105, 106, 107, \.\.\. \(12 distinct\)"),
    ("nan_box", [det(bbox=(1, float("nan"), 3, 3))], r"1 detection\(s\) have a NaN or infinite bbox or score "
                                                     r"\(detection index 3\)"),
    ("inf_score", [det(score=float("inf")), det(score=float("-inf"))],
     r"2 detection\(s\) have a NaN or infinite bbox or score \(detection index 3, 4\)"),
    ("negative_width", [det(bbox=(1, 1, -3, 3))], r"negative width or height \(detection index 3\)"),
    ("missing_key", [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}], r"a detection lacks 'score'"),
]


@pytest.mark.parametrize("which", ["dets", "compare"])
@pytest.mark.parametrize(("planted", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_report_refuses_detections_that_do_not_fit(files, which, planted, text):
    bad = files / "bad.json"
    bad.write_text(json.dumps(good_dets() + planted))  # json writes NaN/Infinity, which the readers accept
    out = files / "report"
    kw = {"compare": bad} if which == "compare" else {}
    with pytest.raises(CocoResultsError) as info:
        write_detection_report(files / "gt.json", files / "good.json" if kw else bad, out, plots=False,
                               n_resamples=10, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: "), msg  # the detections file is named
    assert re.search(text, msg), msg
    assert not out.exists()  # nothing written


def test_in_memory_detections_are_checked_too():
    with pytest.raises(CocoResultsError, match=r"^<detections>: 1 detection\(s\) name image_id 8 "):
        load_detections([det(8)], gt_dict())
    arrays = load_detections(good_dets(), gt_dict())
    assert arrays.image_id.tolist() == [1, 2, 3]


def test_good_detections_still_score(files):
    res = write_detection_report(files / "gt.json", files / "good.json", files / "report", plots=False,
                                 analysis=False)
    assert res["stats"][0] == pytest.approx(1.0)
    assert (files / "report" / "report.json").is_file()


def test_ground_truth_structure_names_the_file(tmp_path):
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps({"images": [{"file_name": "a.png"}], "annotations": [], "categories": []}))
    with pytest.raises(CocoFormatError, match=rf"^{re.escape(str(bad))}: images\[0\] needs an integer 'id'"):
        read_ground_truth(bad)
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        read_ground_truth(bad)
    with pytest.raises(FileNotFoundError):
        read_ground_truth(tmp_path / "missing.json")
    gt = gt_dict()
    del gt["annotations"][0]["area"]  # the evaluator's own check, re-raised typed and naming the file
    bad.write_text(json.dumps(gt))
    (tmp_path / "d.json").write_text(json.dumps(good_dets()))
    with pytest.raises(CocoFormatError, match=rf"^{re.escape(str(bad))}: annotation 1 has no 'area'"):
        write_detection_report(bad, tmp_path / "d.json", tmp_path / "out", plots=False, analysis=False)
    assert not (tmp_path / "out").exists()


def test_eval_device():
    import torch

    assert eval_device(None) is None and eval_device("") is None
    assert eval_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match=r"^--device 'tpu9' is not a device"):
        eval_device("tpu9")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:0", "0"):
            with pytest.raises(DeviceError, match=rf"^--device '{spec}': no CUDA device is available here; use "
                                                  r"--device cpu"):
                eval_device(spec)
    else:
        n = torch.cuda.device_count()
        assert eval_device("0") == "cuda:0"
        with pytest.raises(DeviceError, match=rf"this machine has {n} CUDA device"):
            eval_device(f"cuda:{n}")


def test_cli_unknown_ids_one_line_exit_2_and_debug_traceback(files):
    bad = files / "bad.json"
    bad.write_text(json.dumps([*good_dets(), det(7)]))
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--gt", str(files / "gt.json"), "--dets",
           str(bad), "--out", str(files / "report"), "--no-plots", "--resamples", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [out.stderr.strip()] and out.stderr.startswith(f"error: {bad}: "), out.stderr
    assert "image_id 7" in out.stderr and "Traceback" not in out.stderr
    assert not (files / "report").exists()
    dbg = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr and "CocoResultsError" in dbg.stderr
    assert not (files / "report").exists()
