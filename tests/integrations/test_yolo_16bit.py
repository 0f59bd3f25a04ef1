"""16-bit slices through Ultralytics' training loader (``data.bit_depth=16``).

The slices here hold their whole content below 256 on the 16-bit scale: Ultralytics' own
reader keeps only the high byte, so it sees a black image. ``HighBitYOLODataset`` must give
the exact ``value · 255 / 65535`` on every pixel, through letterbox and through mosaic.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ultralytics")
from ultralytics.cfg import get_cfg
from ultralytics.data.dataset import YOLODataset

from welde_det.integrations.yolo import HighBitMosaic, HighBitYOLODataset

SIZE = 64


def _dataset(tmp_path: Path, n: int = 4) -> tuple[Path, list[np.ndarray]]:
    """n 16-bit grey slices with one box each, intensities 0..250 (all below the 8-bit high byte)."""
    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 251, (SIZE, SIZE), dtype=np.uint16)
        assert cv2.imwrite(str(images / f"s{i}.png"), arr)
        (labels / f"s{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
        arrays.append(arr)
    return images, arrays


def _make(cls, images: Path, *, augment: bool, bit_depth: int = 16, **hyp_kw):
    hyp = get_cfg(overrides={"mosaic": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "fliplr": 0.0,
                             "translate": 0.0, "scale": 0.0, **hyp_kw})
    kw = {"bit_depth": bit_depth} if cls is HighBitYOLODataset else {}
    return cls(img_path=str(images), imgsz=SIZE, augment=augment, hyp=hyp, rect=False, stride=32, pad=0.0,
               data={"names": {0: "a"}, "nc": 1, "channels": 1}, **kw)


def test_ultralytics_squashes_what_high_bit_dataset_keeps(tmp_path):
    images, arrays = _dataset(tmp_path)
    plain = _make(YOLODataset, images, augment=False)[0]["img"]
    assert plain.dtype.is_floating_point is False and int(plain.max()) == 0  # the high byte of 0..250

    ds = _make(HighBitYOLODataset, images, augment=False)
    item = ds[0]
    img = item["img"].numpy()
    assert img.dtype == np.float32 and img.shape == (1, SIZE, SIZE)
    src = arrays[[Path(f).name for f in ds.im_files].index(Path(item["im_file"]).name)]
    np.testing.assert_allclose(img[0], src.astype(np.float32) * np.float32(255 / 65535), rtol=0, atol=1e-6)
    # what the trainer's "/ 255" then feeds the model equals predict_yolo's uint16 / 65535
    np.testing.assert_allclose(img[0] / 255, src / 65535, rtol=1e-6, atol=1e-9)


def test_mosaic_and_affine_keep_fractional_values(tmp_path):
    images, _ = _dataset(tmp_path)
    ds = _make(HighBitYOLODataset, images, augment=True, mosaic=1.0, degrees=5.0)
    mosaics = [t for t in ds.transforms.transforms[0].transforms if isinstance(t, HighBitMosaic)]
    assert len(mosaics) == 1
    img = ds[1]["img"].numpy()
    assert img.dtype == np.float32 and img.shape == (1, SIZE, SIZE)
    inside = img[(img > 0) & (img < 1)]  # content pixels (< 250·255/65535 ≈ 0.97), not the 114 fill
    assert inside.size > SIZE * SIZE // 4
    assert np.unique(np.round(inside, 4)).size > 50  # many sub-8-bit levels survive


def test_bit_depth_8_is_ultralytics_unchanged(tmp_path):
    images, _ = _dataset(tmp_path)
    a = _make(YOLODataset, images, augment=False)[2]["img"]
    b = _make(HighBitYOLODataset, images, augment=False, bit_depth=8)[2]["img"]
    assert a.dtype == b.dtype and bool((a == b).all())
    with pytest.raises(ValueError, match="bit_depth"):
        _make(HighBitYOLODataset, images, augment=False, bit_depth=12)


def test_three_channels_without_hsv_and_no_8bit_blends(tmp_path):
    from ultralytics.data.augment import RandomHSV

    images, _ = _dataset(tmp_path)
    ds = _make(HighBitYOLODataset, images, augment=True, mosaic=1.0, hsv_v=0.4, hsv_s=0.7)
    assert not any(isinstance(t, RandomHSV) for t in ds.transforms.transforms)  # an 8-bit lookup table
    rgb = HighBitYOLODataset(img_path=str(images), imgsz=SIZE, augment=True,
                             hyp=get_cfg(overrides={"mosaic": 1.0, "hsv_v": 0.4}), rect=False, stride=32, pad=0.0,
                             data={"names": {0: "a"}, "nc": 1, "channels": 3}, bit_depth=16)
    img = rgb[0]["img"].numpy()
    assert img.dtype == np.float32 and img.shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="mixup"):
        _make(HighBitYOLODataset, images, augment=True, mixup=0.5)


def test_trainer_builds_the_high_bit_dataset_from_its_spec(tmp_path, monkeypatch):
    """``bit_depth: 16`` in the trainer spec: the trainer's training dataset is a HighBitYOLODataset
    giving float32 slices finer than 8-bit steps (the runner's end-to-end run is an engine test)."""
    from welde_det.integrations.yolo import SPEC_ENV, WELDEDetectionTrainer
    from welde_det.welde import build_spec

    _dataset(tmp_path / "data")
    (tmp_path / "data" / "data.yaml").write_text(f"path: {tmp_path / 'data'}\ntrain: images/train\n"
                                                 "val: images/train\nchannels: 1\nnames:\n  0: a\n")
    spec = build_spec(components=("ce",), mode="single", activation="sigmoid")
    monkeypatch.setenv(SPEC_ENV, json.dumps({"welde": spec.to_dict(), "class_counts": [4.0], "bit_depth": 16}))
    trainer = WELDEDetectionTrainer(overrides={"model": "yolov8n.yaml", "data": str(tmp_path / "data" / "data.yaml"),
                                               "imgsz": SIZE, "device": "cpu", "project": str(tmp_path / "probe")})
    trainer.model = trainer.get_model(cfg="yolov8n.yaml", verbose=False)
    ds = trainer.build_dataset(trainer.data["train"], mode="train", batch=4)
    assert isinstance(ds, HighBitYOLODataset) and ds.bit_depth == 16
    img = ds[0]["img"].numpy()
    assert img.dtype == np.float32 and not np.allclose(img, np.round(img))  # finer than 8-bit steps
