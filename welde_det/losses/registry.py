"""The loss registry: ``register_loss`` adds a family member, ``build_loss`` makes one.

Names are registered per activation (``"softmax"`` or ``"sigmoid"``), so ``ce`` is
softmax cross-entropy in one family and binary cross-entropy in the other. Registering
the same (name, activation) twice raises.

Example:
    >>> loss = build_loss("focal", gamma=2.0)
    >>> loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).shape
    torch.Size([])
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from welde_det.losses.weighting import check_class_counts

__all__ = ["ACTIVATIONS", "available_losses", "build_loss", "check_loss_kwargs", "loss_parameters", "register_loss"]

ACTIVATIONS = ("softmax", "sigmoid")
_REGISTRY: dict[tuple[str, str], Callable[..., nn.Module]] = {}


def register_loss(name: str, *, activation: str = "softmax") -> Callable:
    """Class decorator adding a loss to the registry under ``(name, activation)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")

    def deco(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = (name, activation)
        if key in _REGISTRY:
            raise ValueError(f"loss {name!r} ({activation}) is already registered by {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        return cls

    return deco


def available_losses(activation: str | None = None) -> list[str]:
    """Sorted registry names, for one activation or for all."""
    return sorted({n for n, a in _REGISTRY if activation is None or a == activation})


def loss_parameters(name: str, activation: str = "softmax") -> dict[str, Any]:
    """The hyper-parameters a registered loss takes, with their defaults (no ``class_counts``).

    Example:
        >>> loss_parameters("ldam")["s"]
        30.0

    Raises:
        ValueError: unknown name or activation (as :func:`build_loss`).
    """
    cls = _lookup(name, activation)
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items()
            if k not in ("self", "class_counts") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_loss_kwargs(name: str, activation: str, kw: Mapping[str, Any]) -> Callable[..., nn.Module]:
    """Check that a registered loss takes the keyword names in ``kw`` (not their values); return its class.

    Raises:
        ValueError: unknown name or activation, or an argument the loss does not take.
    """
    cls = _lookup(name, activation)
    params = inspect.signature(cls.__init__).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kw if k not in params or k in ("self", "class_counts")] if not accepts_var_kw else []
    if unknown:
        allowed = sorted(p for p in params if p not in ("self", "class_counts"))
        raise ValueError(f"loss {name!r} ({activation}) got unknown argument(s) {unknown}; it accepts {allowed}")
    return cls


def _lookup(name: str, activation: str) -> Callable[..., nn.Module]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    key = (name, activation)
    if key not in _REGISTRY:
        valid = available_losses(activation)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {activation} loss {name!r}{hint} Valid names: {valid}")
    return _REGISTRY[key]


def build_loss(
    name: str,
    *,
    class_counts: Sequence[int | float] | torch.Tensor | None = None,
    activation: str = "softmax",
    **kw: Any,
) -> nn.Module:
    """Build a registered loss.

    Args:
        name: registry name (``available_losses(activation)`` lists them).
        class_counts: training instances per class (``ClassStats.effective_counts``);
            required by the weighted and margin losses.
        activation: ``"softmax"`` (integer targets, N×C logits) or ``"sigmoid"`` (dense
            one-vs-all; integer or soft targets).
        **kw: the loss's own hyper-parameters (``gamma``, ``beta``, ``max_m``, ``s``, ...).

    Returns:
        An ``nn.Module`` whose forward returns the mean loss as a 0-dim tensor.

    Raises:
        ValueError: unknown name (with the valid names and the closest match), unknown
            keyword, or invalid ``class_counts``.
    """
    cls = check_loss_kwargs(name, activation, kw)
    counts = check_class_counts(class_counts, name=f"loss {name!r}")
    return cls(class_counts=counts, **kw)
