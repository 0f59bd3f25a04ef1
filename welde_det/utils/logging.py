"""Logging set-up for the command-line tools (the library itself only creates loggers).

``setup_logging`` is called by ``tools/*.py``; progress bars are on only on the main
process (``RANK``/``LOCAL_RANK`` unset or 0) and when stderr is a terminal or CI forces them.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["is_main_process", "progress_enabled", "setup_logging"]


def is_main_process() -> bool:
    """True on the rank-0 process of a DDP job, and in ordinary runs."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def progress_enabled() -> bool:
    """Whether tqdm bars should be shown (main process, not disabled by WELDE_NO_PROGRESS)."""
    return is_main_process() and not os.environ.get("WELDE_NO_PROGRESS")


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once: INFO (DEBUG with ``verbose``) on the main rank."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process():
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
