"""Adapters, heads and fusion."""

from __future__ import annotations

import pytest
import torch

from welde_det.welde import Adapter, CosineClassifier, WELDEHeads, fuse


def test_adapter_is_identity_at_init_and_learns():
    a = Adapter(12)
    x = torch.randn(4, 12)
    assert torch.equal(a(x), x)
    conv = Adapter(8, conv=True)
    fm = torch.randn(2, 8, 5, 5)
    assert torch.equal(conv(fm), fm)
    a(x).pow(2).sum().backward()
    assert a.up.weight.grad.abs().sum() > 0


def test_heads_shapes_vectors_and_maps_and_cosine_for_margin_losses():
    heads = WELDEHeads(16, 6, ["ce", "focal", "cb", "ldam"])
    outs = heads(torch.randn(3, 16))
    assert [o.shape for o in outs] == [torch.Size([3, 6])] * 4
    assert isinstance(heads.classifiers[3], CosineClassifier)
    assert outs[3].abs().max() <= 1 + 1e-6
    maps = WELDEHeads(16, 6, ["ce", "lmf"], conv=True)(torch.randn(2, 16, 4, 5))
    assert [m.shape for m in maps] == [torch.Size([2, 6, 4, 5])] * 2
    assert maps[1].abs().max() <= 1 + 1e-6


def test_cosine_conv_equals_vector_per_location():
    clf_v = CosineClassifier(8, 3)
    clf_c = CosineClassifier(8, 3, conv=True)
    clf_c.weight.data.copy_(clf_v.weight.data)
    fm = torch.randn(1, 8, 2, 2)
    vec = clf_v(fm.permute(0, 2, 3, 1).reshape(-1, 8))
    torch.testing.assert_close(clf_c(fm).permute(0, 2, 3, 1).reshape(-1, 3), vec)


def test_fusion_valid_distributions_and_weights():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    p = fuse(logits, [0.2, 0.3, 0.5])
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    manual = 0.2 * logits[0].softmax(1) + 0.3 * logits[1].softmax(1) + 0.5 * logits[2].softmax(1)
    torch.testing.assert_close(p, manual)
    # weights are normalised: scaling them changes nothing
    torch.testing.assert_close(fuse(logits, [2.0, 3.0, 5.0]), p)
    s = fuse(logits, None, activation="sigmoid")
    assert ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(s, torch.stack([t.sigmoid() for t in logits]).mean(0))
    maps = [torch.randn(2, 4, 3, 3) for _ in range(2)]
    torch.testing.assert_close(fuse(maps).sum(1), torch.ones(2, 3, 3))


def test_fusion_bad_input():
    with pytest.raises(ValueError, match="2 weights for 3 heads"):
        fuse([torch.zeros(1, 2)] * 3, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        fuse([torch.zeros(1, 2)] * 2, [1.0, -1.0])
    with pytest.raises(ValueError, match="disagree"):
        fuse([torch.zeros(1, 2), torch.zeros(1, 3)])



def _randomise(heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # W2 = 0 at init would hide errors
    return heads


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("components", [("ce", "focal", "cb", "ldam"), ("ce",), ("ldam", "lmf"), ("lmf", "ce", "lmf")])
def test_fused_forward_equals_per_head_loop_values_and_gradients(conv, components):
    heads = _randomise(WELDEHeads(24, 5, components, conv=conv, hidden=8, bias_init=-1.0))
    x = torch.randn(3, 24, 4, 5) if conv else torch.randn(37, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, loop = heads(x1), heads.forward_loop(x2)
    assert len(fused) == len(components)
    for f, ref in zip(fused, loop):
        assert f.shape == ref.shape
        # vectors come contiguous; maps in channels-last memory (classes the fastest dimension), the
        # layout the dense losses read, and channels-last input is read without a copy
        assert f.is_contiguous() if not conv else f.stride(1) == 1
        torch.testing.assert_close(f, ref)
    if conv:
        rows = x.permute(0, 2, 3, 1).contiguous()
        for f, ref in zip(heads(rows.permute(0, 3, 1, 2)), loop):
            torch.testing.assert_close(f, ref)
    g = [torch.randn_like(t) for t in loop]
    params = list(heads.parameters())
    grads_fused = torch.autograd.grad(sum((f * w).sum() for f, w in zip(fused, g)), [x1, *params])
    grads_loop = torch.autograd.grad(sum((r * w).sum() for r, w in zip(loop, g)), [x2, *params])
    for a, b in zip(grads_fused, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_forward_extra_leading_dims_empty_batch_and_fallbacks():
    heads = _randomise(WELDEHeads(16, 3, ["ce", "ldam"], hidden=4))
    x = torch.randn(2, 5, 16)
    for f, ref in zip(heads(x), heads.forward_loop(x)):
        torch.testing.assert_close(f, ref)
    assert [t.shape for t in heads(torch.zeros(0, 16))] == [torch.Size([0, 3])] * 2
    maps = _randomise(WELDEHeads(16, 3, ["ce", "ldam"], conv=True, hidden=4))
    assert [t.shape for t in maps(torch.zeros(0, 16, 2, 2))] == [torch.Size([0, 3, 2, 2])] * 2
    # a hook on a submodule must still fire: the per-head loop is used
    seen = []
    heads.adapters[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(4, 16)
    out = heads(x)
    assert seen == [torch.Size([4, 16])]
    torch.testing.assert_close(out[1], heads.forward_loop(x)[1])


def test_state_dict_layout_unchanged():
    heads = WELDEHeads(16, 6, ["ce", "ldam"], conv=True)
    assert sorted(heads.state_dict()) == [
        "adapters.0.down.bias", "adapters.0.down.weight", "adapters.0.up.bias", "adapters.0.up.weight",
        "adapters.1.down.bias", "adapters.1.down.weight", "adapters.1.up.bias", "adapters.1.up.weight",
        "classifiers.0.bias", "classifiers.0.weight", "classifiers.1.weight"]
