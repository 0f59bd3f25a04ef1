"""The one welde_det checkpoint schema, and loading that never runs code from a file.

A welde_det checkpoint is a ``torch.save`` zip archive of one dict that holds only tensors
and plain Python values (``dict``/``list``/``tuple``/``str``/``int``/``float``/``bool``/``None``),
so ``torch.load(weights_only=True)`` reads it with no allow-list at all::

    {"schema": "welde_det.checkpoint/1",
     "meta": {"framework", "arch", "class_stats" (ClassStats.to_dict()), "config" (resolved),
              "stage", "welde" (WELDE settings or None), "epoch", "extra", "created", "versions"},
     "model_state": {name: Tensor},
     "optimizer_state": dict | None}

Loading. Every ``torch.load`` here uses ``weights_only=True``. Before anything is unpickled,
the archive's pickle is disassembled (:mod:`pickletools`) and every Python global it names
is checked; a file that names one outside what may be admitted is refused with
:class:`UnsafeCheckpointError`, which lists the globals and says what to do. There is no
bypass flag. (A pre-1.6, non-zip ``torch.save`` file cannot be disassembled ahead; torch's
own loader then refuses the first global outside what is admitted, before calling anything.)

* :func:`load_checkpoint` / :func:`read_metadata` admit nothing beyond torch's own defaults:
  our schema needs none.
* :func:`safe_load` with ``allow_modules=True`` admits an allow-list for Ultralytics-native
  ``.pt`` files (a user's ``yolov8n.pt``; Ultralytics' own ``last.pt`` whose ``model``/``ema``
  are pickled ``DetectionModel`` objects): the ``nn.Module`` classes defined in
  ``torch.nn.modules``, ``ultralytics.nn.modules``, ``ultralytics.nn.tasks`` and welde_det's
  ``losses``/``welde``/``integrations`` packages (found by walking those packages), plus the
  few plain types such files hold (``IterableSimpleNamespace``, ``pathlib`` paths, NumPy
  scalars and dtypes) and a ``getattr`` restricted to ``forward`` of an admitted class. Module
  classes are admitted *to be rebuilt only* (the pickle ``NEWOBJ`` path, ``cls.__new__`` then
  ``__setstate__``): a pickle that would *call* one (run its constructor) is refused.
  Only the globals a file names are registered, inside a
  :func:`torch.serialization.safe_globals` context; importing this module changes nothing
  global, and Ultralytics is imported only for a file that names its classes.

Example:
    >>> save_checkpoint(tmp / "last.pt", framework="rcnn", arch="fasterrcnn_resnet50_fpn",
    ...                 model_state=model.state_dict(), class_stats=stats, config=cfg,
    ...                 stage="stage1", epoch=3)  # doctest: +SKIP
    >>> ckpt = load_checkpoint(tmp / "last.pt")  # doctest: +SKIP
    >>> ckpt.class_stats.names  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import datetime
import functools
import importlib
import os
import pathlib
import pickle
import pickletools
import pkgutil
import re
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from welde_det.classes import ClassStats
from welde_det.errors import UserError
from welde_det.utils.fileio import atomic_writer

__all__ = [
    "SCHEMA",
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "class_names",
    "is_welde_checkpoint",
    "load_checkpoint",
    "module_allow_list",
    "read_metadata",
    "safe_load",
    "save_checkpoint",
]

SCHEMA = "welde_det.checkpoint/1"

WHAT_IT_IS = (
    f"a welde_det checkpoint is a torch.save file of one dict with schema {SCHEMA!r}, the weights as "
    "tensors and its metadata (framework, arch, class stats, resolved config, stage, WELDE settings) "
    "as plain Python values, written by tools/train.py (welde_det.checkpoint.save_checkpoint)"
)
_IF_TRUSTED = (
    "Re-save the weights with welde_det (welde_det.checkpoint.save_checkpoint), or, only if you trust "
    "the file and where it came from, open it in a separate Python session with "
    "torch.load(path, weights_only=False) and save just its weights: "
    "torch.save(model.state_dict(), 'weights.pt'). welde_det never unpickles arbitrary objects."
)

#: Packages whose ``nn.Module`` subclasses ``safe_load(allow_modules=True)`` may rebuild.
MODULE_PACKAGES: tuple[str, ...] = (
    "torch.nn.modules",
    "ultralytics.nn.modules",
    "ultralytics.nn.tasks",
    "welde_det.losses",
    "welde_det.welde",
    "welde_det.integrations",
)
# packages that import Ultralytics when walked
_NEEDS_ULTRALYTICS = ("ultralytics.", "welde_det.integrations")
# names older Ultralytics releases pickled for classes that now live elsewhere
_LEGACY_ALIASES = {
    "ultralytics.nn.modules.block.Silence": "torch.nn.modules.linear.Identity",  # YOLOv9e
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
}
_LOAD_LOCK = threading.RLock()  # safe_globals edits a process-wide set: one restricted load at a time


class CheckpointError(UserError):
    """The file is not a (readable) welde_det checkpoint; the message names the file."""


class UnsafeCheckpointError(UserError):
    """Loading the file would need unpickling objects that are not admitted.

    Attributes:
        path: the file.
        refused: the Python globals (``module.name``) that were refused.
    """

    def __init__(self, message: str, *, path: Path | None = None, refused: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.path = path
        self.refused = tuple(refused)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded welde_det checkpoint (see the module docstring for the schema)."""

    path: Path
    framework: str
    arch: str
    model_state: dict[str, Any]
    class_stats: ClassStats
    config: dict[str, Any]
    stage: str
    welde: dict[str, Any] | None
    epoch: int | None
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]
    schema: str = SCHEMA


