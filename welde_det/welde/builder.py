"""Build matching WELDE heads and objective from registry names in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from welde_det.welde.heads import WELDEHeads
from welde_det.welde.objective import WELDEObjective
from welde_det.welde.spec import build_spec

__all__ = ["build_welde"]


def build_welde(
    components: Sequence[str],
    *,
    class_counts: Sequence[int | float] | torch.Tensor,
    num_classes: int,
    in_dim: int,
    activation: str = "softmax",
    mode: str = "welde",
    loss_params: Mapping[str, Mapping[str, Any]] | None = None,
    head: str | Sequence[str] = "auto",
    conv: bool = False,
    hidden: int | None = None,
    bias_init: float | None = None,
    **objective_kw: Any,
) -> tuple[WELDEHeads, WELDEObjective]:
    """Heads and objective for K components, through one :func:`~welde_det.welde.spec.build_spec`.

    Args:
        components: registry names, one head each (``("ce",)*4`` is the CE-ensemble control).
        class_counts: training instances per class (``ClassStats.effective_counts``; for
            two-stage detectors including the background entry).
        num_classes: C, the logit width.
        in_dim: the shared feature dimension.
        activation: ``"softmax"`` or ``"sigmoid"``.
        mode: ``"single"``, ``"ce_ensemble"`` or ``"welde"``.
        loss_params: extra keyword arguments per registry name.
        head: head type(s) with their scale (see :func:`~welde_det.welde.spec.build_spec`).
        conv, hidden, bias_init: see :class:`~welde_det.welde.WELDEHeads`.
        **objective_kw: see :class:`~welde_det.welde.WELDEObjective`.

    Raises:
        ValueError: an unknown component name (listing the valid ones), a head that cannot
            become confident, or class counts that do not match ``num_classes``.
    """
    if len(class_counts) != num_classes:
        raise ValueError(f"build_welde: {len(class_counts)} class counts for num_classes={num_classes}")
    spec = build_spec(components=components, mode=mode, activation=activation, loss_params=loss_params, head=head,
                      objective_kw=objective_kw, hidden=hidden)
    return spec.build_heads(in_dim, num_classes, conv=conv, bias_init=bias_init), spec.build_objective(class_counts)
