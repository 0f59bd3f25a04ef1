"""Detection overlays on MRI slices: class-coloured boxes, "name score" labels, a legend.

The slice is drawn greyscale in the window it already has (uint8 over 0..255, uint16 over
0..65535 — the values the detector saw), never re-windowed. Boxes use a fixed
colour-blind-friendly palette indexed by class (Okabe–Ito, then Paul Tol's muted set);
tail classes are drawn dashed and marked "(tail)" in the legend so rare findings stand out
in print and for readers who cannot tell the colours apart.

Rendering uses matplotlib's object API (``Figure`` + the Agg canvas) with its bundled
DejaVu font, so nothing global (the pyplot backend, rcParams) changes and no font is
downloaded. The PNG is written atomically and carries no text chunks (no ``Software``,
no title): the title drawn in the pixels is the caller's, and callers pass a pseudonym.

Example:
    >>> layout = draw_detections(image, dets, ["DDD", "SS"], ["SS"], "out/case.png",
    ...                          title="case: 2 detections")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.utils.fileio import atomic_write_bytes

__all__ = ["PALETTE", "OverlayLayout", "class_colour", "draw_detections", "render_detections"]

#: Okabe–Ito (without black, invisible on MRI) followed by Paul Tol's muted scheme.
PALETTE: tuple[str, ...] = (
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499",
)
_DPI = 100
_MIN_SIDE = 512  # small slices are enlarged (integer factor) so labels stay readable
_TITLE_PX = 40


@dataclass(frozen=True)
class OverlayLayout:
    """Where the slice landed in the written PNG.

    Attributes:
        path: the PNG written (None from :func:`render_detections`).
        scale: output pixels per slice pixel (an integer ≥ 1).
        origin: (x, y) output pixel of the slice's top-left corner.
        size: (width, height) of the PNG in pixels.
    """

    path: Path | None
    scale: int
    origin: tuple[int, int]
    size: tuple[int, int]

    def to_output(self, x: float, y: float) -> tuple[int, int]:
        """Output pixel (column, row) covering slice position ``(x, y)`` (continuous pixel units)."""
        return int(self.origin[0] + x * self.scale), int(self.origin[1] + y * self.scale)


def class_colour(class_index: int) -> str:
    """The palette colour of a class index (cycled beyond the palette's length)."""
    return PALETTE[class_index % len(PALETTE)]


def _display_range(image: np.ndarray) -> tuple[float, float]:
    if image.dtype == np.uint8:
        return 0.0, 255.0
    if image.dtype == np.uint16:
        return 0.0, 65535.0
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return lo, hi if hi > lo else lo + 1.0


def draw_detections(
    image: np.ndarray,
    detections: Sequence[dict[str, Any]],
    names: Sequence[str],
    tail: Sequence[str],
    out_path: str | os.PathLike,
    *,
    title: str = "",
) -> OverlayLayout:
    """Draw detections on a grey slice and write the PNG atomically.

    Arguments and errors as :func:`render_detections`; ``out_path`` is the PNG to write
    (parent folders are created). Returns the layout with ``path`` set.
    """
    data, layout = render_detections(image, detections, names, tail, title=title)
    return replace(layout, path=atomic_write_bytes(out_path, data))


def render_detections(
    image: np.ndarray,
    detections: Sequence[dict[str, Any]],
    names: Sequence[str],
    tail: Sequence[str],
    *,
    title: str = "",
) -> tuple[bytes, OverlayLayout]:
    """Render the overlay PNG in memory (for callers that write many files only once all succeed).

    Args:
        image: the slice, (rows, cols), uint8 or uint16 (float is shown min..max).
        detections: dicts with ``bbox`` ([x1, y1, x2, y2], slice pixels, continuous
            coordinates), ``score``, ``class_index`` and ``class_name``.
        names: all class names, in class-index order (the legend lists every one).
        tail: names of the tail classes (dashed boxes, "(tail)" in the legend, which also
            gives each class's detection count).
        title: text above the slice (a pseudonym or index and counts — never an input's name).

    Returns:
        The PNG bytes and an :class:`OverlayLayout` mapping slice pixels to output pixels.

    Raises:
        ValueError: ``image`` is not 2D, or a detection's class index is outside ``names``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"draw_detections needs a 2D slice, got shape {image.shape}")
    for d in detections:
        if not 0 <= int(d["class_index"]) < len(names):
            raise ValueError(f"detection class_index {d['class_index']} is outside 0..{len(names) - 1} "
                             f"(classes {list(names)})")
    tail_set = set(tail)
    rows, cols = image.shape
    scale = max(1, math.ceil(_MIN_SIDE / max(rows, cols)))
    img_w, img_h = cols * scale, rows * scale
    longest = max((len(n) + (7 if n in tail_set else 0) + 5 for n in names), default=8)
    legend_px = int(70 + 7 * longest)  # DejaVu Sans at 9 pt: about 7 px a character
    fig_w, fig_h = img_w + legend_px, max(img_h + _TITLE_PX, 24 * len(names) + _TITLE_PX + 20)
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    top = _TITLE_PX
    ax = fig.add_axes((0.0, (fig_h - top - img_h) / fig_h, img_w / fig_w, img_h / fig_h))
    vmin, vmax = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
              extent=(0, cols, rows, 0))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()
    line_w = 2.0 if scale * max(rows, cols) <= 768 else 2.5
    for d in detections:
        c = int(d["class_index"])
        x1, y1, x2, y2 = (float(v) for v in d["bbox"])
        colour = class_colour(c)
        is_tail = names[c] in tail_set
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=line_w,
                               linestyle=(0, (4, 2)) if is_tail else "solid"))
        label = f"{d.get('class_name', names[c])} {float(d['score']):.2f}"
        inside = y1 * scale < 14  # no room above the box at the top edge: label inside it
        ax.text(x1, y1, label, fontsize=8, color="black", va="top" if inside else "bottom", ha="left", clip_on=True,
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
    fig.text(0.01, 1 - (top / 2) / fig_h, title, fontsize=11, va="center", ha="left")
    legend_ax = fig.add_axes(((img_w + 8) / fig_w, 0.0, (legend_px - 8) / fig_w, (fig_h - top) / fig_h))
    legend_ax.set_axis_off()
    counts = np.bincount([int(d["class_index"]) for d in detections], minlength=len(names))
    handles = [Line2D([0], [0], color=class_colour(i), linewidth=3,
                      linestyle=(0, (4, 2)) if n in tail_set else "solid",
                      label=f"{n}{' (tail)' if n in tail_set else ''}: {counts[i]}")
               for i, n in enumerate(names)]
    legend_ax.legend(handles=handles, loc="upper left", fontsize=9, frameon=False, title="classes",
                     title_fontsize=9, handlelength=2.5)
    buf = io.BytesIO()
    # no text chunks: Matplotlib would write a "Software" tEXt chunk (outputs carry no metadata at all)
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue(), OverlayLayout(path=None, scale=scale, origin=(0, top), size=(fig_w, fig_h))
