"""The one base class of errors a user can fix by changing an input, a flag or a config.

Every typed error the package raises for bad input (a config key, a data file, a checkpoint,
a DICOM series) subclasses :class:`UserError`, itself a ``ValueError`` so existing
``except ValueError`` callers keep working. The command-line tools catch it and print one
line (what, where, what to do) with exit status 2; ``--debug`` shows the traceback instead
(:func:`welde_det.utils.cli.run_cli`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input the user can fix; the message names the file/key/value and what to do."""
