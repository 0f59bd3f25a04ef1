"""One writer per output and no leftovers from dead writers (#17 item 4).

A second conversion into an output that another holds fails at once naming the holder and writes
nothing; a lock left by a killed process is no obstacle; the lock goes on success and on error;
staging folders of dead processes are removed by the next run into the same output, those of live
processes (or other outputs, or without an owner record) are kept.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from welde_det.datasets.sources.common import ConversionError, OutputLockedError
from welde_det.engine.convert import export_yolo, run_convert
from welde_det.utils.cli import run_cli
from welde_det.utils.locking import (
    OWNER_FILE,
    lock_path,
    make_staging,
    output_lock,
    pid_alive,
    remove_dead_staging,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "lock-test-key"


def _tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return convert


def _source(tmp_path: Path) -> Path:
    """A one-row box table over one small PNG: the fastest real conversion."""
    vols = tmp_path / "src"
    vols.mkdir(parents=True, exist_ok=True)
    img = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) % 251).astype(np.uint8)
    cv2.imwrite(str(vols / "s.png"), img)
    table = vols / "boxes.csv"
    table.write_text("volume,class,x,y,w,h\ns.png,disc,2,3,5,6\n")
    return table


def _convert(table: Path, out: Path, **kw):
    return run_convert("boxes", table, out, key=KEY, fractions=None, **kw)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.", f"{out.name}.")))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def _fake_staging(out: Path, tag: str, owner: dict | None, suffix: str = ".staging") -> Path:
    folder = out.parent / f".{out.name}.{tag}{suffix}"
    folder.mkdir(parents=True)
    (folder / "images").mkdir()
    (folder / "images" / "half.png").write_bytes(b"partial")
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    return folder


# ---------------------------------------------------------------------------- the lock
def test_second_convert_fails_fast_naming_the_holder_and_writes_nothing(tmp_path, capsys):
    table = _source(tmp_path)
    out = tmp_path / "out" / "ds"
    with output_lock(out, what="convert"):
        holder = json.loads(lock_path(out).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as err:
            _convert(table, out)
        assert time.monotonic() - t0 < 5.0
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and f"started {holder['started']}" in msg
        assert "another process is writing this output" in msg and "Wait for it to finish" in msg
        assert str(tmp_path) not in msg
        assert err.value.holder.pid == os.getpid()
        assert isinstance(err.value, ValueError)  # a UserError: one line in the tools
        # the tool: one line, exit 2, no traceback
        code = run_cli(_tool().main, ["boxes", str(table), str(out), "--no-split"])
        assert code == 2
        line = capsys.readouterr().err
        assert line.startswith("error: ds: another process is writing this output") and line.count("\n") == 1
        assert f"pid {os.getpid()}" in line
        # the to-yolo export is locked out too
        with pytest.raises(OutputLockedError):
            export_yolo({"train": tmp_path / "none.json"}, tmp_path, out)
        assert not out.exists()
        assert _siblings(out) == ["ds.lock"]  # the holder's lock only: no staging, no output
    assert _siblings(out) == []  # released and removed
    result = _convert(table, out)
    assert result.num_images == 1 and (out / "annotations.json").is_file()
    assert _siblings(out) == []


def test_lock_of_a_killed_process_is_no_obstacle(tmp_path):
    table = _source(tmp_path)
    out = tmp_path / "out" / "ds"
    out.parent.mkdir(parents=True)
    code = (
        "import fcntl, json, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'started': 'then'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"pid {proc.pid} on h, started then"):
            _convert(table, out)
        assert not out.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(out).is_file()  # the killed holder's file stays; its lock went with it
    assert _convert(table, out).num_images == 1
    assert not lock_path(out).exists()


def test_lock_is_released_when_the_conversion_fails(tmp_path):
    table = _source(tmp_path)
    table.write_text("volume,class,x,y,w,h\nmissing.png,disc,2,3,5,6\n")
    out = tmp_path / "out" / "ds"
    with pytest.raises(ConversionError, match="not found"):
        _convert(table, out)
    assert _siblings(out) == []  # no lock file, no staging, no output
    with output_lock(out):  # and it can be taken again at once
        pass


def test_lock_is_exclusive_between_processes(tmp_path):
    out = tmp_path / "o"
    code = (
        "import sys\n"
        "from welde_det.utils.locking import output_lock, OutputLockedError\n"
        "try:\n"
        "    with output_lock(sys.argv[1]):\n"
        "        print('took it')\n"
        "except OutputLockedError as exc:\n"
        "    print('refused', exc.holder.pid)\n"
    )
    with output_lock(out):
        res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert res.stdout.split() == ["refused", str(os.getpid())], res.stderr
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.stdout.strip() == "took it", res.stderr


# ---------------------------------------------------------------------------- staging left by dead runs
def test_dead_staging_is_removed_and_live_staging_kept(tmp_path):
    table = _source(tmp_path)
    out = tmp_path / "out" / "ds"
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _fake_staging(out, "dead1", {"pid": _dead_pid(), "host": host, "start": None})
        dead_tmp = _fake_staging(out, "dead2", {"pid": _dead_pid(), "host": host, "start": None}, suffix=".tmp")
        # our own pid, but another process's start time: the pid was reused, the owner is dead
        reused = _fake_staging(out, "reused", {"pid": os.getpid(), "host": host, "start": "1"})
        live = _fake_staging(out, "live", {"pid": sleeper.pid, "host": host, "start": None})
        mine = make_staging(out)  # this (live) process's own, with its recorded start time
        elsewhere = _fake_staging(out, "remote", {"pid": _dead_pid(), "host": host + "-other", "start": None})
        no_owner = _fake_staging(out, "old", None)
        other_out = tmp_path / "out" / "other"
        other = _fake_staging(other_out, "dead3", {"pid": _dead_pid(), "host": host, "start": None})

        result = _convert(table, out)
        assert result.num_images == 1
        assert not dead.exists() and not dead_tmp.exists() and not reused.exists()
        for kept in (live, elsewhere, no_owner, other):
            assert (kept / "images" / "half.png").exists(), kept
        assert mine.is_dir() and (mine / OWNER_FILE).is_file()
        assert not (out / OWNER_FILE).exists()  # the finished output carries no owner record
    finally:
        sleeper.kill()
        sleeper.wait()
    # once the sleeper is gone its staging goes with the next run; the lock-free helper says so
    assert live in remove_dead_staging(out)
    assert not live.exists()


def test_a_killed_conversion_leaves_staging_that_the_next_run_removes(tmp_path):
    """A real conversion killed mid-way (SIGKILL while it stages) leaves its staging; the next run cleans it."""
    table = _source(tmp_path)
    out = tmp_path / "out" / "ds"
    code = (
        "import sys, time\n"
        "from welde_det.datasets.sources.common import staging_dir\n"
        "with staging_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'images').mkdir()\n"
        "    print('staging', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "staging"
        left = [p for p in out.parent.iterdir() if p.name.endswith(".staging")]
        assert len(left) == 1
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            _convert(table, out)
        assert left[0].is_dir()  # a live conversion's staging is never touched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert left[0].is_dir() and lock_path(out).exists()  # what a kill leaves
    _convert(table, out)
    assert not left[0].exists()
    assert _siblings(out) == []
