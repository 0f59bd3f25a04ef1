"""The imbalance-aware loss library and class-aware samplers (METHOD.md §2).

``build_loss(name, *, class_counts=None, activation="softmax", **kw)`` is the one way
to make a loss; ``available_losses()`` lists the names. Importing this package registers
the softmax, dense (sigmoid) and metric families.
"""

from __future__ import annotations

from welde_det.losses import dense, metric, softmax  # noqa: F401  (registers the families)
from welde_det.losses.registry import available_losses, build_loss, loss_parameters, register_loss
from welde_det.losses.samplers import (
    ClassBalancedSampler,
    InstanceBalancedSampler,
    ProgressivelyBalancedSampler,
    RepeatFactorSampler,
    SquareRootSampler,
    build_detection_sampler,
    build_sampler,
)
from welde_det.losses.weighting import (
    bwcce_weights,
    class_balanced_weights,
    inverse_frequency_weights,
    ldam_margins,
)

__all__ = [
    "ClassBalancedSampler",
    "InstanceBalancedSampler",
    "ProgressivelyBalancedSampler",
    "RepeatFactorSampler",
    "SquareRootSampler",
    "available_losses",
    "build_detection_sampler",
    "build_loss",
    "build_sampler",
    "bwcce_weights",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "ldam_margins",
    "loss_parameters",
    "register_loss",
]