# --------------------------------------------------------------------------- saving
def save_checkpoint(
    path: str | os.PathLike,
    *,
    framework: str,
    arch: str,
    model_state: Mapping[str, Any],
    class_stats: ClassStats | Mapping[str, Any],
    config: Mapping[str, Any],
    stage: str,
    welde: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and return its path.

    Args:
        path: destination ``.pt``; parent folders are created.
        framework: backend name (``"yolo"``, ``"rcnn"``, ``"classify"``).
        arch: architecture the weights belong to (e.g. ``"yolov8n.yaml"``).
        model_state: ``model.state_dict()``: names to tensors.
        class_stats: the training split's :class:`ClassStats` (or its ``to_dict()``).
        config: the resolved run config as plain values.
        stage: stage name (e.g. ``"stage1"``).
        welde: WELDE settings (``WELDESpec.to_dict()``), ``None`` for a single loss.
        epoch: last finished epoch, ``None`` when not meaningful.
        optimizer_state: ``optimizer.state_dict()`` for resuming, or ``None``.
        extra: anything else the backend needs, as plain values.

    Raises:
        TypeError: a value that is not a tensor or plain Python value (the message gives its
            place, e.g. ``config['data']['root']``), so every file loads with
            ``weights_only=True`` and no allow-list.
        ValueError: an empty ``framework``/``arch``/``stage`` or a bad ``epoch``.
    """
    import torch

    for name, value in (("framework", framework), ("arch", arch), ("stage", stage)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"save_checkpoint: {name} must be a non-empty string, got {value!r}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise ValueError(f"save_checkpoint: epoch must be an int or None, got {epoch!r}")
    stats = class_stats if isinstance(class_stats, ClassStats) else ClassStats.from_dict(class_stats)
    meta = {
        "framework": framework,
        "arch": arch,
        "class_stats": stats.to_dict(),
        "config": dict(config),
        "stage": stage,
        "welde": dict(welde) if welde is not None else None,
        "epoch": epoch,
        "extra": dict(extra or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
    }
    state = dict(model_state)
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{key!r}]: expected str -> Tensor, got {type(tensor).__name__}")
    obj = {
        "schema": SCHEMA,
        "meta": meta,
        "model_state": state,
        "optimizer_state": dict(optimizer_state) if optimizer_state is not None else None,
    }
    _check_plain(obj["meta"], "meta")
    _check_plain(obj["optimizer_state"], "optimizer_state")
    with atomic_writer(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError at the first value ``torch.load(weights_only=True)`` would not read plainly."""
    import torch

    if value is None or type(value) in (str, bytes, bool, int, float, complex):  # subclasses pickle by class
        return
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(value).__name__} is not allowed; pass a plain tensor")
        return
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} (keys must be str or int)")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(value).__module__}.{type(value).__qualname__} is not a tensor or plain Python value "
        "(dict, list, tuple, str, int, float, bool, None); convert it (e.g. str(path), x.tolist(), "
        "obj.to_dict()) so the checkpoint loads with torch.load(weights_only=True)"
    )


