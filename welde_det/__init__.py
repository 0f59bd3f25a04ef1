"""welde_det: imbalance-aware detection for spinal MRI.

WELDE (Weighted Ensemble Loss with Diversity Enhancement) heads and objective for
Ultralytics YOLO, torchvision Faster R-CNN and image classifiers; the seeds' loss
library; DICOM/NIfTI loaders; a COCO-exact evaluator. Importing the package changes
nothing global: no monkeypatching, no network, no logging configuration.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
