"""One WELDE specification: components, mode, losses, and each head's type with its scale.

A :class:`WELDESpec` is built once (:func:`build_spec`, from plain values such as a config's)
and handed to every integration as plain keyword arguments (:meth:`WELDESpec.model_kwargs`):
the YOLO model, the Faster R-CNN box predictor, the image classifier and
:class:`~welde_det.welde.WELDEHeads` all resolve and check their heads the same way.

Head and scale are chosen together. A margin loss with a scale s (``ldam``, ``lmf``)
computes softmax/sigmoid(s·(z − Δ)) on its head's logits z:

- a **cosine** head gives z = cos(f, w_c) ∈ [−1, 1]; the largest softmax probability it can
  reach over C classes (class directions on a simplex) is 1 / (1 + (C − 1)·e^{−s·C/(C−1)}),
  0.55 at s = 1 and C = 7 — the head can never become confident. LDAM's reference uses
  s = 30; a cosine head needs s ≥ :data:`MIN_COSINE_SCALE`;
- a **linear** head gives unbounded logits; the scale must then be 1 (a larger s only
  rescales the logits and the margins together).

Losses without a scale get a linear head (a cosine head would cap them the same way).
Dense sigmoid heads (YOLO) are always linear with s = 1: 99 % of their anchors are
background, which only a bias (Ultralytics' prior) expresses, and a cosine head has none.
``head="auto"`` chooses: sigmoid → linear, s = 1; softmax → cosine, s = 30 for scaled
losses (linear with s = 1 if the loss parameters set s = 1), linear for the others.

``cls_pw`` is Ultralytics' class-weight power of the classification BCE: it has a meaning
only for one plain sigmoid ``ce`` head (YOLO, mode ``single``); anywhere else it is refused.

Example:
    >>> spec = build_spec(components=("ce", "focal", "cb", "ldam"), mode="welde", activation="softmax")
    >>> spec.heads, spec.loss_params["ldam"]["s"]
    (('linear', 'linear', 'linear', 'cosine'), 30.0)
    >>> WELDESpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from welde_det.losses import build_loss, loss_parameters
from welde_det.losses.registry import ACTIVATIONS, check_loss_kwargs
from welde_det.welde.heads import WELDEHeads
from welde_det.welde.objective import WELDEObjective, single_loss_objective

__all__ = [
    "DEFAULT_COSINE_SCALE",
    "HEAD_TYPES",
    "MIN_COSINE_SCALE",
    "MODES",
    "OBJECTIVE_KEYS",
    "WELDESpec",
    "build_spec",
]

MODES = ("single", "ce_ensemble", "welde")
HEAD_TYPES = ("linear", "cosine")
#: The smallest scale a cosine head may use (s = 10 reaches p = 0.9999 at C = 7, s = 5 only 0.98).
MIN_COSINE_SCALE = 10.0
#: LDAM's reference scale for cosine heads.
DEFAULT_COSINE_SCALE = 30.0
#: :class:`~welde_det.welde.WELDEObjective` settings a spec may carry (modes other than ``single``).
OBJECTIVE_KEYS = ("ema_momentum", "sum_penalty", "diversity", "weight_floor", "warmup_steps")
_FIELDS = ("components", "mode", "activation", "heads", "loss_params", "objective_kw", "hidden", "cls_pw")


def _takes(name: str, activation: str, param: str) -> bool:
    return param in loss_parameters(name, activation)


@dataclass(frozen=True)
class WELDESpec:
    """The WELDE settings of one model: checked on construction, JSON-able, plain kwargs out.

    Build it with :func:`build_spec` (which resolves ``head="auto"`` and fills in each
    scale); constructing it directly (or with :meth:`from_dict`) checks the same rules.

    Attributes:
        components: registry names of the K heads' losses, in head order.
        mode: ``"single"`` (one plain loss, K = 1), ``"ce_ensemble"`` (K ``ce`` heads, the
            control) or ``"welde"``.
        activation: ``"softmax"`` (Faster R-CNN RoI heads, classifiers) or ``"sigmoid"`` (YOLO).
        heads: ``"linear"`` or ``"cosine"`` per component.
        loss_params: keyword arguments per registry name (scaled losses always carry ``s``).
        objective_kw: :class:`~welde_det.welde.WELDEObjective` settings (empty in ``single`` mode).
        hidden: adapter bottleneck width (None: the adapter's default).
        cls_pw: Ultralytics' class-weight power (0 = off); only for one sigmoid ``ce`` head.

    Raises:
        ValueError: naming the field, the value and what is allowed — among others a cosine
            head with s < :data:`MIN_COSINE_SCALE`, a linear head with s ≠ 1, a cosine head
            on a loss without a scale or on sigmoid heads.
    """

    components: tuple[str, ...]
    mode: str
    activation: str
    heads: tuple[str, ...]
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    objective_kw: dict[str, Any] = field(default_factory=dict)
    hidden: int | None = None
    cls_pw: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "components", tuple(str(c) for c in self.components))
        set_(self, "heads", tuple(str(h) for h in self.heads))
        set_(self, "loss_params", {str(k): dict(v) for k, v in dict(self.loss_params or {}).items()})
        set_(self, "objective_kw", dict(self.objective_kw or {}))
        set_(self, "cls_pw", float(self.cls_pw))
        self._check()

    def _check(self) -> None:
        comps, act = self.components, self.activation
        if act not in ACTIVATIONS:
            raise ValueError(f"WELDE spec: activation must be one of {list(ACTIVATIONS)}, got {act!r}")
        if not comps:
            raise ValueError("WELDE spec: components is empty; name at least one registry loss")
        if self.mode not in MODES:
            raise ValueError(f"WELDE spec: mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "single" and len(comps) != 1:
            raise ValueError(f"WELDE spec: mode 'single' takes one component, got {list(comps)}")
        if self.mode == "ce_ensemble" and (len(comps) < 2 or set(comps) != {"ce"}):
            raise ValueError(f"WELDE spec: mode 'ce_ensemble' takes two or more 'ce' components, got {list(comps)}")
        if len(self.heads) != len(comps):
            raise ValueError(f"WELDE spec: {len(self.heads)} head types {list(self.heads)} for {len(comps)} "
                             f"components {list(comps)}")
        unknown = sorted(set(self.loss_params) - set(comps))
        if unknown:
            raise ValueError(f"WELDE spec: loss_params names {unknown}, which are not among the components "
                             f"{list(comps)}")
        for name, head in zip(comps, self.heads):
            # names here; the values are checked when the losses are built (they may need the class counts)
            check_loss_kwargs(name, act, self.loss_params.get(name, {}))
            _check_head(name, head, act, self.loss_params.get(name, {}))
        bad = sorted(set(self.objective_kw) - set(OBJECTIVE_KEYS))
        if bad:
            raise ValueError(f"WELDE spec: objective_kw has unknown key(s) {bad}; allowed: {list(OBJECTIVE_KEYS)}")
        if self.mode == "single" and self.objective_kw:
            raise ValueError(f"WELDE spec: objective_kw {sorted(self.objective_kw)} has no effect in mode 'single' "
                             "(one plain loss); pass them only for 'welde' or 'ce_ensemble'")
        if self.mode != "single":
            WELDEObjective([(c, torch.nn.Identity()) for c in comps], activation=act, **self.objective_kw)
        if self.hidden is not None and (not isinstance(self.hidden, int) or isinstance(self.hidden, bool)
                                        or self.hidden < 1):
            raise ValueError(f"WELDE spec: hidden (adapter width) must be a positive integer or None, "
                             f"got {self.hidden!r}")
        if not (math.isfinite(self.cls_pw) and 0.0 <= self.cls_pw <= 1.0):
            raise ValueError(f"WELDE spec: cls_pw must be in [0, 1] (0 = off), got {self.cls_pw}")
        if self.cls_pw > 0 and (self.mode, comps, act) != ("single", ("ce",), "sigmoid"):
            raise ValueError(
                f"WELDE spec: cls_pw={self.cls_pw} is Ultralytics' class-weight power for the BCE of one plain "
                f"sigmoid 'ce' head (YOLO, mode 'single'); it has no meaning for mode {self.mode!r}, components "
                f"{list(comps)}, activation {act!r}. Set cls_pw=0, or use a class-weighted loss component "
                "('wce', 'cb') instead")

    @property
    def num_heads(self) -> int:
        """K."""
        return len(self.components)

    def model_kwargs(self) -> dict[str, Any]:
        """The plain keyword arguments every integration and :func:`build_spec` take.

        Keys: ``components``, ``mode``, ``activation``, ``heads``, ``loss_params``,
        ``objective_kw``, ``hidden`` (``cls_pw`` is a training setting, not a model's).
        """
        return {"components": self.components, "mode": self.mode, "activation": self.activation,
                "heads": self.heads, "loss_params": copy.deepcopy(self.loss_params),
                "objective_kw": dict(self.objective_kw), "hidden": self.hidden}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return {"components": list(self.components), "mode": self.mode, "activation": self.activation,
                "heads": list(self.heads), "loss_params": copy.deepcopy(self.loss_params),
                "objective_kw": dict(self.objective_kw), "hidden": self.hidden, "cls_pw": self.cls_pw}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WELDESpec:
        """The spec of :meth:`to_dict` (checked again).

        Raises:
            ValueError: a missing or unknown key, or any rule of the class.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"WELDE spec: expected a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        missing = [k for k in ("components", "mode", "activation", "heads") if k not in d]
        if unknown or missing:
            raise ValueError(f"WELDE spec dict: unknown key(s) {unknown}, missing key(s) {missing}; "
                             f"keys are {list(_FIELDS)}")
        return cls(**{k: d[k] for k in _FIELDS if k in d})

    def stage1(self) -> WELDESpec:
        """The K = 1 plain ``ce`` spec of the ordinary stage before a frozen WELDE stage."""
        return build_spec(components=("ce",), mode="single", activation=self.activation, hidden=self.hidden)

    def build_heads(self, in_dim: int, num_classes: int, *, conv: bool = False,
                    bias_init: float | None = None) -> WELDEHeads:
        """:class:`~welde_det.welde.WELDEHeads` with this spec's head types and adapter width."""
        return WELDEHeads(in_dim, num_classes, self.components, heads=self.heads, hidden=self.hidden, conv=conv,
                          bias_init=bias_init)

    def build_objective(self, class_counts: Sequence[int | float] | torch.Tensor) -> WELDEObjective:
        """The objective: the plain loss (mode ``single``) or a :class:`WELDEObjective` of K losses.

        Args:
            class_counts: training instances per logit column (for Faster R-CNN background first).
        """
        losses = [(c, build_loss(c, class_counts=class_counts, activation=self.activation,
                                 **self.loss_params.get(c, {}))) for c in self.components]
        if self.mode == "single":
            return single_loss_objective(*losses[0])
        return WELDEObjective(losses, activation=self.activation, **self.objective_kw)


def _check_head(name: str, head: str, activation: str, params: Mapping[str, Any]) -> None:
    if head not in HEAD_TYPES:
        raise ValueError(f"WELDE spec: head type {head!r} for {name!r}; choose one of {list(HEAD_TYPES)}")
    scaled = _takes(name, activation, "s")
    if head == "cosine" and activation == "sigmoid":
        raise ValueError(f"WELDE spec: a cosine head for {name!r} with sigmoid activation: dense sigmoid heads need "
                         "the prior bias (most anchors are background), which a cosine head cannot express; use "
                         "head='linear' (s = 1)")
    if head == "cosine" and not scaled:
        raise ValueError(f"WELDE spec: a cosine head for {name!r}, a loss without a scale s: its logits stay in "
                         "[-1, 1] and it can never become confident; use head='linear' for it")
    if not scaled:
        return
    s = float(params.get("s", loss_parameters(name, activation)["s"]))
    if head == "cosine" and s < MIN_COSINE_SCALE:
        raise ValueError(f"WELDE spec: a cosine head for {name!r} with s={s}: cosine logits lie in [-1, 1], so "
                         f"softmax(s*z) stays far from confident (p <= 0.55 at s=1 with 7 classes); use "
                         f"s >= {MIN_COSINE_SCALE:g} (LDAM's {DEFAULT_COSINE_SCALE:g}) or head='linear' with s=1")
    if head == "linear" and s != 1.0:
        raise ValueError(f"WELDE spec: a linear head for {name!r} with s={s}: linear logits are unbounded and s "
                         f"only rescales logits and margins together; use s=1 with a linear head, or "
                         f"head='cosine' with s >= {MIN_COSINE_SCALE:g}")


def build_spec(
    *,
    components: Sequence[str],
    mode: str,
    activation: str,
    loss_params: Mapping[str, Mapping[str, Any]] | None = None,
    drw_epoch: int = -1,
    head: str | Sequence[str] = "auto",
    objective_kw: Mapping[str, Any] | None = None,
    hidden: int | None = None,
    cls_pw: float = 0.0,
) -> WELDESpec:
    """Resolve head types and scales, fill in DRW, and check everything (see the module docstring).

    Args:
        components: registry names, one head each.
        mode: ``"single"``, ``"ce_ensemble"`` or ``"welde"``.
        activation: ``"softmax"`` or ``"sigmoid"``.
        loss_params: keyword arguments per registry name; an explicit ``s`` is kept (and checked
            against the head).
        drw_epoch: deferred re-weighting from this epoch on for every component that supports it
            (``ldam``, ``lmf``); −1 = off.
        head: ``"auto"``, ``"linear"``, ``"cosine"``, or one of these per component.
        objective_kw: :class:`~welde_det.welde.WELDEObjective` settings (not in mode ``single``).
        hidden: adapter bottleneck width.
        cls_pw: Ultralytics' class-weight power (one sigmoid ``ce`` head only).

    Returns:
        The checked :class:`WELDESpec`; applied to its own :meth:`~WELDESpec.model_kwargs` it
        returns an equal spec.

    Raises:
        ValueError: as :class:`WELDESpec`, plus a ``head`` list of the wrong length, a
            ``drw_epoch`` that no component uses, or one that contradicts a loss parameter.
    """
    components = tuple(components)
    if activation not in ACTIVATIONS:
        raise ValueError(f"WELDE spec: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    params = {str(k): dict(v) for k, v in dict(loss_params or {}).items()}
    if isinstance(head, str):
        chosen = [head] * len(components)
    else:
        chosen = list(head)
        if len(chosen) != len(components):
            raise ValueError(f"WELDE spec: {len(chosen)} head types {chosen} for {len(components)} components "
                             f"{list(components)}")
    heads = []
    for name, h in zip(components, chosen):
        if h not in ("auto", *HEAD_TYPES):
            raise ValueError(f"WELDE spec: head {h!r} for {name!r}; choose 'auto' or one of {list(HEAD_TYPES)}")
        scaled = _takes(name, activation, "s")
        given = params.get(name, {}).get("s") if scaled else None
        if h == "auto":
            h = "cosine" if activation == "softmax" and scaled and given != 1 else "linear"
        if scaled and given is None:
            params.setdefault(name, {})["s"] = DEFAULT_COSINE_SCALE if h == "cosine" else 1.0
        heads.append(h)
    if drw_epoch >= 0:
        users = [c for c in dict.fromkeys(components) if _takes(c, activation, "drw_epoch")]
        if not users:
            raise ValueError(f"WELDE spec: drw_epoch={drw_epoch}, but none of the components {list(components)} "
                             "uses deferred re-weighting (ldam, lmf); leave drw_epoch at -1")
        for c in users:
            have = params.setdefault(c, {}).setdefault("drw_epoch", int(drw_epoch))
            if have != drw_epoch:
                raise ValueError(f"WELDE spec: drw_epoch={drw_epoch} but loss_params[{c!r}] sets drw_epoch={have}")
    return WELDESpec(components=components, mode=mode, activation=activation, heads=tuple(heads),
                     loss_params=params, objective_kw=dict(objective_kw or {}), hidden=hidden, cls_pw=cls_pw)
