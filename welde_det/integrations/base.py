"""The framework-independent detector interface (below ``engine/``, above the integrations).

Every trained detector — whatever framework made it — is a :class:`Detector`: class
names, the tail set, input channels and size, and ``predict(image, conf)`` on one 2D slice
(``predict_batch`` on several). :mod:`welde_det.integrations.registry` maps a checkpoint's
``framework`` to the loader that builds one.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.classes import ClassStats

__all__ = ["Detector", "image_to_float"]


def image_to_float(image: np.ndarray) -> np.ndarray:
    """A 2D uint8/uint16 slice as float32 in [0, 1] (÷255 or ÷65535), as the detectors were trained.

    Raises:
        ValueError: not a 2D uint8/uint16 array.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"a detector takes one 2D slice (rows, cols), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    raise ValueError(f"a detector takes a uint8 or uint16 slice, got {image.dtype} "
                     "(window it first with welde_det.io.window_image)")


class Detector(abc.ABC):
    """One trained detector, framework-independent.

    Subclasses set the attributes (usually by calling ``super().__init__``) and implement
    :meth:`predict`.

    Attributes:
        class_stats: the training split's :class:`ClassStats` saved in the checkpoint.
        names: class names in class-index order.
        tail: names of the tail classes.
        channels: input channels the model takes (1, or 3 = the grey slice repeated).
        imgsz: the training input size (pixels); models resize internally.
        weights: the checkpoint path, if loaded from one.
        device: where the model runs.
        framework: ``"rcnn"``, ``"yolo"``, ...

    Example:
        >>> det = load_detector("runs/rcnn_welde-…/weights/last.pt")  # doctest: +SKIP
        >>> det.predict(slice_uint8, conf=0.25)[0]  # doctest: +SKIP
        {'bbox': [41.2, 80.0, 97.5, 101.3], 'score': 0.91, 'class_index': 2, 'class_name': 'Normal_IVD'}
    """

    framework: str = "unknown"

    def __init__(self, class_stats: ClassStats, *, channels: int = 1, imgsz: int = 640,
                 weights: str | os.PathLike | None = None, device: str = "cpu") -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.class_stats = class_stats
        self.names: list[str] = list(class_stats.names)
        self.tail: list[str] = list(class_stats.tail_names)
        self.channels = int(channels)
        self.imgsz = int(imgsz)
        self.weights = Path(weights) if weights is not None else None
        self.device = str(device)

    @abc.abstractmethod
    def predict(self, image: np.ndarray, conf: float = 0.25) -> list[dict[str, Any]]:
        """Detections on one slice, highest score first.

        Args:
            image: (rows, cols) uint8 or uint16 slice, displayed superior up, anterior left.
            conf: keep detections with ``score >= conf``.

        Returns:
            Dicts ``{"bbox": [x1, y1, x2, y2], "score", "class_index", "class_name"}``,
            boxes in pixels of ``image``.
        """

    def predict_batch(self, images: Sequence[np.ndarray], conf: float = 0.25) -> list[list[dict[str, Any]]]:
        """:meth:`predict` for several slices; frameworks override it to run one forward pass.

        ``tools/evaluate.py --weights`` and ``tools/infer.py`` both predict through this
        method with the same batch size, so they give the same detections.
        """
        return [self.predict(im, conf) for im in images]

    def check_names(self, expected: Sequence[str] | None) -> None:
        """Raise unless the checkpoint's classes are exactly ``expected`` (in order); ``None`` passes."""
        if expected is None:
            return
        expected = [str(n) for n in expected]
        if expected != self.names:
            raise ValueError(
                f"{self.weights or 'detector'}: a checkpoint from another class list — it was trained on "
                f"{self.names} but {expected} were expected")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weights={str(self.weights)!r}, classes={self.names}, "
                f"tail={self.tail}, channels={self.channels}, imgsz={self.imgsz}, device={self.device!r})")