# --------------------------------------------------------------------------- loading ours
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Load a welde_det checkpoint with ``torch.load(weights_only=True)`` and nothing admitted.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file names Python globals (classes, functions) beyond tensors
            and plain values; nothing of it was unpickled.
        CheckpointError: a readable file that is not a welde_det checkpoint, or a damaged one.
    """
    path = Path(path)
    obj = _load(path, map_location, admit=None, mmap=False)
    meta = _our_meta(path, obj)
    if meta is None:
        raise CheckpointError(f"{path}: not a welde_det checkpoint ({_describe(obj)}); {WHAT_IT_IS}")
    try:
        stats = ClassStats.from_dict(meta["class_stats"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its class_stats cannot be read ({exc})") from exc
    return Checkpoint(
        path=path,
        framework=meta["framework"],
        arch=meta["arch"],
        model_state=obj["model_state"],
        class_stats=stats,
        config=meta["config"],
        stage=meta["stage"],
        welde=meta["welde"],
        epoch=meta["epoch"],
        optimizer_state=obj["optimizer_state"],
        extra=meta["extra"],
        schema=obj["schema"],
    )


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a welde_det checkpoint without reading its weights (memory-mapped).

    Returns:
        ``{"schema", "framework", "arch", "class_stats" (dict), "config", "stage", "welde",
        "epoch", "extra", "created", "versions", "has_optimizer_state"}``, or ``None`` for a
        file that is not ours but is harmless: one that ``safe_load`` reads, with
        ``allow_modules=True`` where it holds pickled model classes (e.g. ``yolov8n.pt``).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs globals outside even the module allow-list.
        CheckpointError: not a readable torch file at all, or a damaged welde_det checkpoint.
    """
    path = Path(path)
    found = _scan(path)
    if found is not None and _not_default(found):
        _refusal(path, _not_default(found), admit=_module_admitter(), purpose="metadata")
        return None  # admissible model classes: a harmless foreign file, and not ours
    obj = _load(path, "cpu", admit=None, mmap=True)
    meta = _our_meta(path, obj)
    if meta is None:
        return None
    out = {"schema": obj["schema"], **meta}
    out["has_optimizer_state"] = obj["optimizer_state"] is not None
    return out


def is_welde_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a welde_det checkpoint (nothing is unpickled when it names globals)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    found = _scan(path)
    if found is None or _not_default(found):
        return False
    try:
        return _our_meta(path, _load(path, "cpu", admit=None, mmap=True)) is not None
    except CheckpointError:
        return False


def class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a welde_det checkpoint was trained on; ``None`` for any harmless other file.

    Plain Ultralytics / torchvision weights carry no welde_det class statistics, hence ``None``.
    Raises as :func:`read_metadata` does.
    """
    meta = read_metadata(path)
    return None if meta is None else [str(n) for n in meta["class_stats"]["names"]]


def _our_meta(path: Path, obj: Any) -> dict[str, Any] | None:
    """The metadata dict when ``obj`` follows our schema; ``None`` when it is not ours."""
    if not isinstance(obj, dict) or "schema" not in obj:
        return None
    if obj["schema"] != SCHEMA:
        raise CheckpointError(
            f"{path}: checkpoint schema {obj['schema']!r} is not {SCHEMA!r} (written by another "
            "welde_det version?); re-save it with this version"
        )
    meta = obj.get("meta")
    missing = [k for k in ("framework", "arch", "class_stats", "config", "stage", "welde", "epoch", "extra")
               if not isinstance(meta, dict) or k not in meta]
    missing += [k for k in ("model_state", "optimizer_state") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: schema {SCHEMA!r} checkpoint lacks {missing}; the file is damaged")
    return meta


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        found = f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        if "framework" in obj or "welde_det" in obj:
            found += ", an older welde_det layout from before the one schema: retrain it"
        elif keys and all(_is_tensor(v) for v in obj.values()):
            found += " (a plain state dict: read it with welde_det.checkpoint.safe_load)"
        return found
    return f"a {type(obj).__name__}"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


# --------------------------------------------------------------------------- loading others
def safe_load(path: str | os.PathLike, map_location: Any = "cpu", *, allow_modules: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of any file, refusing what needs arbitrary unpickling.

    Args:
        path: a ``torch.save`` file (a state dict, a welde_det checkpoint, an Ultralytics ``.pt``).
        map_location: as for :func:`torch.load`.
        allow_modules: also admit the module allow-list (module docstring), for
            Ultralytics-native files whose model is a pickled ``nn.Module``. Verify a file with
            this before handing it to Ultralytics' own loader (e.g. to resume).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: a global outside what is admitted; nothing was unpickled when
            the file is a zip archive (the modern ``torch.save`` format).
        CheckpointError: not a readable torch file.
    """
    return _load(Path(path), map_location, admit=_module_admitter() if allow_modules else None, mmap=False,
                 purpose="safe_load")


