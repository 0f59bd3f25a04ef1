"""The command-line tools' common shell: one-line user errors with exit status 2, ``--debug``.

``tools/*.py`` parse their arguments and call one engine function; this module turns the
typed errors of the package (:class:`welde_det.errors.UserError` and the OS's own
file errors) into a single ``error: ...`` line on stderr and exit status 2, the way argparse
reports a bad flag. ``--debug`` (or ``WELDE_DEBUG=1``) re-raises instead, for a traceback.
Errors that are not the user's (bugs) are never hidden.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from welde_det.errors import UserError

__all__ = ["USER_ERRORS", "add_debug_flag", "one_line", "run_cli"]

#: what a command-line tool reports as a user error (one line, exit 2) rather than a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` (show the full traceback of a user error) to a tool's parser."""
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (newlines joined with '; '), prefixed by nothing."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts) or type(exc).__name__


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's ``main(argv)``; a user error becomes ``error: <one line>`` and exit status 2.

    ``--debug`` in ``argv`` (or ``WELDE_DEBUG=1``) lets the exception through with its traceback.
    Ctrl-C exits 130 with one line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("WELDE_DEBUG", "") not in ("", "0")
    try:
        return int(main(args) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
