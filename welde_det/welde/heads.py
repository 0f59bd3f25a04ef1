"""WELDE heads: one adapter and one classifier per loss component, on a shared feature.

``Adapter`` is a residual bottleneck f + W2·act(W1·f) (1×1 convolutions for feature maps)
whose W2 starts at zero, so every head starts as the shared (frozen) feature and
specialises only as its own loss asks. ``WELDEHeads`` holds K of them with K classifiers;
the classifier of an ``ldam`` / ``lmf`` component is cosine (normalised features and
weights), as LDAM's reference uses with s = 30.

Shape:
    features (N, D) → K tensors (N, C); with ``conv=True`` (N, D, H, W) → K × (N, C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COSINE_COMPONENTS", "Adapter", "CosineClassifier", "WELDEHeads"]

#: Components whose classifier is cosine by default (margin losses expect bounded logits).
COSINE_COMPONENTS = ("ldam", "lmf")


class Adapter(nn.Module):
    """Residual bottleneck adapter, identity at initialisation.

    Args:
        dim: feature dimension D (channels for feature maps).
        hidden: bottleneck width (default ``max(16, dim // 8)``).
        conv: use 1×1 convolutions on (N, D, H, W) feature maps.

    Example:
        >>> a = Adapter(16)
        >>> x = torch.randn(2, 16)
        >>> torch.equal(a(x), x)
        True
    """

    def __init__(self, dim: int, hidden: int | None = None, *, conv: bool = False) -> None:
        super().__init__()
        hidden = hidden or max(16, dim // 8)
        layer = nn.Conv2d if conv else nn.Linear
        kw = {"kernel_size": 1} if conv else {}
        self.down = layer(dim, hidden, **kw)
        self.act = nn.SiLU()
        self.up = layer(hidden, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class CosineClassifier(nn.Module):
    """Logits = cos(feature, class weight) ∈ [−1, 1] (scale them in the loss, e.g. LDAM's s).

    Args:
        dim: feature dimension; num_classes: C; conv: work on (N, D, H, W) maps.
    """

    def __init__(self, dim: int, num_classes: int, *, conv: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        if self.conv:
            return torch.einsum("ndhw,cd->nchw", F.normalize(x, dim=1), w)
        return F.normalize(x, dim=1) @ w.t()


class WELDEHeads(nn.Module):
    """K adapters + K classifiers on one shared feature.

    Args:
        in_dim: shared feature dimension D.
        num_classes: C.
        components: registry names of the K loss components (one head each).
        hidden: adapter bottleneck width.
        conv: feature maps (N, D, H, W) with 1×1 convolutions instead of vectors.
        cosine: per head, whether its classifier is cosine (default: ``ldam``/``lmf``).
        bias_init: initial classifier bias (e.g. a prior for sigmoid detection heads).

    Example:
        >>> heads = WELDEHeads(32, 6, ["ce", "focal", "cb", "ldam"])
        >>> [t.shape for t in heads(torch.randn(5, 32))][0]
        torch.Size([5, 6])
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        components: Sequence[str],
        *,
        hidden: int | None = None,
        conv: bool = False,
        cosine: Sequence[bool] | None = None,
        bias_init: float | None = None,
    ) -> None:
        super().__init__()
        components = tuple(components)
        if not components:
            raise ValueError("WELDEHeads needs at least one component")
        if cosine is None:
            cosine = [c in COSINE_COMPONENTS for c in components]
        if len(cosine) != len(components):
            raise ValueError(f"cosine has {len(cosine)} entries for {len(components)} components")
        self.components = components
        self.num_classes = int(num_classes)
        self.conv = conv
        self.cosine = tuple(bool(c) for c in cosine)
        self.adapters = nn.ModuleList(Adapter(in_dim, hidden, conv=conv) for _ in components)
        classifiers = []
        for is_cos in self.cosine:
            if is_cos:
                classifiers.append(CosineClassifier(in_dim, num_classes, conv=conv))
            else:
                clf = nn.Conv2d(in_dim, num_classes, 1) if conv else nn.Linear(in_dim, num_classes)
                if bias_init is not None:
                    nn.init.constant_(clf.bias, bias_init)
                classifiers.append(clf)
        self.classifiers = nn.ModuleList(classifiers)

    def __len__(self) -> int:
        return len(self.components)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [clf(adapter(features)) for adapter, clf in zip(self.adapters, self.classifiers)]
