"""WELDE: Weighted Ensemble Loss with Diversity Enhancement (METHOD.md §3).

- :class:`Adapter`, :class:`WELDEHeads`: K adapters + K classifiers on one shared feature;
- :class:`WELDEObjective`: EMA-normalised components, learnable floored weights, relaxed
  sum-to-one penalty, bounded Jensen–Shannon diversity;
- :func:`fuse`: weighted probability fusion at inference;
- :class:`WELDESpec`, :func:`build_spec`: the one specification (components, mode, losses,
  head types with their scales) every integration takes as plain keyword arguments;
- :func:`build_welde`: heads and objective from registry names.
"""

from __future__ import annotations

from welde_det.welde.builder import build_welde
from welde_det.welde.fusion import fuse
from welde_det.welde.heads import Adapter, CosineClassifier, WELDEHeads
from welde_det.welde.objective import WELDEObjective, js_diversity, single_loss_objective
from welde_det.welde.spec import WELDESpec, build_spec

__all__ = ["Adapter", "CosineClassifier", "WELDEHeads", "WELDEObjective", "WELDESpec", "build_spec", "build_welde",
           "fuse", "js_diversity", "single_loss_objective"]
