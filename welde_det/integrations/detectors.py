"""The :class:`~welde_det.integrations.base.Detector` of each detection framework, built from a checkpoint.

Both are rebuilt from the one checkpoint schema (:mod:`welde_det.checkpoint`): the model is
constructed from plain values (model YAML or arch name, class counts, the WELDE spec) and
its state dict loaded strictly — nothing in the file is unpickled beyond tensors and plain
containers. ``predict_batch`` runs one forward pass per batch; ``predict`` is a batch of
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from welde_det.classes import ClassStats
from welde_det.integrations.base import Detector, image_to_float

__all__ = ["RCNNDetector", "YOLODetector", "rcnn_predict_batch"]


def _records(rows: list[list[float]], names: Sequence[str], conf: float) -> list[dict[str, Any]]:
    out = [{"bbox": [float(v) for v in r[:4]], "score": float(r[4]), "class_index": int(r[5]),
            "class_name": names[int(r[5])]} for r in rows if r[4] >= conf]
    out.sort(key=lambda d: -d["score"])
    return out


# ----------------------------------------------------------------------------- YOLO
class YOLODetector(Detector):
    """A welde_det YOLO checkpoint; the model's head fuses its K heads before Ultralytics' NMS."""

    framework = "yolo"

    def __init__(self, ckpt: Any, device: str = "cpu", *, iou: float = 0.7, max_det: int = 300) -> None:
        from welde_det.integrations.yolo import model_from_checkpoint

        extra = ckpt.extra or {}
        super().__init__(ckpt.class_stats, channels=int(extra.get("channels", 1)), imgsz=int(extra.get("imgsz", 640)),
                         weights=ckpt.path, device=device)
        self.model = model_from_checkpoint(ckpt).to(device).eval()
        self.iou, self.max_det = iou, max_det

    def predict_batch(self, images: Sequence[np.ndarray], conf: float = 0.25) -> list[list[dict[str, Any]]]:
        """Letterbox every slice, one forward pass, Ultralytics' NMS, boxes back in each slice's pixels."""
        from welde_det.integrations.yolo import predict_yolo_batch

        dets = predict_yolo_batch(self.model, images, imgsz=self.imgsz, channels=self.channels, conf=conf,
                                  iou=self.iou, max_det=self.max_det)
        return [_records(d.tolist(), self.names, conf) for d in dets]

    def predict(self, image: np.ndarray, conf: float = 0.25) -> list[dict[str, Any]]:
        """See :meth:`Detector.predict`."""
        return self.predict_batch([image], conf)[0]


# ----------------------------------------------------------------------------- Faster R-CNN
@torch.no_grad()
def rcnn_predict_batch(model: torch.nn.Module, images: Sequence[torch.Tensor], *, conf: float,
                       device: torch.device | str) -> list[list[list[float]]]:
    """Rows ``[x1, y1, x2, y2, score, class index]`` per image (labels 1..C become 0..C-1)."""
    heads = model.roi_heads
    default = float(heads.score_thresh)
    heads.score_thresh = min(default, float(conf))  # the RoI heads drop boxes below their own threshold
    try:
        outs = model([im.to(device) for im in images])
    finally:
        heads.score_thresh = default
    return [[[*box, float(s), int(lab) - 1] for box, lab, s in zip(o["boxes"].cpu().double().tolist(),
                                                                    o["labels"].tolist(), o["scores"].tolist())
             if s >= conf] for o in outs]


class RCNNDetector(Detector):
    """A welde_det Faster R-CNN checkpoint."""

    framework = "rcnn"

    def __init__(self, ckpt: Any, device: str = "cpu") -> None:
        from welde_det.integrations.rcnn import build_rcnn_model

        extra = ckpt.extra or {}
        stats: ClassStats = ckpt.class_stats
        imgsz = int(extra.get("imgsz", 384))
        super().__init__(stats, channels=int(extra.get("channels", 1)), imgsz=imgsz, weights=ckpt.path,
                         device=device)
        model = build_rcnn_model(ckpt.arch, stats.effective_counts, ckpt.welde, channels=self.channels, imgsz=imgsz)
        model.load_state_dict(ckpt.model_state)
        self.model = model.to(device).eval()
        self.arch = ckpt.arch

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image_to_float(image))[None]
        return x.expand(3, -1, -1).contiguous() if self.channels == 3 else x

    def predict_batch(self, images: Sequence[np.ndarray], conf: float = 0.25) -> list[list[dict[str, Any]]]:
        """One forward pass over the batch (torchvision batches internally)."""
        if not len(images):
            return []
        rows = rcnn_predict_batch(self.model, [self._tensor(im) for im in images], conf=conf, device=self.device)
        return [_records(r, self.names, conf) for r in rows]

    def predict(self, image: np.ndarray, conf: float = 0.25) -> list[dict[str, Any]]:
        """See :meth:`Detector.predict`; labels 1..C of the model are class indices 0..C−1."""
        return self.predict_batch([image], conf)[0]
