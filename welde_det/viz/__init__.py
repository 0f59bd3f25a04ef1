"""Visualisation: detection overlays on MRI slices (:func:`draw_detections`)."""

from __future__ import annotations

from welde_det.viz.overlay import (
    PALETTE,
    OverlayLayout,
    class_colour,
    draw_detections,
    render_detections,
)

__all__ = ["PALETTE", "OverlayLayout", "class_colour", "draw_detections", "render_detections"]
