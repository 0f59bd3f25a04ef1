"""Atomic writes: a temporary file in the target's folder, then ``os.replace``.

An interrupted run therefore never leaves a half-written COCO file, checkpoint or
report: readers see either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process umask, read where the OS shows it (Linux), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", **open_kw: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit rename it over ``path``.

    Args:
        path: final destination; parent folders are created.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **open_kw: passed to :func:`open` (e.g. ``encoding``).

    Example:
        >>> with atomic_writer(tmp_path / "a.json") as f:  # doctest: +SKIP
        ...     f.write("{}")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file owner-only; give it the permissions open() would have given
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    if mode == "w":
        open_kw.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **open_kw) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_writer(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON to ``path`` atomically.

    Non-finite numbers (NaN, ±inf: "not defined here", e.g. the AP of a class without ground
    truth) are written as ``null``: ``NaN`` is not JSON, and strict readers refuse the file.
    """
    try:
        text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)
    except ValueError:  # a non-finite float somewhere: the rare path, walk and replace
        text = json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (Python, NumPy, in arrays) replaced by None."""
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0):
        value = obj.item() if hasattr(obj, "item") else obj
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return obj


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths that ``json`` does not know."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts (an absent file: no rows)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv_rows(path: str | os.PathLike, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
    """Write ``rows`` under a header atomically; the columns are ``fieldnames`` or every key in first-seen order."""
    keys = fieldnames if fieldnames is not None else list(dict.fromkeys(k for r in rows for k in r))
    with atomic_writer(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def append_csv_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one epoch's row (rewriting the header if new terms appear)."""
    write_csv_rows(path, [*read_csv_rows(path), {k: str(v) for k, v in row.items()}])
