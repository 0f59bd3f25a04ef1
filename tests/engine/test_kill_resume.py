"""``kill -9`` in the middle of an epoch, then ``--resume``: no epoch lost, none repeated.

Each run happens in a child process that sends itself SIGKILL partway through the second
epoch (of stage 2 for WELDE), after the first epoch's checkpoint is on disk — no clean-up
handler can run. ``tools/train.py --resume <run>`` must then finish the schedule.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from welde_det.checkpoint import load_checkpoint, safe_load

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def _child(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "YOLO_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def _resume(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "YOLO_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--resume", str(run)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _epochs(results_csv: Path) -> list[int]:
    return [int(float(r["epoch"])) for r in csv.DictReader(results_csv.open(), skipinitialspace=True)]


def test_yolo_welde_kill9_in_stage2_then_resume(tmp_path):
    out = _child(f"""
        import os, signal
        from ultralytics.utils.callbacks.base import default_callbacks

        def crash(trainer):  # SIGKILL during the 2nd stage-2 epoch, after epoch 1's last.pt is written
            if trainer.welde_spec.get("stage2") and trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        default_callbacks["on_train_batch_end"].append(crash)
        from welde_det.engine.run import run_training
        run_training("configs/yolo_welde.yaml", ["stage1_epochs=1", "epochs=3", "imgsz=64", "n_images=6",
                     "batch=4", "workers=0", "warmup_steps=1", "class_floor=1", "output={tmp_path / 'runs'}",
                     "cache_dir={tmp_path / 'gen'}"])
    """, tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "stage1" / "done.json").is_file() and not (run / "stage2" / "done.json").exists()
    last = run / "stage2" / "weights" / "last.pt"
    assert safe_load(last, allow_modules=True)["epoch"] == 0  # epoch 1 of 3 is saved
    assert not list(run.rglob(".*.tmp"))  # atomic writes: no half-written file survived the kill
    stage1_rows = (run / "stage1" / "results.csv").read_text()

    res = _resume(run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(run)
    assert (run / "stage1" / "results.csv").read_text() == stage1_rows  # stage 1 was not rerun
    assert _epochs(run / "stage2" / "results.csv") == [1, 2, 3]  # epoch 2 redone from its start, none lost
    terms = list(csv.DictReader((run / "stage2" / "terms.csv").open()))
    assert [int(r["epoch"]) for r in terms][-2:] == [1, 2] and "weight_ldam" in terms[0]
    assert json.loads((run / "report.json").read_text())["stats"]


def test_rcnn_kill9_mid_epoch_then_resume(tmp_path):
    out = _child(f"""
        import os, signal
        import welde_det.checkpoint as ck
        import welde_det.engine.backends.rcnn as rb

        saved, batches = [], []
        save, collate = ck.save_checkpoint, rb._collate

        def save_checkpoint(path, **k):
            out = save(path, **k)
            if path.parent.parent.name == "stage2" and path.name == "last.pt":
                saved.append(1)
            return out

        def _collate(b):  # SIGKILL on the 2nd batch after stage 2's first checkpoint: mid-way through its epoch 2
            if saved:
                batches.append(1)
                if len(batches) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return collate(b)

        ck.save_checkpoint, rb._collate = save_checkpoint, _collate
        from welde_det.engine.run import run_training
        run_training("configs/rcnn_welde.yaml", ["stage1_epochs=1", "epochs=2", "imgsz=96", "n_images=6",
                     "batch=1", "warmup_steps=1", "workers=0", "output={tmp_path / 'runs'}",
                     "cache_dir={tmp_path / 'gen'}"])
    """, tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run / "stage2" / "weights" / "last.pt").epoch == 0
    assert (run / "stage1" / "done.json").is_file() and not (run / "report.json").exists()
    assert not list(run.rglob(".*.tmp"))

    res = _resume(run)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((run / "terms.csv").open()))
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [("stage1", 0), ("stage2", 1), ("stage2", 2)]
    assert json.loads((run / "report.json").read_text())["stats"]


def test_yolo_kill9_after_the_last_epoch_checkpoint_then_resume(tmp_path):
    """Killed between the final epoch's last.pt and the end of the stage: --resume must finish the run
    (Ultralytics itself refuses to resume a checkpoint whose training is complete)."""
    out = _child(f"""
        import os, signal
        from ultralytics.utils.callbacks.base import default_callbacks

        def crash(trainer):
            if trainer.epoch == trainer.epochs - 1:
                os.kill(os.getpid(), signal.SIGKILL)

        default_callbacks["on_model_save"].append(crash)
        from welde_det.engine.run import run_training
        run_training("configs/yolo_ce.yaml", ["epochs=2", "imgsz=64", "n_images=6", "batch=4", "workers=0",
                     "class_floor=1",
                     "output={tmp_path / 'runs'}", "cache_dir={tmp_path / 'gen'}"])
    """, tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert safe_load(run / "train" / "weights" / "last.pt", allow_modules=True)["epoch"] == 1
    res = _resume(run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _epochs(run / "train" / "results.csv") == [1, 2]
    assert (run / "train" / "done.json").is_file() and (run / "report.json").is_file()
