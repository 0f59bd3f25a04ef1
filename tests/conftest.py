"""Test-session settings shared by the whole suite: offline, headless, CPU-friendly.

Tests marked ``gpu`` are skipped when no CUDA device is present; everything else runs on
the CPU in seconds.
"""

from __future__ import annotations

import os

# Set before any test imports Ultralytics / matplotlib.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("WELDE_NO_PROGRESS", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Keep torch to the threads the CI machine has (xdist already runs 2 workers)."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    yield
