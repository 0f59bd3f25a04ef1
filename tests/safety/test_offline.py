"""Ultralytics stays offline without the user's help, and importing welde_det changes nothing global.

Each check runs in a fresh interpreter (Ultralytics decides whether it is online when it is
first imported) whose environment has no ``YOLO_OFFLINE`` and no pytest marker, with a
socket guard installed before anything is imported: every DNS lookup or connection is
recorded (with its stack) and refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GUARD = """
import json, os, socket, sys, traceback
ATTEMPTS = []
def _refuse(name):
    def f(*a, **k):
        ATTEMPTS.append(name + " " + repr(a[:2])[:100] + "\\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        raise OSError(f"network blocked by the test ({name})")
    return f
socket.getaddrinfo = _refuse("getaddrinfo")
socket.gethostbyname = _refuse("gethostbyname")
socket.create_connection = _refuse("create_connection")
socket.socket.connect = _refuse("connect")
socket.socket.connect_ex = _refuse("connect_ex")
"""


def _run(body: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("YOLO_OFFLINE", "PYTEST_CURRENT_TEST", "ULTRALYTICS_API_KEY", "GITHUB_ACTIONS")}
    env.update({"OMP_NUM_THREADS": "1", "WELDE_NO_PROGRESS": "1", "YOLO_CONFIG_DIR": str(tmp_path / "ycfg"),
                "PYTHONPATH": str(ROOT)})
    script = GUARD + "\ndef main():\n" + textwrap.indent(textwrap.dedent(body), "    ") + (
        "\nif __name__ == '__main__':\n    out = main()\n    out['attempts'] = ATTEMPTS\n"
        "    print('RESULT ' + json.dumps(out))\n")
    path = tmp_path / "child.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_tiny_yolo_run_without_network_and_without_yolo_offline(tmp_path):
    out = _run(f"""
        before = dict(os.environ)
        from welde_det.engine.run import run_training
        import welde_det.integrations.yolo  # noqa: F401  (imports Ultralytics offline)
        import ultralytics.utils as uu
        sync_before, online_before = uu.SETTINGS["sync"], uu.ONLINE
        run = run_training({str(ROOT / "configs" / "yolo_ce.yaml")!r}, ["epochs=1", "imgsz=64", "n_images=6",
                           "batch=4", "workers=0", "output={tmp_path / 'runs'}", "cache_dir={tmp_path / 'gen'}"])
        settings_file = json.loads((uu.SETTINGS.file).read_text())
        return {{"run": str(run), "env_same": dict(os.environ) == before, "offline_env": "YOLO_OFFLINE" in os.environ,
                "sync_before": sync_before, "sync_after": uu.SETTINGS["sync"], "file_sync": settings_file["sync"],
                "online_before": online_before, "online_after": uu.ONLINE}}
    """, tmp_path)
    assert out["attempts"] == [], "\n".join(out["attempts"])  # no DNS query, no connection, not even refused ones
    run = Path(out["run"])
    assert json.loads((run / "report.json").read_text())["stats"]  # the run completed
    assert out["env_same"] and not out["offline_env"]  # the environment is as it was (YOLO_OFFLINE not left set)
    # Ultralytics' settings are its user's: sync is back to its value and the settings file was never rewritten
    assert out["sync_before"] is True and out["sync_after"] is True and out["file_sync"] is True
    assert out["online_before"] is False and out["online_after"] is False  # imported offline, never flipped


def test_importing_welde_det_changes_no_environment_or_settings(tmp_path):
    out = _run("""
        before = dict(os.environ)
        import welde_det, welde_det.io, welde_det.datasets.resolve, welde_det.checkpoint  # noqa: F401
        import welde_det.integrations.yolo, welde_det.integrations.registry, welde_det.integrations.detectors  # noqa
        import welde_det.engine.run, welde_det.engine.infer, welde_det.engine.backends.yolo  # noqa: F401
        import welde_det.viz.overlay  # noqa: F401
        env_same_fresh = dict(os.environ) == before
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        import ultralytics.utils as uu
        file_settings = json.loads(uu.SETTINGS.file.read_text())
        return {"env_same": env_same_fresh, "changed": changed, "settings_same": dict(uu.SETTINGS) == file_settings,
                "sync": uu.SETTINGS["sync"]}
    """, tmp_path)
    assert out["attempts"] == [], "\n".join(out["attempts"])  # Ultralytics' import-time DNS check did not run
    assert out["env_same"], out["changed"]
    assert out["settings_same"] and out["sync"] is True


def test_importing_welde_det_after_ultralytics_changes_nothing(tmp_path):
    """A user who imported Ultralytics first (online or not) keeps its flags and settings."""
    out = _run("""
        os.environ["YOLO_OFFLINE"] = "1"  # the user's own choice, before welde_det
        import ultralytics.utils as uu
        import ultralytics.utils.checks as uc
        before_env, before_settings = dict(os.environ), dict(uu.SETTINGS)
        uu.ONLINE = uc.ONLINE = True  # pretend the user's session is online
        import welde_det.integrations.yolo  # noqa: F401
        from welde_det.integrations.offline import ultralytics_offline
        with ultralytics_offline():
            inside = (uu.ONLINE, uc.ONLINE, uu.SETTINGS["sync"], os.environ.get("YOLO_OFFLINE"))
        return {"env_same": dict(os.environ) == before_env, "settings_same": dict(uu.SETTINGS) == before_settings,
                "online": [uu.ONLINE, uc.ONLINE], "inside": list(inside)}
    """, tmp_path)
    assert out["env_same"] and out["settings_same"]
    assert out["online"] == [True, True]  # restored
    assert out["inside"] == [False, False, False, "1"]  # and closed while welde_det runs Ultralytics


def test_the_amp_check_needs_no_download_while_offline_and_is_put_back():
    """Ultralytics' AMP check loads (downloads) yolo26n.pt on CUDA; inside the offline block a local check runs."""
    import torch
    import ultralytics.engine.trainer as ut

    import welde_det.integrations.yolo  # noqa: F401
    from welde_det.integrations.offline import _offline_amp_check, ultralytics_offline

    original = ut.check_amp
    with ultralytics_offline():
        assert ut.check_amp is _offline_amp_check
        assert ut.check_amp(torch.nn.Conv2d(1, 1, 1)) is False  # AMP only on CUDA
    assert ut.check_amp is original


def test_a_ddp_worker_of_an_offline_parent_stays_offline(tmp_path):
    """A worker re-reads Ultralytics' settings file: an API key there must not switch the platform upload on."""
    settings = tmp_path / "ycfg" / "Ultralytics" / "settings.json"
    out = _run(f"""
        os.environ["LOCAL_RANK"], os.environ["YOLO_OFFLINE"] = "0", "1"  # what the parent's DDP launch gives
        import welde_det.integrations.yolo  # noqa: F401
        import ultralytics.utils as uu
        uu.SETTINGS.update(api_key="ul_" + "0" * 40, sync=True)  # the user's own settings file
        file_before = {str(settings)!r} and open({str(settings)!r}).read()
        from welde_det.integrations.offline import offline_worker
        entered = offline_worker()
        return {{"entered": entered, "api_key": uu.SETTINGS["api_key"], "sync": uu.SETTINGS["sync"],
                "file_same": open({str(settings)!r}).read() == file_before, "again": offline_worker()}}
    """, tmp_path)
    assert out["entered"] and out["again"] and out["attempts"] == []
    assert out["api_key"] == "" and out["sync"] is False and out["file_same"]
