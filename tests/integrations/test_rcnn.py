"""Faster R-CNN with WELDE RoI heads: torchvision equivalence, background statistics, stage 2, reload."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import fastrcnn_loss

from welde_det.checkpoint import UnsafeCheckpointError
from welde_det.integrations.rcnn import (
    WELDERoIHeads,
    build_faster_rcnn,
    freeze_for_stage2,
    rcnn_class_counts,
)
from welde_det.losses import class_balanced_weights, ldam_margins

FG = [633, 2033, 4131, 1921, 151, 122]


def _batch(seed=0, n=2, size=128, channels=3):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(channels, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * 80
        wh = 10 + torch.rand(3, 2, generator=g) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 7, (3,), generator=g)})
    return images, targets


def _tiny(arch="fasterrcnn_mobilenet_v3_large_fpn", **kw):
    torch.manual_seed(0)
    return build_faster_rcnn(arch, foreground_counts=FG, min_size=128, max_size=128, **kw)


def test_background_is_class_zero_with_smallest_margin_and_weight():
    counts = rcnn_class_counts(FG, positive_fraction=0.25)
    assert counts[0] == 3 * sum(FG)
    m = ldam_margins(counts)
    w = class_balanced_weights(counts, 0.9999)
    assert int(m.argmin()) == 0 and int(w.argmin()) == 0


def test_k1_ce_reproduces_fastrcnn_loss():
    torch.manual_seed(0)
    ref = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=7, min_size=128, max_size=128)
    ours = copy.deepcopy(ref)
    ours.roi_heads = WELDERoIHeads.from_roi_heads(ours.roi_heads, components=["ce"], foreground_counts=FG,
                                                  mode="single")
    ref.train()
    ours.train()
    images, targets = _batch()
    torch.manual_seed(1)
    ref_losses = ref(images, targets)
    torch.manual_seed(1)
    our_losses = ours(images, targets)
    for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(our_losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)


def test_fastrcnn_loss_by_hand_matches_predictor_terms():
    roi = _tiny(components=["ce"], mode="single").roi_heads
    logits = torch.randn(8, 7)
    box = torch.randn(8, 28)
    labels = [torch.tensor([0, 1, 2, 0]), torch.tensor([3, 0, 6, 0])]
    reg = [torch.randn(4, 4), torch.randn(4, 4)]
    cls_ref, box_ref = fastrcnn_loss(logits, box, labels, reg)
    out = roi.objective([logits], torch.cat(labels))
    torch.testing.assert_close(out["loss"], cls_ref)
    from welde_det.integrations.rcnn import _box_loss

    torch.testing.assert_close(_box_loss(box, torch.cat(labels), torch.cat(reg)), box_ref)


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn"])
def test_welde_train_and_eval_modes(arch):
    model = _tiny(arch, components=["ce", "focal", "cb", "ldam"], mode="welde", objective_kw={"warmup_steps": 0})
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    assert "weight_ldam" in model.roi_heads.last_terms
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    if len(out[0]["scores"]):
        assert ((out[0]["scores"] >= 0) & (out[0]["scores"] <= 1)).all()
        assert out[0]["labels"].min() >= 1


def test_grayscale_input():
    model = _tiny(components=["ce"], mode="single", in_channels=1)
    model.eval()
    with torch.no_grad():
        model([torch.rand(1, 128, 128)])


def test_stage2_trains_only_heads_and_theta():
    model = _tiny(components=["ce", "focal", "cb", "ldam"], mode="welde")
    trainable = freeze_for_stage2(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("roi_heads.box_predictor.heads.", "roi_heads.objective.")) for n in names)
    assert "roi_heads.objective.theta" in names
    assert not any("bbox_pred" in n or "backbone" in n or "rpn" in n or "box_head" in n for n in names)
    assert len(trainable) == len(names)


def test_checkpoint_reload_gives_same_detections(tmp_path):
    model = _tiny(components=["ce", "focal"], mode="welde", objective_kw={"warmup_steps": 0})
    model.train()
    images, targets = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = _tiny(components=["ce", "focal"], mode="welde", objective_kw={"warmup_steps": 0})
    again.load_state_dict(torch.load(tmp_path / "m.pt"))
    model.eval()
    again.eval()
    with torch.no_grad():
        a, b = model(images), again(images)
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(x[key], y[key])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown Faster R-CNN arch"):
        build_faster_rcnn("fasterrcnn_vgg", foreground_counts=FG)
    with pytest.raises(ValueError, match="never downloads"):
        build_faster_rcnn("fasterrcnn_resnet50_fpn", foreground_counts=FG, weights="COCO_V1")
    with pytest.raises(ValueError, match="unknown softmax loss 'focall'"):
        _tiny(components=["focall"], mode="single")
    with pytest.raises(ValueError, match="one component"):
        _tiny(components=["ce", "focal"], mode="single")
    model = _tiny(components=["ce"], mode="single")
    model.train()
    images, targets = _batch()
    targets[0]["labels"] = targets[0]["labels"].int()
    with pytest.raises(TypeError, match="int64"):
        model(images, targets)


def test_stage1_checkpoint_starts_every_stage2_head(tmp_path):
    """A 1-channel K=1 CE checkpoint as ``weights`` of a K=4 WELDE model: every weight the two share
    is loaded (the 1-channel stem included), and each head starts as the CE head."""
    ce = _tiny(components=["ce"], mode="single", in_channels=1)
    with torch.no_grad():
        for p in ce.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    ce.roi_heads.objective.num_steps.fill_(240)
    torch.save({"framework": "rcnn", "model": ce.state_dict()}, tmp_path / "ce.pt")
    welde = _tiny(components=["ce", "focal", "cb", "ldam"], mode="welde", in_channels=1,
                  weights=tmp_path / "ce.pt")
    assert int(welde.roi_heads.objective.num_steps) == 0  # WELDE's warm-up and EMA start afresh
    ws, cs = welde.state_dict(), ce.state_dict()
    for name in ("backbone.body.0.0.weight", "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight",
                 "roi_heads.box_predictor.bbox_pred.weight"):
        torch.testing.assert_close(ws[name], cs[name])
    welde.eval(), ce.eval()
    feats = torch.randn(5, ce.roi_heads.box_head.fc7.out_features)
    with torch.no_grad():
        ref = ce.roi_heads.box_predictor.heads(feats)[0]
        heads = welde.roi_heads.box_predictor.heads(feats)
    for z in heads[:3]:  # linear heads: the CE head's logits, to the down-projection jitter
        torch.testing.assert_close(z, ref, atol=1e-2, rtol=0)
    w_cos = welde.roi_heads.box_predictor.heads.classifiers[3].weight  # ldam: cosine, CE's class directions
    torch.testing.assert_close(w_cos, ce.roi_heads.box_predictor.heads.classifiers[0].weight)


def test_weights_of_another_architecture_or_kind_are_refused(tmp_path):
    resnet = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7)
    torch.save(resnet.state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ValueError, match="no backbone entry matches fasterrcnn_mobilenet_v3_large_fpn"):
        _tiny(weights=tmp_path / "r50.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpointError, match="Linear"):
        _tiny(weights=tmp_path / "module.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="found a list"):
        _tiny(weights=tmp_path / "list.pt")


def _separable(dim: int, classes: int, n_per: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Box features around orthogonal class directions (margin 4, noise 0.3): separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    return torch.eye(dim)[:classes][y] * 4.0 + 0.3 * torch.randn(len(y), dim, generator=g), y


@pytest.mark.parametrize(("kw", "head"), [({}, "cosine"), ({"loss_params": {"ldam": {"s": 1.0}}}, "linear")],
                         ids=["cosine-s30", "linear-s1"])
def test_ldam_box_predictor_becomes_confident(kw, head):
    """The RoI classifier's LDAM head, trained on separable box features, gives its class p > 0.99
    through the inference path (scaled by s, fused) — the old cosine head with s = 1 stayed near 0.5."""
    model = _tiny(components=["ldam"], mode="single", **kw)
    roi = model.roi_heads
    assert roi.welde_spec.heads == (head,) and roi.objective.losses[0].s == (30.0 if head == "cosine" else 1.0)
    x, y = _separable(roi.box_predictor.bbox_pred.in_features, len(FG) + 1)
    params = [*roi.box_predictor.heads.parameters(), *roi.objective.parameters()]
    opt = torch.optim.Adam(params, lr=0.02)
    for _ in range(300):
        loss = roi.objective(roi.box_predictor(x)[0], y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = roi.class_probabilities(roi.box_predictor(x)[0])
    assert float(p.gather(1, y[:, None]).min()) > 0.99


def test_a_head_that_cannot_become_confident_is_not_built():
    with pytest.raises(ValueError, match=r"cosine head for 'ldam' with s=1\.0"):
        _tiny(components=["ldam"], mode="single", heads=["cosine"], loss_params={"ldam": {"s": 1.0}})
    with pytest.raises(ValueError, match=r"linear head for 'lmf' with s=30\.0"):
        _tiny(components=["ce", "lmf"], mode="welde", heads=["linear", "linear"], loss_params={"lmf": {"s": 30.0}})
    with pytest.raises(ValueError, match="activation='sigmoid'"):
        _tiny(components=["ce"], mode="single", activation="sigmoid")
