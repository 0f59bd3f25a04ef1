"""WELDESpec: head type and scale chosen together, round trips, and the heads it builds become confident."""

from __future__ import annotations

import json
import math

import pytest
import torch

from welde_det.losses import build_loss
from welde_det.welde import CosineClassifier, WELDEHeads, WELDESpec, build_spec, fuse
from welde_det.welde.objective import single_loss_objective
from welde_det.welde.spec import MIN_COSINE_SCALE

COUNTS = [200.0, 40.0, 8.0]


def test_auto_heads_and_scales():
    soft = build_spec(components=("ce", "focal", "cb", "ldam", "lmf"), mode="welde", activation="softmax")
    assert soft.heads == ("linear", "linear", "linear", "cosine", "cosine")
    assert soft.loss_params == {"ldam": {"s": 30.0}, "lmf": {"s": 30.0}}
    dense = build_spec(components=("ce", "focal", "cb", "ldam"), mode="welde", activation="sigmoid")
    assert dense.heads == ("linear",) * 4
    assert dense.loss_params == {"ldam": {"s": 1.0}}
    # an explicit s = 1 on softmax chooses the linear head with it
    lin = build_spec(components=("ldam",), mode="single", activation="softmax", loss_params={"ldam": {"s": 1}})
    assert lin.heads == ("linear",)
    drw = build_spec(components=("ce", "ldam"), mode="welde", activation="softmax", drw_epoch=3)
    assert drw.loss_params == {"ldam": {"s": 30.0, "drw_epoch": 3}}


def test_round_trip_and_model_kwargs_are_idempotent():
    spec = build_spec(components=("ce", "focal", "ldam"), mode="welde", activation="softmax",
                      loss_params={"focal": {"gamma": 1.0}}, objective_kw={"diversity": 0.2, "warmup_steps": 5},
                      hidden=8, drw_epoch=2)
    d = json.loads(json.dumps(spec.to_dict()))
    assert WELDESpec.from_dict(d) == spec
    kw = spec.model_kwargs()
    assert set(kw) == {"components", "mode", "activation", "heads", "loss_params", "objective_kw", "hidden"}
    again = build_spec(components=kw["components"], mode=kw["mode"], activation=kw["activation"], head=kw["heads"],
                       loss_params=kw["loss_params"], objective_kw=kw["objective_kw"], hidden=kw["hidden"])
    assert again == spec
    kw["loss_params"]["ldam"]["s"] = 1.0  # a copy: the spec is unchanged
    assert spec.loss_params["ldam"]["s"] == 30.0
    assert spec.stage1() == build_spec(components=("ce",), mode="single", activation="softmax", hidden=8)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['head'\]"):
        WELDESpec.from_dict({**d, "head": "auto"})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['heads'\]"):
        WELDESpec.from_dict({k: v for k, v in d.items() if k != "heads"})


@pytest.mark.parametrize(("kw", "match"), [
    ({"components": ("ldam",), "activation": "softmax", "head": "cosine", "loss_params": {"ldam": {"s": 1.0}}},
     "cosine head for 'ldam' with s=1.0"),
    ({"components": ("lmf",), "activation": "softmax", "head": "cosine", "loss_params": {"lmf": {"s": 5.0}}},
     "cosine head for 'lmf' with s=5.0"),
    ({"components": ("ldam",), "activation": "softmax", "head": "linear", "loss_params": {"ldam": {"s": 30.0}}},
     "linear head for 'ldam' with s=30.0"),
    ({"components": ("ldam",), "activation": "sigmoid", "head": "cosine"}, "prior bias"),
    ({"components": ("ldam",), "activation": "sigmoid", "loss_params": {"ldam": {"s": 30.0}}},
     "linear head for 'ldam' with s=30.0"),
    ({"components": ("ce",), "activation": "softmax", "head": "cosine"}, "without a scale"),
    ({"components": ("ce",), "activation": "softmax", "head": "angular"}, "head 'angular'"),
    ({"components": ("ce",), "activation": "softmax", "drw_epoch": 2}, "none of the components"),
    ({"components": ("ldam",), "activation": "softmax", "drw_epoch": 2, "loss_params": {"ldam": {"drw_epoch": 4}}},
     "sets drw_epoch=4"),
    ({"components": ("lfm",), "activation": "softmax"}, "did you mean 'lmf'"),
    ({"components": ("ce",), "activation": "softmax", "loss_params": {"focal": {"gamma": 1}}}, "not among"),
    ({"components": ("focal",), "activation": "softmax", "loss_params": {"focal": {"gama": 1}}}, "unknown argument"),
    ({"components": ("ce",), "activation": "softmax", "objective_kw": {"diversity": 0.1}}, "no effect in mode 'single'"),
    ({"components": ("ce", "focal"), "activation": "softmax"}, "takes one component"),
    ({"components": ("ce",), "activation": "softmax", "hidden": 0}, "hidden"),
    ({"components": ("ce",), "activation": "tanh"}, "activation"),
])
def test_heads_that_cannot_become_confident_and_other_bad_specs_are_refused(kw, match):
    kw = {"mode": "single", **kw}
    with pytest.raises(ValueError, match=match):
        build_spec(**kw)


