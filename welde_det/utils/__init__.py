"""Small shared helpers: atomic file writes and logging set-up for the command-line tools."""

from __future__ import annotations

from welde_det.utils.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    load_json,
)

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_writer", "load_json"]