def module_allow_list(*, ultralytics: bool = True) -> dict[str, Any]:
    """The full allow-list of ``safe_load(allow_modules=True)``: pickled name -> admitted object.

    Walks :data:`MODULE_PACKAGES` (the Ultralytics ones, and welde_det's integrations, only
    with ``ultralytics=True``) for ``nn.Module`` subclasses, and adds the plain helper types.
    For inspection and documentation: loading registers only the names a file uses.
    """
    names: dict[str, Any] = {}
    for package in MODULE_PACKAGES:
        if ultralytics or not package.startswith(_NEEDS_ULTRALYTICS):
            names.update(_module_classes(package))
    for name in _PLAIN_TYPES:
        if ultralytics or not name.startswith("ultralytics."):
            names[name] = _plain_type(name)
    return names


_Admitter = Callable[[str], "list[Any] | None"]


def _module_admitter() -> _Admitter:
    """A function: pickled global name -> ``safe_globals`` entries admitting it, or ``None``."""
    return _admit_module_global


def _load(path: Path, map_location: Any, *, admit: _Admitter | None, mmap: bool, purpose: str = "load") -> Any:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (pass a local path; nothing is downloaded)")
    found = _scan(path)
    entries: list[Any] = []
    if found is not None:
        extra = _not_default(found)
        if extra:
            entries = _refusal(path, extra, admit=admit, purpose=purpose)
    with _LOAD_LOCK:
        for _ in range(1000):  # legacy (non-zip) files cannot be scanned: admit names as they come
            # leave out entries someone registered for good: leaving the context would remove them
            registered = set(torch.serialization.get_safe_globals())
            try:
                with torch.serialization.safe_globals([e for e in entries if e not in registered]):
                    return torch.load(path, map_location=map_location, weights_only=True,
                                      mmap=mmap and found is not None)
            except pickle.UnpicklingError as exc:
                name = _refused_global(str(exc))
                more = admit(name) if (admit is not None and found is None and name) else None
                if more is None:
                    detail = _torch_reason(str(exc))
                    if found is None and "persistent_load" in detail:
                        detail += "; the pre-1.6 torch.save format stores a pickled model's source code"
                    raise _unsafe(path, [name] if name else [], admit=admit, purpose=purpose,
                                  detail=detail) from None
                entries += more
            except (RuntimeError, EOFError, OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                    f"{WHAT_IT_IS}"
                ) from exc
    raise UnsafeCheckpointError(f"{path}: refused: the file names too many globals", path=path)


def _refusal(path: Path, names: set[str], *, admit: _Admitter | None, purpose: str) -> list[Any]:
    """Entries admitting every name, or raise UnsafeCheckpointError naming those refused."""
    entries: list[Any] = []
    refused = []
    for name in sorted(names):
        try:
            got = admit(name) if admit is not None else None
        except ImportError as exc:
            raise CheckpointError(f"{path}: names {name}, and {exc}") from exc
        if got is None:
            refused.append(name)
        else:
            entries += got
    if refused:
        raise _unsafe(path, refused, admit=admit, purpose=purpose)
    return entries


def _unsafe(path: Path, refused: list[str], *, admit: _Admitter | None, detail: str = "",
            purpose: str = "load") -> UnsafeCheckpointError:
    shown = ", ".join(refused[:8]) + (f", ... ({len(refused)} in all)" if len(refused) > 8 else "")
    if refused:
        msg = (f"{path}: refused to load: it needs Python global(s) {shown}, which loading with "
               f"weights_only=True does not admit ({detail or 'unpickling them could run arbitrary code'}). ")
    else:
        msg = f"{path}: refused to load: torch.load(weights_only=True) refused it ({detail}). "
    msg += "Nothing from the file was run. "
    modules_only = refused and all(_admit_module_global(n, probe=True) is not None for n in refused)
    if admit is None and modules_only:
        msg += ("These names come from the packages whose model classes welde_det.checkpoint.safe_load(path, "
                "allow_modules=True) may rebuild, as in an Ultralytics-native .pt file (e.g. yolov8n.pt, or "
                "an Ultralytics last.pt); it checks each against its allow-list. ")
        if purpose == "load":
            msg += f"It is not a welde_det checkpoint: {WHAT_IT_IS}. "
    elif admit is not None and refused:
        msg += ("They are outside the allow-list of torch.nn / ultralytics.nn / welde_det model classes "
                "that safe_load(allow_modules=True) admits. ")
    return UnsafeCheckpointError(msg + _IF_TRUSTED, path=path, refused=refused)


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_BLOCKED_RE = re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked")


