"""Build matching WELDE heads and objective from registry names in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from welde_det.losses import build_loss
from welde_det.welde.heads import WELDEHeads
from welde_det.welde.objective import WELDEObjective

__all__ = ["build_welde"]


def build_welde(
    components: Sequence[str],
    *,
    class_counts: Sequence[int | float] | torch.Tensor,
    num_classes: int,
    in_dim: int,
    activation: str = "softmax",
    loss_params: Mapping[str, Mapping[str, Any]] | None = None,
    conv: bool = False,
    hidden: int | None = None,
    cosine: Sequence[bool] | None = None,
    bias_init: float | None = None,
    **objective_kw: Any,
) -> tuple[WELDEHeads, WELDEObjective]:
    """Heads and objective for K components.

    Args:
        components: registry names, one head each (``("ce",)*4`` is the CE-ensemble control).
        class_counts: training instances per class (``ClassStats.effective_counts``; for
            two-stage detectors including the background entry).
        num_classes: C, the logit width.
        in_dim: the shared feature dimension.
        activation: ``"softmax"`` or ``"sigmoid"``.
        loss_params: extra keyword arguments per registry name.
        conv, hidden, cosine, bias_init: see :class:`~welde_det.welde.WELDEHeads`.
        **objective_kw: see :class:`~welde_det.welde.WELDEObjective`.

    Raises:
        ValueError: an unknown component name (listing the valid ones), or class counts
            that do not match ``num_classes``.
    """
    components = tuple(components)
    if len(class_counts) != num_classes:
        raise ValueError(f"build_welde: {len(class_counts)} class counts for num_classes={num_classes}")
    loss_params = dict(loss_params or {})
    unknown = sorted(set(loss_params) - set(components))
    if unknown:
        raise ValueError(f"loss_params names {unknown}, which are not among the components {list(components)}")
    losses = [(name, build_loss(name, class_counts=class_counts, activation=activation, **loss_params.get(name, {})))
              for name in components]
    heads = WELDEHeads(in_dim, num_classes, components, hidden=hidden, conv=conv, cosine=cosine, bias_init=bias_init)
    objective = WELDEObjective(losses, activation=activation, **objective_kw)
    return heads, objective
