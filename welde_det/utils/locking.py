"""One writer per output folder, and staging folders that a dead writer leaves are cleaned up.

:func:`output_lock` takes an exclusive, non-blocking ``flock`` on ``OUT.lock`` next to the output
folder ``OUT``; a second writer into the same ``OUT`` fails at once with
:class:`OutputLockedError` naming the holder (pid, host, start time, read from the lock file)
and what to do. The kernel releases the lock when the holding process ends, however it ends,
so a lock file left by a killed process is no obstacle: its content is informational only.
The file is removed on a clean release (unlinked while still locked, and a taker checks that
the file it locked is still the one at the path, so removal never lets two writers in).

Staging folders (``.OUT.<random>.staging``, ``.OUT.<random>.tmp``) are made by
:func:`make_staging`, which records the owner (pid, host, the process's start time) in a
``.owner`` file inside. :func:`remove_dead_staging` removes the ones of the same ``OUT`` whose
owner ran on this host and is no longer alive (a pid reused by a newer process counts as dead
when the start time recorded differs); a live owner's, another host's, or one without a readable
``.owner`` file is kept (logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from welde_det.errors import UserError

__all__ = [
    "OWNER_FILE",
    "LockHolder",
    "OutputLockedError",
    "lock_path",
    "make_staging",
    "output_lock",
    "pid_alive",
    "remove_dead_staging",
]

logger = logging.getLogger(__name__)

#: file inside a staging folder naming the process that made it
OWNER_FILE = ".owner"


class OutputLockedError(UserError):
    """Another process is writing the same output folder (``holder`` says which)."""

    def __init__(self, message: str, holder: LockHolder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) an output lock: pid, host, start time (ISO, UTC) and what it does."""

    pid: int | None
    host: str | None
    started: str | None
    what: str | None = None

    def describe(self) -> str:
        """'pid 123 on host, started 2026-...' (unknown parts said so)."""
        pid = f"pid {self.pid}" if self.pid is not None else "an unknown process"
        host = f" on {self.host}" if self.host else ""
        started = f", started {self.started}" if self.started else ""
        what = f" ({self.what})" if self.what else ""
        return f"{pid}{host}{started}{what}"


def lock_path(out_dir: str | os.PathLike) -> Path:
    """``OUT.lock``, the sibling of ``out_dir`` that :func:`output_lock` locks."""
    out = Path(out_dir).absolute()
    return out.with_name(f"{out.name}.lock")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, given ``start``, is the same process).

    ``start`` is the start time :func:`make_staging` recorded (Linux); a different one means
    the pid was reused by a newer process, so the recorded one is dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except OSError:
        return False
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def _read_holder(path: Path) -> LockHolder:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid = data.get("pid")
    return LockHolder(pid if isinstance(pid, int) else None, data.get("host"), data.get("started"), data.get("what"))


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    # explicit: forked workers share the open file description and would keep the lock alive
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike, *, what: str = "convert") -> Iterator[Path]:
    """Hold an exclusive lock on writing ``out_dir`` for the ``with`` block; yields the lock file.

    Args:
        out_dir: the output folder (need not exist; its parent is created).
        what: what the holder does, recorded for the message a second writer gets.

    Raises:
        OutputLockedError: another live process holds the lock (it is named, with what to do).
    """
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            holder = _read_holder(path)
            raise OutputLockedError(
                f"{Path(out_dir).name}: another process is writing this output ({holder.describe()}; lock file "
                f"{path.name} beside it). Wait for it to finish, or write to another folder; the lock is released "
                "when that process ends, however it ends, so a stale lock file needs no removal.", holder)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        # the previous holder removed the file between our open and our lock: lock the new one
        _unlock(fd)
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still locked: a waiting taker sees the file changed and retries
        _unlock(fd)
        os.close(fd)


def make_staging(out_dir: str | os.PathLike, *, suffix: str = ".staging") -> Path:
    """A new hidden staging sibling ``.OUT.<random><suffix>`` of ``out_dir``, owned by this process.

    Its ``.owner`` file records pid, host and start time for :func:`remove_dead_staging`.
    Callers move or delete it themselves; the ``.owner`` file is removed before a move into place.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()), "created": _now()}
    (tmp / OWNER_FILE).write_text(json.dumps(owner) + "\n", encoding="utf-8")
    return tmp


def remove_dead_staging(out_dir: str | os.PathLike, *, suffixes: tuple[str, ...] = (".staging", ".tmp")) -> list[Path]:
    """Remove staging folders of ``out_dir`` whose owner process has died; return those removed.

    Only siblings named ``.OUT.*<suffix>`` holding a ``.owner`` file that names a process on this
    host that is no longer alive are removed; the others are kept (and logged at debug level).
    """
    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for cand in sorted(out.parent.glob(f".{out.name}.*")):
        if not cand.is_dir() or cand.is_symlink() or not cand.name.endswith(suffixes):
            continue
        try:
            owner = json.loads((cand / OWNER_FILE).read_text(encoding="utf-8"))
            pid = int(owner["pid"])
            owner_host = str(owner.get("host"))
            start = owner.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            logger.debug("keeping %s: no readable %s file (made by an older version?)", cand.name, OWNER_FILE)
            continue
        if owner_host != host:
            logger.debug("keeping %s: made on another host (%s)", cand.name, owner_host)
            continue
        if pid_alive(pid, start if isinstance(start, str) else None):
            logger.debug("keeping %s: its owner (pid %d) is alive", cand.name, pid)
            continue
        shutil.rmtree(cand, ignore_errors=True)
        if cand.exists():
            logger.warning("could not remove the dead staging folder %s", cand.name)
            continue
        logger.info("removed %s, left by a conversion that ended without cleaning up (pid %d)", cand.name, pid)
        removed.append(cand)
    return removed
