"""Image classification with single losses, the CE-ensemble control or WELDE.

Backbones: torchvision ResNet-50, EfficientNetV2-S and DenseNet-121 (the LMF paper's
three), randomly initialised or loaded from a **local** weights file — never downloaded —
plus ``small_cnn`` for fast CPU runs. Grayscale input replaces the first convolution.
The classification part is always :class:`~welde_det.welde.WELDEHeads` on the pooled
feature: K = 1 for a single loss, K heads for ``ce_ensemble`` / ``welde``; the model carries
its objective (as the detectors do), both built from a
:class:`~welde_det.welde.WELDESpec`'s plain keyword arguments.

Datasets: the MedMNIST ``.npz`` layout (``train_images``, ``train_labels``, ``val_*``,
``test_*``; labels (N,) or (N, 1); optional ``class_names``) and an image folder with one
sub-folder per class (optionally ``train/``, ``val/``, ``test/`` sub-trees).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from welde_det.welde import WELDEObjective, build_spec, fuse

__all__ = [
    "ARCHS",
    "ClassificationData",
    "ImageClassifier",
    "build_backbone",
    "load_classification_data",
    "load_image_folder",
    "load_npz",
]

ARCHS = ("small_cnn", "resnet50", "efficientnet_v2_s", "densenet121")
NPZ_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class SmallCNN(nn.Module):
    """Four conv blocks + global pooling; 128-d features. Fast on CPU for 8–64 px images."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            bias=module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1))
            parent = model
            *path, last = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, last, new)
            return


def build_backbone(arch: str, in_channels: int = 3, weights: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """A feature extractor (images → (N, D)) and its feature dimension D.

    Args:
        arch: one of :data:`ARCHS`.
        in_channels: 1 (grayscale) or 3.
        weights: a local ``.pt``/``.pth`` state dict for the torchvision backbone (matching
            keys are loaded; the classifier is dropped). None = random initialisation.

    Raises:
        ValueError: unknown architecture, a weights *name* instead of a file, or a file
            that does not fit the architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown classification arch {arch!r}; choose one of {list(ARCHS)}")
    if arch == "small_cnn":
        net = SmallCNN(in_channels)
        dim = net.out_dim
    else:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if arch == "resnet50":
            dim = net.fc.in_features
            net.fc = nn.Identity()
        else:
            last = net.classifier[-1] if isinstance(net.classifier, nn.Sequential) else net.classifier
            dim = last.in_features
            net.classifier = nn.Identity()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"weights {weights!r} is not a local file; welde_det never downloads weights. Download them "
                "yourself (e.g. torchvision's state dict) and pass the file path, or leave weights unset for "
                "random initialisation"
            )
        from welde_det.checkpoint import safe_load

        state = safe_load(path)  # weights only; a file that needs more is an UnsafeCheckpointError naming why
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = net.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not fitting:
            raise ValueError(f"{path}: no tensor in this file fits a {arch} backbone")
        net.load_state_dict(fitting, strict=False)
    if in_channels != 3 or arch == "small_cnn":
        _replace_first_conv(net, in_channels)
    return net, dim


class ImageClassifier(nn.Module):
    """Backbone + K classification heads (:class:`~welde_det.welde.WELDEHeads`) + their objective.

    Args:
        arch: backbone name; num_classes: C.
        components, mode, activation, heads, loss_params, objective_kw, hidden: a
            :class:`~welde_det.welde.WELDESpec`'s ``model_kwargs()`` (checked by
            :func:`~welde_det.welde.build_spec`; ``activation`` must be ``"softmax"``).
        class_counts: training images per class, for the losses that weight by them
            (``ClassStats.effective_counts``; None only when no component needs counts).
        in_channels: 1 or 3; weights: local backbone weights.

    Attributes:
        objective: the :class:`~welde_det.welde.WELDEObjective` (θ, EMA statistics and loss
            buffers are in this module's ``state_dict``); train with
            ``model.objective(model(x), y)["loss"]``.
        welde_spec: the checked spec.

    Example:
        >>> spec = build_spec(components=("ce", "ldam"), mode="welde", activation="softmax")
        >>> model = ImageClassifier("small_cnn", 3, class_counts=[50, 10, 2], in_channels=1,
        ...                         **spec.model_kwargs())
        >>> model.predict_proba(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 3])
    """

    def __init__(self, arch: str, num_classes: int, components: Sequence[str] = ("ce",), *,
                 mode: str = "single", activation: str = "softmax", heads: Sequence[str] | None = None,
                 loss_params: Mapping[str, Mapping[str, Any]] | None = None,
                 objective_kw: Mapping[str, Any] | None = None, hidden: int | None = None,
                 class_counts: Sequence[int | float] | None = None, in_channels: int = 3,
                 weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        spec = build_spec(components=components, mode=mode, activation=activation, head=heads or "auto",
                          loss_params=loss_params, objective_kw=objective_kw, hidden=hidden)
        if spec.activation != "softmax":
            raise ValueError(f"image classification is a softmax over the classes; the WELDE spec says "
                             f"activation={spec.activation!r}; build the spec with activation='softmax'")
        if class_counts is not None and len(class_counts) != num_classes:
            raise ValueError(f"{len(class_counts)} class counts for num_classes={num_classes}")
        self.welde_spec = spec
        self.backbone, dim = build_backbone(arch, in_channels, weights)
        self.heads = spec.build_heads(dim, num_classes)
        self.objective: WELDEObjective = spec.build_objective(class_counts)
        self.arch, self.in_channels, self.num_classes = arch, in_channels, num_classes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """K logit tensors (N, C) — what :attr:`objective` takes."""
        return self.heads(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Freeze the shared backbone (and its batch-norm statistics): only heads and θ train."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Fused softmax probabilities (N, C): each head's s-scaled logits, the objective's weights.

        Call ``eval()`` first for inference (batch-norm statistics).
        """
        logits = self(x)
        weights = self.objective.fusion_weights().to(logits[0].device)
        return fuse(self.objective.predictive_logits(logits), weights, activation="softmax")


