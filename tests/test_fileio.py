"""Atomic writes leave either the old file or the new one, never a fragment."""

from __future__ import annotations

import pytest

from welde_det.utils.fileio import atomic_write_json, atomic_writer, load_json


def test_atomic_json_round_trip(tmp_path):
    import numpy as np

    path = atomic_write_json(tmp_path / "sub" / "x.json", {"a": np.arange(3), "b": np.float32(1.5)})
    assert load_json(path) == {"a": [0, 1, 2], "b": 1.5}


def test_interrupted_write_keeps_old_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_load_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_json(tmp_path / "bad.json")


def test_atomic_files_get_ordinary_permissions(tmp_path):
    """Reports and overlays must be readable by the group/others as any file the user writes is,
    not owner-only like the temporary file they start as."""
    import os

    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
            os.umask(mask)
            path = atomic_write_json(tmp_path / f"r{mask}.json", {"a": 1})
            plain = tmp_path / f"plain{mask}.txt"
            plain.write_text("x")
            assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == mode
    finally:
        os.umask(old)


def test_json_never_holds_nan(tmp_path):
    """NaN/inf (Python, NumPy scalars, inside arrays) become null: the file parses strictly."""
    import json

    import numpy as np

    from welde_det.utils.fileio import atomic_write_json

    path = atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": np.array([1.5, np.inf]),
                                                   "c": np.float32("nan"), "d": [2, {"e": -np.inf}], "f": "NaN"})
    text = path.read_text()
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text

    def strict(token):
        raise AssertionError(f"non-JSON constant {token}")

    assert json.loads(text, parse_constant=strict) == {"a": None, "b": [1.5, None], "c": None,
                                                        "d": [2, {"e": None}], "f": "NaN"}
