"""A trained image classifier rebuilt from the one checkpoint schema (``framework: classify``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from welde_det.classes import ClassStats
from welde_det.integrations.classify import ImageClassifier

__all__ = ["TrainedClassifier", "build_classifier", "classifier_from_checkpoint"]


def build_classifier(arch: str, class_counts: list[int], welde: dict[str, Any], *, in_channels: int,
                     weights: Any = None) -> ImageClassifier:
    """The classifier (with its objective) from plain values: the arch, training counts and the spec's dict."""
    from welde_det.welde.spec import WELDESpec

    spec = WELDESpec.from_dict(welde)
    return ImageClassifier(arch, len(class_counts), class_counts=class_counts, in_channels=in_channels,
                           weights=weights, **spec.model_kwargs())


class TrainedClassifier:
    """Model (+ its objective's fusion weights) + ClassStats; :meth:`predict_proba` gives fused probabilities."""

    framework = "classify"

    def __init__(self, model: ImageClassifier, class_stats: ClassStats, device: str = "cpu",
                 spec: dict[str, Any] | None = None) -> None:
        self.model = model.to(device).eval()
        self.class_stats, self.names, self.device = class_stats, list(class_stats.names), device
        self.spec = spec if spec is not None else model.welde_spec.to_dict()

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Fused probabilities (N, C) for images (N, C, H, W) float32 in [0, 1]."""
        self.model.eval()
        out = [self.model.predict_proba(torch.from_numpy(x[i:i + batch]).to(self.device)).cpu().numpy()
               for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), dtype=np.float32)


def classifier_from_checkpoint(ckpt: Any, device: str = "cpu") -> TrainedClassifier:
    """Rebuild a :class:`TrainedClassifier` from a loaded :class:`~welde_det.checkpoint.Checkpoint`."""
    stats: ClassStats = ckpt.class_stats
    extra = ckpt.extra or {}
    model = build_classifier(ckpt.arch, list(stats.effective_counts), ckpt.welde,
                             in_channels=int(extra.get("in_channels", 1)))
    model.load_state_dict(ckpt.model_state)
    return TrainedClassifier(model, stats, device, spec=dict(ckpt.welde))
