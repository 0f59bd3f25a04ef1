"""A trained image classifier rebuilt from the one checkpoint schema (``framework: classify``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from welde_det.classes import ClassStats
from welde_det.integrations.classify import ImageClassifier

__all__ = ["OBJECTIVE_PREFIX", "TrainedClassifier", "build_classifier", "classifier_from_checkpoint", "split_state"]


OBJECTIVE_PREFIX = "objective."


def build_classifier(arch: str, class_counts: list[int], welde: dict[str, Any], *, in_channels: int,
                     weights: Any = None) -> tuple[ImageClassifier, torch.nn.Module]:
    """(model, objective) from plain values: the arch, training counts and the WELDE spec's dict."""
    from welde_det.welde.spec import WELDESpec

    spec = WELDESpec.from_dict(welde)
    kw = spec.model_kwargs()
    model = ImageClassifier(arch, len(class_counts), kw["components"], in_channels=in_channels, weights=weights,
                            hidden=kw["hidden"], heads=kw["heads"])
    return model, spec.build_objective(class_counts)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A classify checkpoint's state dict -> (model state, objective state)."""
    n = len(OBJECTIVE_PREFIX)
    return ({k: v for k, v in state.items() if not k.startswith(OBJECTIVE_PREFIX)},
            {k[n:]: v for k, v in state.items() if k.startswith(OBJECTIVE_PREFIX)})


class TrainedClassifier:
    """Model + fusion weights + ClassStats; :meth:`predict_proba` gives fused probabilities (N, C)."""

    framework = "classify"

    def __init__(self, model: ImageClassifier, objective: torch.nn.Module, class_stats: ClassStats,
                 device: str = "cpu", spec: dict[str, Any] | None = None) -> None:
        self.model, self.objective = model.to(device).eval(), objective.to(device).eval()
        self.class_stats, self.names, self.device = class_stats, list(class_stats.names), device
        self.spec = spec

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Fused probabilities (N, C) for images (N, C, H, W) float32 in [0, 1]."""
        w = self.objective.fusion_weights().to(self.device)
        out = [self.model.predict_proba(torch.from_numpy(x[i:i + batch]).to(self.device), w).cpu().numpy()
               for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), dtype=np.float32)


def classifier_from_checkpoint(ckpt: Any, device: str = "cpu") -> TrainedClassifier:
    """Rebuild a :class:`TrainedClassifier` from a loaded :class:`~welde_det.checkpoint.Checkpoint`."""
    stats: ClassStats = ckpt.class_stats
    extra = ckpt.extra or {}
    model, objective = build_classifier(ckpt.arch, list(stats.effective_counts), ckpt.welde,
                                        in_channels=int(extra.get("in_channels", 1)))
    m_state, o_state = split_state(ckpt.model_state)
    model.load_state_dict(m_state)
    objective.load_state_dict(o_state)
    return TrainedClassifier(model, objective, stats, device, spec=dict(ckpt.welde))
