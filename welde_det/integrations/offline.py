"""Ultralytics kept offline by welde_det itself, with nothing global left changed.

Ultralytics reaches the network in several places nobody asked for (checked against 8.4):

- importing ``ultralytics.utils`` resolves two host names (``is_online()``) unless
  ``$YOLO_OFFLINE`` is set, and stores the answer in ``ONLINE`` (copied by value into
  ``ultralytics.utils.checks`` and ``ultralytics.utils.events``); importing it (and cv2) also
  writes a handful of variables into ``os.environ``;
- ``SETTINGS["sync"]`` (true by default) with ``ONLINE`` enables usage analytics
  (``ultralytics.utils.events``) and, with an API key in the settings or
  ``$ULTRALYTICS_API_KEY``, the platform callbacks upload the training run;
- ``check_det_dataset`` ends with ``check_font``, which sends a HEAD request to GitHub when
  ``Arial.ttf`` is not in Ultralytics' config folder (even with ``$YOLO_OFFLINE``) — the
  trainer in :mod:`welde_det.integrations.yolo` reads its own data YAML instead;
- the trainer's AMP check on CUDA loads ``yolo26n.pt``, downloading it when missing.

:func:`offline_import` wraps the import of Ultralytics (``$YOLO_OFFLINE`` set while it
runs, then ``os.environ`` restored exactly), and :func:`ultralytics_offline` wraps training
and prediction: it sets the online flags to false, ``sync`` off and the API key empty in
memory (``dict.__setitem__``: Ultralytics' settings file is never written), removes
``$ULTRALYTICS_API_KEY`` and sets ``$YOLO_OFFLINE`` (so DDP workers import offline), swaps the
AMP check for one that needs no download, and restores every one of them on exit.
Ultralytics' DDP workers are processes of their own that read the settings file again:
:func:`offline_worker` closes the same paths there, for the worker's lifetime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["OFFLINE_ENV", "offline_import", "offline_worker", "ultralytics_offline"]

logger = logging.getLogger(__name__)

OFFLINE_ENV = "YOLO_OFFLINE"
_API_KEY_ENV = "ULTRALYTICS_API_KEY"
_MISSING = object()


def _restore_environ(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@contextlib.contextmanager
def offline_import() -> Iterator[None]:
    """Import third-party modules (Ultralytics, cv2) inside this block: offline, and ``os.environ`` as before.

    ``$YOLO_OFFLINE`` is set while the block runs, so Ultralytics' import-time ``is_online()``
    makes no DNS query; every variable the imports add or change is put back afterwards.
    """
    saved = dict(os.environ)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        _restore_environ(saved)


def _offline_amp_check(model: Any) -> bool:
    """Ultralytics' ``check_amp`` without its download of ``yolo26n.pt``: AMP as the config asks.

    The known-bad GPU list is honoured as in Ultralytics; the numeric comparison on a
    downloaded model is not run (welde_det never downloads weights).
    """
    import re

    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    gpu = torch.cuda.get_device_name(device)
    if re.search(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", gpu,
                 re.IGNORECASE):
        logger.warning("AMP disabled: AMP training on %s may give NaN losses (Ultralytics' GPU list)", gpu)
        return False
    logger.info("AMP on as configured (Ultralytics' AMP check downloads a model; skipped offline)")
    return True


@contextlib.contextmanager
def ultralytics_offline() -> Iterator[None]:
    """Run Ultralytics training or prediction with every network path closed; all state restored on exit.

    Safe to nest. Only modules of Ultralytics that are already imported are touched (an
    import inside the block happens with ``$YOLO_OFFLINE`` set, so it starts offline).
    """
    saved_env = dict(os.environ)
    os.environ[OFFLINE_ENV] = "1"
    os.environ.pop(_API_KEY_ENV, None)
    undo: list[tuple[Any, str, Any]] = []  # (module/object, attribute, old value)
    dict_undo: list[tuple[dict, str, Any]] = []

    def set_attr(obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name, _MISSING)
        if old is _MISSING:
            return
        undo.append((obj, name, old))
        setattr(obj, name, value)

    try:
        for mod_name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events",
                         "ultralytics.utils.downloads"):
            mod = sys.modules.get(mod_name)
            if mod is not None:
                set_attr(mod, "ONLINE", False)
        events = sys.modules.get("ultralytics.utils.events")
        if events is not None and getattr(events, "events", None) is not None:
            set_attr(events.events, "enabled", False)
        trainer_mod = sys.modules.get("ultralytics.engine.trainer")
        if trainer_mod is not None:
            set_attr(trainer_mod, "check_amp", _offline_amp_check)
        utils = sys.modules.get("ultralytics.utils")
        settings = getattr(utils, "SETTINGS", None) if utils is not None else None
        if isinstance(settings, dict):
            for key, value in (("sync", False), ("api_key", "")):
                if key in settings:
                    dict_undo.append((settings, key, settings[key]))
                    dict.__setitem__(settings, key, value)  # in memory only: the settings file is not written
        yield
    finally:
        for settings, key, old in reversed(dict_undo):
            dict.__setitem__(settings, key, old)
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)
        _restore_environ(saved_env)


_WORKER_STACK: contextlib.ExitStack | None = None


def offline_worker() -> bool:
    """In a DDP worker process started by an offline parent: stay offline for the process's lifetime.

    Ultralytics' DDP runs each rank in a fresh process that re-reads its settings file (an
    API key there would enable the platform callbacks, which the trainer runs from its
    constructor). The worker inherits ``$YOLO_OFFLINE`` and ``$LOCAL_RANK``; when both are
    set this enters :func:`ultralytics_offline` once and never leaves it (the process exists
    for this training only). Returns whether it did.
    """
    global _WORKER_STACK
    if os.environ.get("LOCAL_RANK") is None or os.environ.get(OFFLINE_ENV) != "1":
        return False
    if _WORKER_STACK is None:
        _WORKER_STACK = contextlib.ExitStack()
        _WORKER_STACK.enter_context(ultralytics_offline())
    return True
