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
    model = ImageClassifier("small_cnn", 3, ["ce", "focal", "cb", "ldam"], in_channels=1)
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    p = model.predict_proba(torch.rand(4, 1, 16, 16))
    torch.testing.assert_close(p.sum(1), torch.ones(4))
