"""Every registered loss: finite gradients at extreme logits and in half precision, empty
batches, device-agnostic buffers, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from welde_det.losses import available_losses, build_loss, register_loss

COUNTS = [50, 20, 5, 1]
ALL = [(n, a) for a in ("softmax", "sigmoid") for n in available_losses(a)]


def _make(name, act, **kw):
    return build_loss(name, class_counts=COUNTS, activation=act, **kw)


@pytest.mark.parametrize(("name", "act"), ALL)
def test_extreme_logits_finite_gradient(name, act):
    z = (torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 1e4, -1e4], [0.0, 0.0, 0.0, 0.0]])).requires_grad_()
    y = torch.tensor([1, 0, 3])
    loss = _make(name, act)(z, y)
    loss.backward()
    assert torch.isfinite(loss), name
    assert torch.isfinite(z.grad).all(), name


@pytest.mark.parametrize(("name", "act"), ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(name, act, dtype):
    g = torch.Generator().manual_seed(1)
    z32 = torch.randn(16, 4, generator=g) * 4
    y = torch.randint(0, 4, (16,), generator=g)
    zh = z32.to(dtype).requires_grad_()
    loss = _make(name, act)(zh, y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(zh.grad.float()).all()
    ref = _make(name, act)(zh.detach().float(), y)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize(("name", "act"), ALL)
def test_empty_batch_is_zero_with_grad(name, act):
    z = torch.zeros(0, 4, requires_grad=True)
    loss = _make(name, act)(z, torch.zeros(0, dtype=torch.long))
    assert loss.ndim == 0 and float(loss) == 0.0
    loss.backward()
    assert z.grad is not None


@pytest.mark.parametrize(("name", "act"), ALL)
def test_buffers_follow_the_module(name, act):
    loss = _make(name, act).to(torch.float64)
    for buf in loss.buffers():
        assert buf.dtype == torch.float64
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        loss = _make(name, act).cuda()
        z = torch.randn(5, 4, device="cuda")
        assert torch.isfinite(loss(z, torch.tensor([0, 1, 2, 3, 0], device="cuda")))


def test_unknown_name_lists_names_and_closest():
    with pytest.raises(ValueError, match=r"did you mean 'focal'\?.*Valid names: \['bwcce'"):
        build_loss("focall")


def test_unknown_argument_and_activation():
    with pytest.raises(ValueError, match="unknown argument"):
        build_loss("focal", gamm=2)
    with pytest.raises(ValueError, match="activation"):
        build_loss("ce", activation="relu")


def test_register_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("ce")(type("X", (torch.nn.Module,), {}))


@pytest.mark.parametrize(("counts", "match"), [
    ([10, -1, 3, 4], "negative"),
    ([10, 0, 3, 4], "zero training instances"),
    ([[1, 2]], "1-D"),
    ([1.0, float("nan"), 2, 3], "finite"),
])
def test_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        build_loss("cb", class_counts=counts)


def test_counts_length_must_match_logits():
    with pytest.raises(ValueError, match="class_counts has 4 entries but the logits have 3"):
        build_loss("ldam", class_counts=COUNTS)(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_missing_counts_named():
    with pytest.raises(ValueError, match="needs class_counts"):
        build_loss("ldam")


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_target_out_of_range_and_nan_logits(act):
    loss = build_loss("ce", activation=act)
    with pytest.raises(ValueError, match="target values"):
        loss(torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([0]))


def test_softmax_rejects_background_and_soft_targets():
    loss = build_loss("focal")
    with pytest.raises(ValueError, match="target values"):
        loss(torch.zeros(2, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="integer class targets"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_validate_false_skips_checks():
    loss = build_loss("ce", validate=False)
    assert torch.isnan(loss(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])))