def test_modes_objective_kw_and_cls_pw_rules():
    with pytest.raises(ValueError, match="two or more 'ce'"):
        build_spec(components=("ce", "focal"), mode="ce_ensemble", activation="softmax")
    with pytest.raises(ValueError, match="weight_floor"):
        build_spec(components=("ce", "focal"), mode="welde", activation="softmax", objective_kw={"weight_floor": 0.9})
    with pytest.raises(ValueError, match="unknown key"):
        build_spec(components=("ce", "focal"), mode="welde", activation="softmax", objective_kw={"lr": 0.1})
    ok = build_spec(components=("ce",), mode="single", activation="sigmoid", cls_pw=0.5)
    assert ok.cls_pw == 0.5
    for kw in ({"components": ("ce", "focal"), "mode": "welde", "activation": "sigmoid"},
               {"components": ("ce", "ce"), "mode": "ce_ensemble", "activation": "sigmoid"},
               {"components": ("focal",), "mode": "single", "activation": "sigmoid"},
               {"components": ("ce",), "mode": "single", "activation": "softmax"}):
        with pytest.raises(ValueError, match=r"cls_pw=0\.5 is Ultralytics' class-weight power"):
            build_spec(cls_pw=0.5, **kw)
    with pytest.raises(ValueError, match=r"cls_pw must be in \[0, 1\]"):
        build_spec(components=("ce",), mode="single", activation="sigmoid", cls_pw=1.5)


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match=r"cosine head for 'ldam' with s=1\.0"):
        WELDESpec(components=("ldam",), mode="single", activation="softmax", heads=("cosine",),
                  loss_params={"ldam": {"s": 1.0}})
    with pytest.raises(ValueError, match=r"cosine head for 'ldam' with s=1\.0"):
        WELDESpec.from_dict({"components": ["ldam"], "mode": "single", "activation": "softmax", "heads": ["cosine"],
                             "loss_params": {"ldam": {"s": 1.0}}})


def test_built_heads_and_objective_follow_the_spec():
    spec = build_spec(components=("ce", "ldam"), mode="welde", activation="softmax", hidden=4,
                      objective_kw={"warmup_steps": 3})
    heads = spec.build_heads(8, 3)
    assert isinstance(heads, WELDEHeads) and heads.head_types == ("linear", "cosine")
    assert isinstance(heads.classifiers[1], CosineClassifier)
    assert heads.adapters[0].down.out_features == 4
    obj = spec.build_objective(COUNTS)
    assert obj.names == ("ce", "ldam") and obj.warmup_steps == 3 and obj.losses[1].s == 30.0
    assert obj.logit_scales == (1.0, 30.0)
    z = [torch.randn(2, 3), torch.rand(2, 3)]
    scaled = obj.predictive_logits(z)
    assert scaled[0] is z[0]
    torch.testing.assert_close(scaled[1], 30.0 * z[1])
    single = build_spec(components=("ce",), mode="single", activation="softmax").build_objective(COUNTS)
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(single([z], y)["loss"], torch.nn.functional.cross_entropy(z, y))


def _separable(n_per: int = 40, dim: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around orthogonal directions (margin ≫ noise): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 4.0
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def _fit(heads: WELDEHeads, objective, x, y, steps: int = 300) -> torch.Tensor:
    """Train heads on (x, y) with Adam; return the mean softmax probability of the true class."""
    torch.manual_seed(0)
    opt = torch.optim.Adam([*heads.parameters(), *objective.parameters()], lr=0.02)
    for _ in range(steps):
        out = objective(heads(x), y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        p = fuse(objective.predictive_logits(heads(x)), objective.fusion_weights(), activation="softmax")
    return p.gather(1, y[:, None]).mean()


@pytest.mark.parametrize("loss_params", [None, {"ldam": {"s": 1.0}}], ids=["cosine-s30", "linear-s1"])
def test_ldam_head_of_a_spec_becomes_confident(loss_params):
    x, y = _separable()
    spec = build_spec(components=("ldam",), mode="single", activation="softmax", loss_params=loss_params)
    torch.manual_seed(0)
    p = _fit(spec.build_heads(16, 3), spec.build_objective(COUNTS), x, y)
    assert float(p) > 0.99


def test_the_refused_pair_is_capped_below_confidence():
    """Why cosine + s = 1 is refused: trained on the same toy problem it stays far below 0.99.

    Three unit class directions and s = 1 cap softmax(s·cos) at 1 / (1 + 2·e^{−1.5}) = 0.69.
    """
    x, y = _separable()
    torch.manual_seed(0)
    heads = WELDEHeads(16, 3, ["ldam"], heads=["cosine"])
    objective = single_loss_objective("ldam", build_loss("ldam", class_counts=COUNTS, s=1.0))
    p = _fit(heads, objective, x, y)
    assert float(p) < 1 / (1 + 2 * math.exp(-1.5)) + 1e-6 < 0.99
    assert MIN_COSINE_SCALE >= 10


def test_per_class_loss_values_are_checked_when_the_counts_are_known():
    """The spec checks loss parameter names; values that depend on C are checked at build time."""
    spec = build_spec(components=("focal",), mode="single", activation="softmax",
                      loss_params={"focal": {"alpha": [0.2, 0.3, 0.5]}})
    torch.testing.assert_close(spec.build_objective(COUNTS).losses[0].alpha, torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="focal alpha has 3 values but there are 2 classes"):
        spec.build_objective([5.0, 1.0])
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['class_counts'\]"):
        build_spec(components=("cb",), mode="single", activation="softmax", loss_params={"cb": {"class_counts": [1]}})
