"""Carrying trained weights into a model with WELDE heads.

Detectors with K heads are initialised from checkpoints that have other heads (a K = 1
stage-1 model, a plain Ultralytics / torchvision model): entries are taken where name and
shape match, and the caller learns which heads arrived, so that
:meth:`~welde_det.welde.WELDEHeads.spread_first_head` can start the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["load_matching", "loaded_heads"]

_CLASSIFIER = re.compile(r"\.classifiers\.(\d+)\.")


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor],
                  keep: Callable[[str], bool] = lambda name: True) -> set[str]:
    """Load the entries of ``state`` whose name and shape exist in ``module`` (and that ``keep``
    accepts); return their names.

    Raises:
        TypeError: ``state`` is not a mapping of tensors.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    own = module.state_dict()
    chosen = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape and keep(k)}
    module.load_state_dict(chosen, strict=False)
    return set(chosen)


def loaded_heads(names: set[str] | list[str], container: str) -> set[int]:
    """Indices k of the heads whose classifier is among ``names`` (entries under ``container``)."""
    return {int(m.group(1)) for n in names if container in n and (m := _CLASSIFIER.search(n))}
