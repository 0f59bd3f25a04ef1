"""WELDE heads: one adapter and one classifier per loss component, on a shared feature.

``Adapter`` is a residual bottleneck f + W2·act(W1·f) (1×1 convolutions for feature maps)
whose W2 starts at zero, so every head starts as the shared (frozen) feature and
specialises only as its own loss asks. ``WELDEHeads`` holds K of them with K classifiers,
each ``"linear"`` or ``"cosine"`` (normalised features and weights). The head type goes
with its loss's scale — a cosine head only with a scale s ≥ 10 (LDAM's reference: 30),
a linear one with s = 1 — which :class:`~welde_det.welde.spec.WELDESpec` chooses and
checks; without ``heads`` the ``ldam`` / ``lmf`` heads are cosine, matching those losses'
default s = 30.

Shape:
    features (N, D) → K tensors (N, C); with ``conv=True`` (N, D, H, W) → K × (N, C, H, W).
    Feature maps are evaluated as rows (N·H·W, D), so the fused path returns the maps in
    channels-last memory (strides of an (N, H, W, C) tensor; ``.contiguous()`` gives NCHW) —
    the layout dense losses read, (N, H·W, C) — and reads channels-last input without a copy.

Speed: ``WELDEHeads.forward`` evaluates the K heads together rather than one module after
the other (same parameters, same ``state_dict``, same values to float32 rounding; the plain
per-head loop is ``WELDEHeads.forward_loop``). The K down-projections are one matmul
D → K·h. A linear classifier never needs its head's adapted feature, because

    W_c·(f + W2·a + b2) + b_c = W_c·f + (W_c·W2)·a + (W_c·b2 + b_c),   a = act(W1·f + b1),

so the linear heads' W_c·f are one matmul D → K·C and each adds a (C × h) product of its
adapter's hidden units: the (N, D) adapted features — D/C times wider than the logits, and
what dominated time and memory — are built only for cosine heads, which must normalise
them. Feature maps go through the same matrices over channels (1×1 convolutions are
matmuls over the channel dimension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COSINE_COMPONENTS", "Adapter", "CosineClassifier", "WELDEHeads"]

#: Components whose classifier is cosine when ``heads`` is not given (their losses' default s = 30).
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


def _cosine_logits(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(x_i, w_c) = (x_i · ŵ_c) / max(‖x_i‖, eps) for rows x (M, D) and class weights (C, D).

    The same value as ``F.normalize(x) @ F.normalize(w).t()``, but the division happens on
    the (M, C) logits instead of the (M, D) features (C ≪ D), in the forward and backward.
    """
    return (x @ F.normalize(weight, dim=1).t()) / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (out, in) or a 1×1 Conv2d weight (out, in, 1, 1) as an (out, in) matrix."""
    return weight.reshape(weight.shape[0], -1)


def _is_plain_layer(layer: nn.Module, conv: bool) -> bool:
    """A Linear (or 1×1, stride-1, unpadded, ungrouped Conv2d) with a bias and no hooks."""
    if layer._forward_hooks or layer._forward_pre_hooks or getattr(layer, "bias", None) is None:
        return False
    if not conv:
        return type(layer) is nn.Linear
    return (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1)


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
        if self.conv:
            return torch.einsum("ndhw,cd->nchw", F.normalize(x, dim=1), F.normalize(self.weight, dim=1))
        if x.ndim == 2:
            return _cosine_logits(x, self.weight)
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class WELDEHeads(nn.Module):
    """K adapters + K classifiers on one shared feature.

    Args:
        in_dim: shared feature dimension D.
        num_classes: C.
        components: registry names of the K loss components (one head each).
        hidden: adapter bottleneck width.
        conv: feature maps (N, D, H, W) with 1×1 convolutions instead of vectors.
        heads: per component ``"linear"`` or ``"cosine"`` (default: cosine for ``ldam``/``lmf``);
            :meth:`~welde_det.welde.spec.WELDESpec.build_heads` passes the spec's.
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
        heads: Sequence[str] | None = None,
        bias_init: float | None = None,
    ) -> None:
        super().__init__()
        components = tuple(components)
        if not components:
            raise ValueError("WELDEHeads needs at least one component")
        if heads is None:
            heads = ["cosine" if c in COSINE_COMPONENTS else "linear" for c in components]
        heads = tuple(heads)
        if len(heads) != len(components) or not set(heads) <= {"linear", "cosine"}:
            raise ValueError(f"heads must be 'linear' or 'cosine' per component; got {list(heads)} for "
                             f"{len(components)} components {list(components)}")
        self.components = components
        self.num_classes = int(num_classes)
        self.conv = conv
        self.head_types = heads
        self.cosine = tuple(h == "cosine" for h in heads)
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

    @torch.no_grad()
    def spread_first_head(self, jitter: float = 1e-2, seed: int = 0) -> None:
        """Start every head as head 0 — e.g. after loading a trained K = 1 (stage-1) head.

        Head k ≥ 1 gets head 0's adapter and classifier (a cosine classifier takes a linear
        one's weight rows as its class directions), and its adapter's down-projection a
        seeded jitter of ``jitter`` × that weight's standard deviation: heads trained with
        the same loss (``ce_ensemble``) would otherwise get identical gradients and never
        leave each other — the jitter plays the control's "different seeds" without
        changing what the heads compute at the start beyond that jitter.
        """
        g = torch.Generator().manual_seed(seed)
        src_adapter, src_clf = self.adapters[0], self.classifiers[0]
        for k in range(1, len(self.adapters)):
            self.adapters[k].load_state_dict(src_adapter.state_dict())
            clf = self.classifiers[k]
            if type(clf) is type(src_clf):
                clf.load_state_dict(src_clf.state_dict())
            else:
                clf.weight.copy_(src_clf.weight.reshape(clf.weight.shape))
                if getattr(clf, "bias", None) is not None and getattr(src_clf, "bias", None) is not None:
                    clf.bias.copy_(src_clf.bias)
            w = self.adapters[k].down.weight
            w.add_(torch.randn(w.shape, generator=g).to(w) * (jitter * float(w.std())))

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        """K logit tensors, one per head, in component order.

        Evaluates the heads together (see the module docstring); falls back to
        :meth:`forward_loop` when a submodule was replaced by something else or carries
        hooks, or for inputs of another rank (unbatched maps, vectors with extra leading dims).
        """
        if not self._fusable(features):
            return self.forward_loop(features)
        if not self.conv:
            return self._fused(features)
        n, d, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, d)  # (N·H·W, D): 1×1 convs become matmuls
        return [o.reshape(n, h, w, o.shape[-1]).permute(0, 3, 1, 2) for o in self._fused(rows, contiguous=False)]

    def forward_loop(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Reference evaluation: each head's adapter and classifier module in turn."""
        return [clf(adapter(features)) for adapter, clf in zip(self.adapters, self.classifiers)]

    def _fusable(self, features: torch.Tensor) -> bool:
        if features.ndim != (4 if self.conv else 2):
            return False
        hidden = self.adapters[0].down.weight.shape[0]
        for adapter, clf in zip(self.adapters, self.classifiers):
            if (type(adapter) is not Adapter or adapter._forward_hooks or adapter._forward_pre_hooks
                    or type(adapter.act) is not nn.SiLU or not _is_plain_layer(adapter.down, self.conv)
                    or not _is_plain_layer(adapter.up, self.conv) or adapter.down.weight.shape[0] != hidden):
                return False
            if type(clf) is CosineClassifier:
                if clf._forward_hooks or clf._forward_pre_hooks:
                    return False
            elif not _is_plain_layer(clf, self.conv):
                return False
        return True

    def _fused(self, x: torch.Tensor, *, contiguous: bool = True) -> list[torch.Tensor]:
        """All K heads on rows x (M, D) → K × (M, C) (with ``contiguous=False`` the linear heads' are
        column slices of one (M, K_lin·C) matrix).

        One matmul gives every head's hidden units a = act(W1·x + b1) (K·h columns); one
        gives every linear head's W_c·x + (W_c·b2 + b_c) (C columns each), and a third adds
        their (W_c·W2)·a through a block-diagonal (K_lin·C, K·h) matrix. (Two matmuls, not
        one of K·h + K_lin·C columns: BLAS is much slower at such odd widths.) Cosine heads
        build their adapted feature x + W2·a + b2 and divide its logits by its norm.
        """
        c = self.num_classes
        hidden = self.adapters[0].down.weight.shape[0]
        w1 = torch.cat([_matrix(a.down.weight) for a in self.adapters])  # (K·h, D)
        b1 = torch.cat([a.down.bias for a in self.adapters])
        acts = F.silu(F.linear(x, w1, b1))  # (M, K·h)
        linear = [type(clf) is not CosineClassifier for clf in self.classifiers]
        out: list[torch.Tensor | None] = [None] * len(self.adapters)
        if any(linear):
            wc = [_matrix(clf.weight) if lin else None for clf, lin in zip(self.classifiers, linear)]  # (C, D)
            bias = [torch.addmv(clf.bias, w, a.up.bias)  # W_c·b2 + b_c
                    for a, clf, w, lin in zip(self.adapters, self.classifiers, wc, linear) if lin]
            direct = F.linear(x, torch.cat([w for w in wc if w is not None]), torch.cat(bias))  # (M, K_lin·C)
            # (W_c·W2) (C, h) per linear head, in its own adapter's columns; cosine heads: no rows
            blocks = [w @ _matrix(a.up.weight) if lin else acts.new_zeros(0, hidden)
                      for a, w, lin in zip(self.adapters, wc, linear)]
            logits = iter(torch.addmm(direct, acts, torch.block_diag(*blocks).t()).split(c, dim=1))
            out = [(next(logits).contiguous() if contiguous else next(logits)) if lin else None for lin in linear]
        hid = acts.split(hidden, dim=1)
        for k, (a, clf) in enumerate(zip(self.adapters, self.classifiers)):
            if out[k] is None:  # cosine: it normalises the adapted feature, so build it
                feat = torch.addmm(x, hid[k], _matrix(a.up.weight).t()).add_(a.up.bias)  # Adapter.forward
                out[k] = _cosine_logits(feat, clf.weight)
        return out