@dataclass
class ClassificationData:
    """Images (N, C, H, W) float32 in [0, 1] and labels per split, with class names."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    source: str

    @property
    def channels(self) -> int:
        """Image channels."""
        return int(self.splits["train"][0].shape[1])


def _to_nchw(images: np.ndarray, source: str, key: str) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ValueError(f"{source}: {key} must be (N, H, W) or (N, H, W, C), got {x.shape}")
    scale = 65535.0 if x.dtype == np.uint16 else 255.0 if x.dtype == np.uint8 else 1.0
    return (x.astype(np.float32) / scale).astype(np.float32)


def load_npz(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> ClassificationData:
    """Read a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``).

    Raises:
        ValueError: missing keys (named), mismatched lengths, labels outside the class list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in NPZ_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; a MedMNIST-style npz needs {list(NPZ_KEYS)}")
        names = list(class_names) if class_names else (
            [str(n) for n in data["class_names"]] if "class_names" in data.files else None)
        splits = {}
        for split in ("train", "val", "test"):
            x = _to_nchw(data[f"{split}_images"], str(path), f"{split}_images")
            y = np.asarray(data[f"{split}_labels"]).reshape(-1).astype(np.int64)
            if len(x) != len(y):
                raise ValueError(f"{path}: {split}_images has {len(x)} images but {split}_labels has {len(y)}")
            splits[split] = (x, y)
    num = int(max(int(y.max()) if len(y) else -1 for _, y in splits.values())) + 1
    names = names or [f"class{k}" for k in range(num)]
    for split, (_, y) in splits.items():
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(f"{path}: {split}_labels has label {int(y.max() if y.max() >= len(names) else y.min())}"
                             f" outside the class list 0..{len(names) - 1} {names}")
    return ClassificationData(splits, names, str(path))


def load_image_folder(root: str | os.PathLike, *, size: int = 64, channels: int = 1, seed: int = 0,
                      fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> ClassificationData:
    """Read an image folder: ``root/<class>/*.png`` (split by ``fractions``, stratified) or
    ``root/{train,val,test}/<class>/*.png``. Images are resized to ``size``×``size``.

    Raises:
        ValueError: no class folders, no images, or split folders with different classes.
    """
    import cv2

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")

    def read_tree(base: Path) -> tuple[list[str], list[tuple[Path, int]]]:
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        items = [(f, i) for i, c in enumerate(classes) for f in sorted((base / c).rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        return classes, items

    def load(items):
        # ANYDEPTH: 16-bit slices keep their depth (plain GRAYSCALE/COLOR would keep 8 bits)
        flag = (cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR) | cv2.IMREAD_ANYDEPTH
        imgs = []
        for f, _ in items:
            im = cv2.imread(str(f), flag)
            if im is None:
                raise ValueError(f"{f}: not a readable image")
            im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
            imgs.append(im if channels == 1 else im[:, :, ::-1])
        if len({im.dtype for im in imgs}) > 1:  # 8- and 16-bit files together: each on its own scale
            imgs = [im.astype(np.float32) / (65535.0 if im.dtype == np.uint16 else 255.0) for im in imgs]
        x = np.stack(imgs) if imgs else np.zeros((0, size, size), np.uint8)
        return _to_nchw(x, str(root), "images"), np.array([i for _, i in items], np.int64)

    if all((root / s).is_dir() for s in ("train", "val", "test")):
        trees = {s: read_tree(root / s) for s in ("train", "val", "test")}
        classes = trees["train"][0]
        for s, (c, _) in trees.items():
            if c != classes:
                raise ValueError(f"{root / s}: classes {c} differ from train's {classes}")
        splits = {s: load(items) for s, (_, items) in trees.items()}
    else:
        classes, items = read_tree(root)
        if not classes:
            raise ValueError(f"{root}: no class sub-folders (expected root/<class>/*.png)")
        if not items:
            raise ValueError(f"{root}: no images in the class folders")
        rng = np.random.default_rng(seed)
        parts: dict[str, list] = {"train": [], "val": [], "test": []}
        for c in range(len(classes)):
            mine = [it for it in items if it[1] == c]
            rng.shuffle(mine)
            n_tr = max(1, round(fractions[0] * len(mine)))
            n_va = round(fractions[1] * len(mine))
            parts["train"] += mine[:n_tr]
            parts["val"] += mine[n_tr:n_tr + n_va]
            parts["test"] += mine[n_tr + n_va:]
        splits = {s: load(v) for s, v in parts.items()}
    return ClassificationData(splits, classes, str(root))


def load_classification_data(source: str | os.PathLike, *, channels: int = 1, size: int = 64,
                             seed: int = 0) -> ClassificationData:
    """An ``.npz`` file or an image folder (see :func:`load_npz`, :func:`load_image_folder`)."""
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        return load_npz(p)
    if p.is_dir():
        return load_image_folder(p, size=size, channels=channels, seed=seed)
    raise ValueError(f"classification data {source!r} must be a MedMNIST-style .npz file or an image folder")
