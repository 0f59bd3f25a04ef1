"""Shared checks for the dataset tests: every COCO file we write must load in pycocotools."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest


def _pycocotools_check(path: Path) -> None:
    """Load ``path`` with pycocotools, feed its boxes back as detections and evaluate them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        anns = gt.loadAnns(gt.getAnnIds())
        assert len(gt.getImgIds()) == len(gt.dataset["images"])
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not dets:
            return
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0), f"{path}: ground truth scored against itself gives AP50 {ev.stats[1]}"


@pytest.fixture
def pycocotools_check():
    """``check(path_or_paths)``: every file loads in pycocotools and scores AP50 = 1 on itself."""

    def check(*paths: Path) -> None:
        for p in paths:
            _pycocotools_check(Path(p))

    return check