def _refused_global(message: str) -> str | None:
    """The ``module.name`` torch's weights_only unpickler refused, parsed from its message."""
    for pattern in (_GLOBAL_RE, _BLOCKED_RE):
        m = pattern.search(message)
        if m:
            return m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"
    return None


def _torch_reason(message: str) -> str:
    """The reason inside torch's long weights_only error text."""
    _, marker, rest = message.partition("WeightsUnpickler error:")
    if marker:
        for line in rest.splitlines():
            line = line.strip().split(". Please use")[0]
            if line and not line.startswith("Check the documentation"):
                return line
    return _first_line(message)


def _first_line(exc: Any) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- pickle scan
def _scan(path: Path) -> set[str] | None:
    """Every global the archive's pickle names, by disassembly; ``None`` when not a zip archive.

    Names are normalised as torch's unpickler does (protocol-2 ``__builtin__`` -> ``builtins``).
    ``STACK_GLOBAL``/``INST``/``OBJ`` (which torch's loader refuses) are reported by opcode.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (pass a local path; nothing is downloaded)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = names[0].split("/", 1)[0] if names else ""
            if f"{prefix}/constants.pkl" in names:
                raise CheckpointError(f"{path}: a TorchScript archive, not a torch.save checkpoint; {WHAT_IT_IS}")
            if f"{prefix}/data.pkl" not in names:
                raise CheckpointError(f"{path}: a zip archive without data.pkl, not a torch checkpoint; {WHAT_IT_IS}")
            data = archive.read(f"{prefix}/data.pkl")
    except zipfile.BadZipFile:
        with path.open("rb") as f:
            head = f.read(2)
        if head[:1] != pickle.PROTO or len(head) < 2:  # the pre-1.6 format starts with a pickle
            raise CheckpointError(f"{path}: not a readable torch checkpoint (neither a torch.save zip archive "
                                  f"nor the legacy pickle format); {WHAT_IT_IS}") from None
        return None
    # the names torch's loader will look up: it maps protocol 2's Python 2 names its own way
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    found: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.add(f"{module}.{name}")
            if op.name in ("STACK_GLOBAL", "INST", "OBJ"):
                found.add(f"<pickle opcode {op.name}>")
    except (ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: its pickle is damaged ({exc}); {WHAT_IT_IS}") from exc
    return found


def _not_default(found: set[str]) -> set[str]:
    """The names in ``found`` that torch's weights_only loader does not admit by itself.

    Names this process registered with ``add_safe_globals`` (Ultralytics' own restricted
    loader does so for good) count as not admitted: only our allow-list decides.
    """
    return {n for n in found if n not in _torch_default_names()}


@functools.lru_cache(maxsize=1)
def _torch_default_names() -> frozenset[str]:
    """torch's built-in weights_only allow-list (tensor rebuild functions, dtypes, OrderedDict, ...)."""
    # torch has no public accessor for its default list alone: get_unsafe_globals_in_checkpoint
    # also subtracts process-wide registrations, and its scanner stops at opcodes it does not know
    from torch import _weights_only_unpickler

    return frozenset(_weights_only_unpickler._get_allowed_globals())


# --------------------------------------------------------------------------- allow-list
_PLAIN_TYPES = (
    "ultralytics.utils.IterableSimpleNamespace",
    "ultralytics.yolo.utils.IterableSimpleNamespace",  # before Ultralytics 8.0.44
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "pathlib._local.PosixPath",  # Python 3.13 pickles
    "pathlib._local.WindowsPath",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "builtins.getattr",
)


def _plain_type(name: str) -> Any:
    if name.endswith("IterableSimpleNamespace"):
        from ultralytics.utils import IterableSimpleNamespace

        return IterableSimpleNamespace
    if name.startswith("numpy."):
        import numpy as np

        return np.dtype if name == "numpy.dtype" else np.float64(0).__reduce__()[0]
    if name == "builtins.getattr":
        return _restricted_getattr
    if name in ("pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath"):
        return type(pathlib.Path())  # the other OS's concrete path cannot be built here
    return getattr(pathlib, name.rpartition(".")[2])


