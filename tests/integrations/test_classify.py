"""Classification integration: backbones, data loaders, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from welde_det.integrations.classify import (
    ImageClassifier,
    build_backbone,
    load_image_folder,
    load_npz,
)
from welde_det.welde import build_spec


def write_npz(path, *, n=(60, 12, 12), c=4, size=16, seed=0, drop=None, rgb=False):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        y = rng.integers(0, c, count)
        x = rng.integers(0, 60, (count, size, size)).astype(np.uint8)
        for i, label in enumerate(y):  # a class-dependent bright square
            x[i, 2 + 3 * label:5 + 3 * label, 2:6] = 230
        if rgb:
            x = np.repeat(x[..., None], 3, axis=-1)
        arrays[f"{split}_images"] = x
        arrays[f"{split}_labels"] = y[:, None]  # MedMNIST stores (N, 1)
    for key in drop or []:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arch", ["small_cnn", "resnet50", "efficientnet_v2_s", "densenet121"])
def test_backbones_grayscale_features(arch):
    net, dim = build_backbone(arch, in_channels=1)
    net.eval()
    with torch.no_grad():
        f = net(torch.zeros(2, 1, 32, 32))
    assert f.shape == (2, dim)


def test_weights_must_be_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("resnet50", weights="IMAGENET1K_V2")
    net, _ = build_backbone("small_cnn", in_channels=1)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loaded, _ = build_backbone("small_cnn", in_channels=1, weights=tmp_path / "w.pt")
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_npz_loader_schema(tmp_path):
    data = load_npz(write_npz(tmp_path / "d.npz"))
    x, y = data.splits["train"]
    assert x.shape == (60, 1, 16, 16) and x.dtype == np.float32 and x.max() <= 1.0
    assert y.shape == (60,) and data.class_names == ["class0", "class1", "class2", "class3"]
    rgb = load_npz(write_npz(tmp_path / "r.npz", rgb=True))
    assert rgb.channels == 3


def test_npz_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"missing key\(s\) \['val_labels'\]"):
        load_npz(write_npz(tmp_path / "m.npz", drop=["val_labels"]))
    with pytest.raises(ValueError, match="outside the class list"):
        load_npz(write_npz(tmp_path / "d.npz"), class_names=["a", "b"])


def test_image_folder(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    for cls in ("normal", "rare"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"{i}.png"), rng.integers(0, 255, (20, 24), dtype=np.uint8))
    data = load_image_folder(tmp_path / "imgs", size=16)
    assert data.class_names == ["normal", "rare"]
    assert sum(len(y) for _, y in data.splits.values()) == 20
    assert data.splits["train"][0].shape[1:] == (1, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")


def test_image_folder_keeps_16_bit_depth(tmp_path):
    """A 16-bit slice whose values all sit below 256 is not read as black; 8-bit files beside it keep
    their own scale."""
    import cv2

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "imgs" / "a" / "x16.png"), np.full((16, 16), 200, np.uint16))
    cv2.imwrite(str(tmp_path / "imgs" / "b" / "x8.png"), np.full((16, 16), 200, np.uint8))
    data = load_image_folder(tmp_path / "imgs", size=16)
    values = {int(y): float(x.max()) for split in data.splits.values() for x, y in zip(*split)}
    assert values == {0: pytest.approx(200 / 65535), 1: pytest.approx(200 / 255)}


def test_classifier_freeze_and_fusion():
    spec = build_spec(components=("ce", "focal", "cb", "ldam"), mode="welde", activation="softmax")
    model = ImageClassifier("small_cnn", 3, class_counts=[30, 10, 3], in_channels=1, **spec.model_kwargs())
    assert model.welde_spec == spec and model.heads.head_types == ("linear", "linear", "linear", "cosine")
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("heads.", "objective."))}
    assert "objective.theta" in trainable
    x = torch.rand(4, 1, 16, 16)
    p = model.predict_proba(x)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    with torch.no_grad():  # the ldam (cosine) head enters the fusion as softmax(30·cos)
        z = model(x)
    ref = sum(0.25 * (t * s).softmax(1) for t, s in zip(z, (1, 1, 1, 30)))
    torch.testing.assert_close(p, ref)


def test_classifier_refuses_bad_specs():
    with pytest.raises(ValueError, match=r"cosine head for 'ldam' with s=1\.0"):
        ImageClassifier("small_cnn", 3, ("ldam",), heads=("cosine",), loss_params={"ldam": {"s": 1.0}},
                        class_counts=[3, 2, 1], in_channels=1)
    with pytest.raises(ValueError, match="activation='sigmoid'"):
        ImageClassifier("small_cnn", 3, ("ce",), activation="sigmoid", in_channels=1)
    with pytest.raises(ValueError, match="needs class_counts"):
        ImageClassifier("small_cnn", 3, ("ldam",), in_channels=1)


def _quadrant_images(n_per: int = 24, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright square in quadrant k on noise — separable by position."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per)
    x = 0.1 * torch.rand(len(y), 1, size, size, generator=g)
    h = size // 2
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, 0, r * h:(r + 1) * h, c * h:(c + 1) * h] += 0.8
    return x, y


@pytest.mark.parametrize("loss_params", [None, {"ldam": {"s": 1.0}}], ids=["cosine-s30", "linear-s1"])
def test_ldam_classifier_head_becomes_confident(loss_params):
    x, y = _quadrant_images()
    spec = build_spec(components=("ldam",), mode="single", activation="softmax", loss_params=loss_params)
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", 3, class_counts=[24, 24, 24], in_channels=1, **spec.model_kwargs())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        loss = model.objective(model(x), y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    p = model.predict_proba(x)
    assert float(p.gather(1, y[:, None]).min()) > 0.99
