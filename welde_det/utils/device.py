"""One check of a user's device string (``--device``) before any work is done.

``None``/``""`` means CUDA when available, else the CPU; ``"cpu"`` always works; ``"cuda"``,
``"cuda:N"`` or a bare ``"N"`` need that CUDA device on this machine. Anything else — an unknown
device name, or a GPU this machine does not have — is a :class:`DeviceError` (a
:class:`~welde_det.errors.UserError`, so the tools print it in one line with exit status 2),
rather than a CUDA runtime traceback half-way through loading a model.
"""

from __future__ import annotations

from welde_det.errors import UserError

__all__ = ["DeviceError", "check_device"]


class DeviceError(UserError):
    """A device that is not a device, or that this machine does not have (flag and value named)."""


def check_device(device: str | None, *, flag: str = "--device") -> str | None:
    """Check a device string and return it normalised (``None`` for the default).

    Args:
        device: ``None``/``""`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"N"``.
        flag: how the user gave it (``--device``, ``train.device=``), for the message.

    Returns:
        ``None`` for the default, else the torch device string (``"0"`` -> ``"cuda:0"``).

    Raises:
        DeviceError: an unknown device, or a CUDA device that this machine does not have.

    Example:
        >>> check_device("cpu"), check_device(None)
        ('cpu', None)
    """
    if device is None or str(device).strip() == "":
        return None
    import torch

    spec = str(device).strip()
    spec = f"cuda:{spec}" if spec.isdigit() else spec
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N "
                          "(or leave it unset for CUDA when available)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"{flag} {device!r}: no CUDA device is available here; use {flag} cpu "
                              "(or leave it unset for the best available)")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{flag} {device!r}: this machine has {count} CUDA device(s) (cuda:0.."
                              f"cuda:{count - 1}); choose one of them or cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"{flag} {device!r}: welde_det runs on cpu or cuda; use one of them")
    return str(dev)