def _restricted_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as Ultralytics pickles use it (``Detect.forward`` of an admitted class), nothing else."""
    import torch

    if isinstance(obj, _RebuildOnly):  # a class the pickle named is pushed as its stand-in
        obj = obj.cls
    admitted = _admitted_classes()
    if name in ("forward", "forward_fuse"):
        if isinstance(obj, type) and obj in admitted:
            return getattr(obj, name)
        if isinstance(obj, torch.nn.Module) and type(obj) in admitted:
            return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not admitted")


class _RebuildOnly:
    """Stands for an admitted class in the pickle: ``NEWOBJ`` may rebuild it, ``REDUCE`` may not call it.

    torch's loader creates objects of an allow-listed class with ``cls.__new__(cls, *args)``
    (then ``__setstate__``) and calls allow-listed callables for ``REDUCE``; a genuine
    ``nn.Module`` pickle only does the former. Calling a model class would run its
    constructor with arguments from the file, so the stand-in refuses it.
    """

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name
        self.__module__ = cls.__module__
        self.__new__ = self._new  # looked up on the instance by torch's NEWOBJ

    def _new(self, _proxy: Any, *args: Any) -> Any:
        return self.cls.__new__(self.cls, *args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            f"the file calls {self.name}(...) (runs its constructor with arguments from the file); "
            "a saved model only rebuilds its objects"
        )


def _entries_for(name: str, obj: Any) -> list[Any]:
    """``safe_globals`` entries admitting ``obj`` under the pickled ``name``."""
    import torch

    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        # the real class under a name no GLOBAL opcode can spell (it has a newline): torch checks
        # type(instance) against the allow-list when it applies the pickled state
        return [(_RebuildOnly(obj, name), name), (obj, f"welde_det rebuild-only\n{obj.__module__}.{obj.__qualname__}")]
    if name == "numpy.dtype":
        import numpy as np

        # np.dtype objects are rebuilt then given their state: torch checks their concrete class
        dtype_classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUVOMm"}
        return [(obj, name)] + [(c, f"welde_det dtype\n{c.__qualname__}") for c in dtype_classes]
    return [(obj, name)]


def _admit_module_global(name: str, *, probe: bool = False) -> list[Any] | None:
    """Entries admitting the pickled global ``name`` under ``allow_modules=True``, or ``None``.

    With ``probe=True`` only the name is judged (no import): used to word error messages.
    """
    if name in _PLAIN_TYPES:
        return [] if probe else _entries_for(name, _plain_type(name))
    current = _LEGACY_ALIASES.get(name, name)
    module = current.rpartition(".")[0]
    package = next((p for p in MODULE_PACKAGES if module == p or module.startswith(p + ".")), None)
    if package is None:
        return None
    if probe:
        return []
    classes = _module_classes(package)
    obj = classes.get(current)
    if obj is None and module == "ultralytics.nn.modules":
        # Ultralytics 8.0 kept its layers in one module (ultralytics.nn.modules.Conv); the
        # package still exports each under that name
        obj = getattr(importlib.import_module(module), current.rpartition(".")[2], None)
        obj = obj if obj in classes.values() else None
    return None if obj is None else _entries_for(name, obj)


_WALKED: dict[str, dict[str, type]] = {}


def _module_classes(package: str) -> dict[str, type]:
    """``{module.qualname: cls}`` for every ``nn.Module`` subclass defined in ``package`` (walked once)."""
    import torch

    if package in _WALKED:
        return _WALKED[package]
    try:
        root = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{package} cannot be imported ({exc}); reading this file needs it") from exc
    modules = [root]
    if hasattr(root, "__path__"):
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            try:
                modules.append(importlib.import_module(info.name))
            except ImportError as exc:
                raise ImportError(f"importing {info.name} failed ({exc}) while listing the model classes "
                                  f"of {package} that safe_load(allow_modules=True) admits") from exc
    found: dict[str, type] = {}
    for mod in modules:
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == mod.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    _WALKED[package] = found
    return found


def _admitted_classes() -> set[type]:
    """The module classes of the packages walked so far (a class a pickle names was walked first)."""
    return {cls for classes in list(_WALKED.values()) for cls in classes.values()}
