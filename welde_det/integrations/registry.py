"""``{framework: loader}``: what turns a checkpoint into a model, whatever framework made it.

:func:`load_detector` (also exported as ``welde_det.engine.infer.load_detector``) reads
the checkpoint with ``torch.load(weights_only=True)`` (:func:`welde_det.checkpoint.load_checkpoint`),
looks its ``framework`` up in :data:`LOADERS` and builds the model from plain values.
New frameworks register a loader with :func:`register_loader`; nothing dispatches on file
names or on ad-hoc keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from welde_det.integrations.base import Detector

__all__ = ["DETECTION_FRAMEWORKS", "LOADERS", "load_detector", "load_model", "register_loader"]

logger = logging.getLogger(__name__)

HOW_TO_TRAIN = ("make one with `python tools/train.py --config configs/yolo_welde.yaml` "
                "(the run folder's weights/model.pt)")


def _yolo(ckpt: Any, device: str) -> Detector:
    from welde_det.integrations.detectors import YOLODetector

    return YOLODetector(ckpt, device)


def _rcnn(ckpt: Any, device: str) -> Detector:
    from welde_det.integrations.detectors import RCNNDetector

    return RCNNDetector(ckpt, device)


def _classify(ckpt: Any, device: str) -> Any:
    from welde_det.integrations.classifier import classifier_from_checkpoint

    return classifier_from_checkpoint(ckpt, device)


#: framework -> loader(checkpoint, device); detection loaders return a :class:`Detector`.
LOADERS: dict[str, Callable[[Any, str], Any]] = {"yolo": _yolo, "rcnn": _rcnn, "classify": _classify}
DETECTION_FRAMEWORKS = ("yolo", "rcnn")


def register_loader(framework: str, loader: Callable[[Any, str], Any]) -> None:
    """Add (or replace) the loader of a framework."""
    LOADERS[str(framework)] = loader


def _device(device: str | None) -> str:
    import torch

    from welde_det.utils.device import check_device

    return check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(weights: str | os.PathLike, device: str | None = None) -> Any:
    """The model a welde_det checkpoint holds (a :class:`Detector` for detectors).

    Raises:
        FileNotFoundError: no such file.
        welde_det.utils.device.DeviceError: a ``device`` this machine does not have.
        welde_det.checkpoint.CheckpointError: not a welde_det checkpoint, or an unknown framework.
        welde_det.checkpoint.UnsafeCheckpointError: the file needs arbitrary unpickling.
    """
    from welde_det.checkpoint import CheckpointError, load_checkpoint

    device = _device(device)  # before any work: a GPU this machine lacks is one line, not a CUDA traceback
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (pass a local path; nothing is downloaded)")
    ckpt = load_checkpoint(path, map_location="cpu")
    loader = LOADERS.get(ckpt.framework)
    if loader is None:
        raise CheckpointError(f"{path}: framework {ckpt.framework!r} has no loader (known: {sorted(LOADERS)})")
    return loader(ckpt, device)


def load_detector(weights: str | os.PathLike, device: str | None = None, *,
                  expected_names: Sequence[str] | None = None) -> Detector:
    """Load a trained detector, whatever framework made it.

    Args:
        weights: a checkpoint written by ``tools/train.py`` (a run's ``weights/model.pt``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available.
        expected_names: the class list the caller expects; a different list raises.

    Raises:
        FileNotFoundError, CheckpointError, UnsafeCheckpointError: see :func:`load_model`.
        ValueError: a classifier checkpoint, or one from another class list.
    """
    model = load_model(weights, device)
    if not isinstance(model, Detector):
        raise ValueError(f"{weights}: a {type(model).__name__} checkpoint, not a detector; {HOW_TO_TRAIN}")
    model.check_names(expected_names)
    logger.info("loaded %r", model)
    return model
