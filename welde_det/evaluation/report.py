"""Readable detection reports: JSON, Markdown and PNG plots from an ``evaluate_coco`` result.

:func:`write_report` writes into one folder

- ``report.json``: the 12 stats, per-class AP / AP50 / AR100 with GT counts, mAP_tail,
  the tail set and its rule, the confusion matrix (everything but the big arrays);
- ``report.md``: the summary, a per-class table (tail classes marked, a comparison
  column when a second run is given) and the pycocotools summary lines;
- ``pr_curves.png``, ``per_class_ap.png`` (tail classes highlighted) and ``confusion.png``.

Every file is written atomically; matplotlib is imported only here (Agg backend).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.evaluation.coco_eval import STAT_NAMES, summary_lines
from welde_det.utils.fileio import atomic_write_json, atomic_write_text, atomic_writer

__all__ = ["report_dict", "write_report"]


def _fmt(v: float) -> str:
    return "—" if v is None or v < 0 else f"{100 * v:.1f}"


def report_dict(result: dict[str, Any], *, title: str = "", compare: dict[str, Any] | None = None,
                compare_label: str = "baseline") -> dict[str, Any]:
    """The JSON-serialisable part of a result (plus the comparison run's headline numbers)."""
    names = result["class_names"]
    per_class = []
    for k, name in enumerate(names):
        row = {"class": name, "category_id": result["category_ids"][k], "num_gt": result["num_gt"][k],
               "ap": result["per_class_ap"][k], "ap50": result["per_class_ap50"][k],
               "ar100": result["per_class_ar100"][k], "tail": name in result["tail_classes"]}
        if compare is not None:
            row[f"ap_{compare_label}"] = compare["per_class_ap"][k]
        per_class.append(row)
    out = {
        "title": title,
        "stats": dict(zip(STAT_NAMES, result["stats"])),
        "map": result["stats"][0],
        "map50": result["stats"][1],
        "map_tail": result["map_tail"],
        "map50_tail": result["map50_tail"],
        "tail_classes": result["tail_classes"],
        "tail_rule": result["tail_rule"],
        "tail_excluded": result["tail_excluded"],
        "per_class": per_class,
        "confusion": {"matrix": np.asarray(result["confusion"]).tolist(), "labels": [*names, "background"],
                      "iou": result["confusion_iou"], "score": result["confusion_score"]},
        "num_images": result["num_images"],
        "num_detections": result["num_detections"],
        "dropped_detections": result["dropped_detections"],
        "class_stats": result.get("class_stats"),
    }
    if compare is not None:
        out["compare"] = {"label": compare_label, "map": compare["stats"][0], "map50": compare["stats"][1],
                          "map_tail": compare["map_tail"], "map50_tail": compare["map50_tail"],
                          "stats": dict(zip(STAT_NAMES, compare["stats"]))}
    return out


def _markdown(rep: dict[str, Any], label: str, compare_label: str) -> str:
    cmp = rep.get("compare")
    lines = [f"# {rep['title'] or 'Detection report'}", ""]
    head = "| metric | " + label + (f" | {compare_label} | Δ |" if cmp else " |")
    lines += [head, "|---|---:|" + ("---:|---:|" if cmp else "")]
    for key, name in (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map_tail", "mAP_tail"),
                      ("map50_tail", "mAP50_tail")):
        row = f"| {name} | {_fmt(rep[key])} |"
        if cmp:
            delta = rep[key] - cmp[key] if rep[key] >= 0 and cmp[key] >= 0 else None
            row += f" {_fmt(cmp[key])} | {'—' if delta is None else f'{100 * delta:+.1f}'} |"
        lines.append(row)
    lines += ["", f"Tail classes: {', '.join(rep['tail_classes'])} — {rep['tail_rule']}."]
    if rep["tail_excluded"]:
        lines.append(f"Excluded from mAP_tail (no ground truth in this split): {', '.join(rep['tail_excluded'])}.")
    lines += ["", "## Per class", ""]
    hdr = "| class | GT | AP | AP50 | AR100 |" + (f" AP ({compare_label}) |" if cmp else "")
    lines += [hdr, "|---|---:|---:|---:|---:|" + ("---:|" if cmp else "")]
    for row in rep["per_class"]:
        name = f"**{row['class']}** (tail)" if row["tail"] else row["class"]
        line = f"| {name} | {row['num_gt']} | {_fmt(row['ap'])} | {_fmt(row['ap50'])} | {_fmt(row['ar100'])} |"
        if cmp:
            line += f" {_fmt(row[f'ap_{compare_label}'])} |"
        lines.append(line)
    lines += ["", "## COCO summary (pycocotools-exact)", "", "```", *summary_lines(list(rep["stats"].values())), "```",
              "", f"{rep['num_images']} images, {rep['num_detections']} detections"
              + (f", {rep['dropped_detections']} dropped (unknown category)" if rep["dropped_detections"] else "") + ".",
              "", "Plots: `pr_curves.png`, `per_class_ap.png`, `confusion.png`.", ""]
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> None:
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def _plots(result: dict[str, Any], out: Path, compare: dict[str, Any] | None, label: str, compare_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["class_names"]
    tail = set(result["tail_classes"])
    rec = np.asarray(result["rec_thrs"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in names:
        pr = np.asarray(result["pr_curves"][name])
        if (pr < 0).all():
            continue
        ax.plot(rec, np.where(pr < 0, np.nan, pr), lw=2.2 if name in tail else 1.2,
                ls="-" if name in tail else "--", label=f"{name}{' (tail)' if name in tail else ''}")
    ax.set(xlabel="recall", ylabel="precision", title="PR curves @ IoU 0.5", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    _save_fig(fig, out / "pr_curves.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    x = np.arange(len(names))
    ap = np.maximum(np.asarray(result["per_class_ap"]), 0)
    width = 0.4 if compare is not None else 0.7
    colours = ["#d62728" if n in tail else "#1f77b4" for n in names]
    ax.bar(x - (width / 2 if compare is not None else 0), ap, width, color=colours, label=label)
    if compare is not None:
        ax.bar(x + width / 2, np.maximum(np.asarray(compare["per_class_ap"]), 0), width, color="#7f7f7f",
               label=compare_label)
        ax.legend(fontsize=8)
    ax.set_xticks(x, [f"{n}\n(tail)" if n in tail else n for n in names], fontsize=8)
    ax.set(ylabel="AP@[.5:.95]", ylim=(0, 1), title="Per-class AP (tail classes in red)")
    ax.grid(axis="y", alpha=0.3)
    _save_fig(fig, out / "per_class_ap.png")
    plt.close(fig)

    cm = np.asarray(result["confusion"], dtype=float)
    labels = [*names, "bg"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"Confusion @ IoU {result['confusion_iou']}, score ≥ {result['confusion_score']}")
    _save_fig(fig, out / "confusion.png")
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, *, title: str = "", label: str = "this run",
                 compare: dict[str, Any] | None = None, compare_label: str = "baseline",
                 plots: bool = True) -> Path:
    """Write report.json, report.md and the plots for an ``evaluate_coco`` result; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report_dict(result, title=title, compare=compare, compare_label=compare_label)
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", _markdown(rep, label, compare_label))
    if plots:
        _plots(result, out, compare, label, compare_label)
    return out
