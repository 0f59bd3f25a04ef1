"""Readable detection reports: JSON, Markdown, CSV and PNG plots from an ``evaluate_coco`` result.

:func:`detection_analysis` runs the analyses that rest on one matching of the detections
(bootstrap intervals, TIDE errors, FROC, per-image counts, the worst slices, GT
co-location, and the paired difference to a second run); :func:`write_report` writes into
one folder

- ``report.json``: everything in the Markdown, as numbers (NaN written as ``null``);
- ``report.md``: for a reader who is not a detection specialist — headline figures with
  95 % intervals in both AP flavours (pycocotools and Ultralytics), the per-class table,
  FROC sensitivities, the error analysis, the co-location of classes, the confusion
  matrix, the slices that miss the most tail boxes, the pycocotools summary lines;
- ``per_image.csv``: TP / FP / FN per image and class;
- ``pr_curves.png``, ``per_class_ap.png`` (with intervals), ``confusion.png``,
  ``tide.png``, ``froc.png``.

Every file is written atomically; matplotlib is imported only here (Agg backend).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from welde_det.evaluation.coco_eval import STAT_NAMES, summary_lines
from welde_det.evaluation.errors import ERROR_TYPES, colocation_table, tide_errors
from welde_det.evaluation.froc import froc_analysis
from welde_det.evaluation.intervals import bootstrap_difference, bootstrap_metrics
from welde_det.evaluation.per_image import (
    match_detections,
    per_image_counts,
    worst_slices,
    write_per_image_csv,
)
from welde_det.utils.fileio import atomic_write_json, atomic_write_text, atomic_writer

__all__ = ["detection_analysis", "report_dict", "write_report"]

_ERROR_WORDS = {
    "classification": "right place, wrong class (IoU ≥ 0.5 with a box of another class)",
    "localisation": "right class, box misplaced (IoU 0.1–0.5 with a box of its class)",
    "both": "wrong class and misplaced",
    "duplicate": "a second detection of a box already found",
    "background": "nothing there (IoU ≤ 0.1 with every box)",
    "missed": "a box no detection came near",
}


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0 else f"{100 * v:.1f}"


def _fmt_ci(iv: dict[str, Any] | None) -> str:
    if not iv or iv.get("value") is None:
        return "—"
    lo, hi = iv.get("low"), iv.get("high")
    if lo is None or hi is None:
        return _fmt(iv["value"])
    return f"{_fmt(iv['value'])} ({_fmt(lo)}–{_fmt(hi)})"


def _fmt_delta(iv: dict[str, Any] | None) -> str:
    if not iv or iv.get("value") is None:
        return "—"
    lo, hi = iv.get("low"), iv.get("high")
    text = f"{100 * iv['value']:+.1f}"
    return text if lo is None or hi is None else f"{text} ({100 * lo:+.1f} to {100 * hi:+.1f})"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy to lists, NaN / inf to None, sample arrays dropped."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def detection_analysis(
    gt: Any,
    detections: Any,
    result: dict[str, Any],
    *,
    compare: Any = None,
    n_resamples: int = 1000,
    seed: int = 0,
    score_threshold: float | None = None,
    froc_iou: float = 0.5,
    worst: int = 10,
    device: str | None = None,
) -> dict[str, Any]:
    """The analyses of one detection set (and its difference to ``compare``) from one matching each.

    Args:
        gt: COCO ground truth (dict or path), the one ``result`` was computed on.
        detections: the detections ``result`` evaluates.
        result: ``evaluate_coco(gt, detections, ...)`` (its tail set is used).
        compare: a second detection set on the same ground truth (paired bootstrap of the difference).
        n_resamples, seed: bootstrap resamples and seed.
        score_threshold: score from which a detection counts in per-image counts and the worst
            slices (default: the confusion matrix's, ``result["confusion_score"]``).
        froc_iou: IoU of the FROC (COCO grid).
        worst: how many slices to list.
        device: matching device.

    Returns:
        ``intervals`` (:func:`bootstrap_metrics`), ``tide``, ``froc``, ``per_image`` (counts),
        ``worst_slices``, ``colocation`` (GT box pairs of two classes at IoU ≥ 0.5, where TIDE
        calls a detection a classification error) and ``colocation_touching`` (IoU ≥ 0.1, where
        it calls it "both"), and ``difference`` when ``compare`` is given.
    """
    thr = result["confusion_score"] if score_threshold is None else score_threshold
    tail = list(result["tail_classes"])
    matching = match_detections(gt, detections, device=device)
    counts = per_image_counts(matching, iou=0.5, score_threshold=thr)
    out = {
        "intervals": bootstrap_metrics(None, matching, tail=tail, n_resamples=n_resamples, seed=seed, device=device),
        "tide": tide_errors(None, matching),
        "froc": froc_analysis(None, matching, iou=froc_iou),
        "per_image": counts,
        "worst_slices": worst_slices(counts, tail, top=worst),
        "colocation": colocation_table(matching.gt, iou=0.5),
        "colocation_touching": colocation_table(matching.gt, iou=0.1),
    }
    if compare is not None:
        other = match_detections(gt, compare, device=device)
        out["difference"] = bootstrap_difference(None, matching, other, tail=tail, n_resamples=n_resamples,
                                                 seed=seed, device=device)
    return out


def report_dict(result: dict[str, Any], *, title: str = "", compare: dict[str, Any] | None = None,
                compare_label: str = "baseline", analysis: dict[str, Any] | None = None,
                selection: str | None = None) -> dict[str, Any]:
    """The JSON-serialisable report: headline numbers, per-class rows, and every analysis given."""
    names = result["class_names"]
    ana = analysis or {}
    ivs = ana.get("intervals", {})
    ultra = result.get("ultralytics")
    froc = ana.get("froc")
    per_class = []
    for k, name in enumerate(names):
        row = {"class": name, "category_id": result["category_ids"][k], "num_gt": result["num_gt"][k],
               "ap": result["per_class_ap"][k], "ap50": result["per_class_ap50"][k],
               "ar100": result["per_class_ar100"][k], "tail": name in result["tail_classes"]}
        if ivs:
            row["ap_ci"] = [ivs["per_class"][name]["low"], ivs["per_class"][name]["high"]]
            row["ap50_ci"] = [ivs["per_class_ap50"][name]["low"], ivs["per_class_ap50"][name]["high"]]
        if ultra is not None and name in ultra.get("per_class", {}):
            row["ap_ultralytics"] = ultra["per_class"][name]
        if froc is not None:
            row["froc_sensitivity"] = dict(zip(map(str, froc["rates"]), froc["per_class"][name]["sensitivity"]))
        if compare is not None:
            row[f"ap_{compare_label}"] = compare["per_class_ap"][k]
        per_class.append(row)
    out = {
        "title": title,
        "selection": selection,
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
        "pr_curves": {"recall": result["rec_thrs"], "precision_iou50": result["pr_curves"]},
    }
    if ultra is not None:
        out["ultralytics"] = ultra
    if compare is not None:
        out["compare"] = {"label": compare_label, "map": compare["stats"][0], "map50": compare["stats"][1],
                          "map_tail": compare["map_tail"], "map50_tail": compare["map50_tail"],
                          "stats": dict(zip(STAT_NAMES, compare["stats"]))}
    for key in ("intervals", "tide", "froc", "worst_slices", "colocation", "colocation_touching", "difference"):
        if key in ana:
            out[key] = ana[key]
    if "per_image" in ana:
        out["per_image"] = {"file": "per_image.csv", "iou": ana["per_image"]["iou"],
                            "score_threshold": ana["per_image"]["score_threshold"]}
    return _clean(out)


def _headline(rep: dict[str, Any], label: str, compare_label: str) -> list[str]:
    cmp, ivs, ultra, diff = rep.get("compare"), rep.get("intervals"), rep.get("ultralytics"), rep.get("difference")
    head = f"| metric | {label}" + (" (95 % interval)" if ivs else "") + " |"
    sep = "|---|---:|"
    if ultra:
        head += f" {label}, Ultralytics flavour |"
        sep += "---:|"
    if cmp:
        head += f" {compare_label} | difference" + (" (95 % interval, paired)" if diff else "") + " |"
        sep += "---:|---:|"
    lines = [head, sep]
    ultra_tail: dict[str, float | None] = {}
    for key, per in (("map_tail", "per_class"), ("map50_tail", "per_class_ap50")):
        vals = [ultra[per][r["class"]] for r in rep["per_class"]
                if ultra and r["tail"] and r["num_gt"] > 0 and r["class"] in ultra.get(per, {})]
        ultra_tail[key] = float(np.mean(vals)) if vals else None
    for key, name, ukey in (("map", "mAP@[.5:.95]", "map"), ("map50", "mAP@.5", "map50"),
                            ("map_tail", "mAP_tail@[.5:.95]", None), ("map50_tail", "mAP_tail@.5", None)):
        row = f"| {name} | " + (_fmt_ci(ivs[key]) if ivs else _fmt(rep[key])) + " |"
        if ultra:
            uval = ultra.get(ukey) if ukey else ultra_tail[key]
            row += f" {_fmt(uval)} |"
        if cmp:
            if diff:
                delta = _fmt_delta(diff[key])
            else:
                d = rep[key] - cmp[key] if rep[key] is not None and cmp[key] is not None and rep[key] >= 0 \
                    and cmp[key] >= 0 else None
                delta = "—" if d is None else f"{100 * d:+.1f}"
            row += f" {_fmt(cmp[key])} | {delta} |"
        lines.append(row)
    return lines


def _markdown(rep: dict[str, Any], label: str, compare_label: str) -> str:
    ivs, ultra = rep.get("intervals"), rep.get("ultralytics")
    lines = [f"# {rep['title'] or 'Detection report'}", ""]
    if rep.get("selection"):
        lines += [f"**Model selection:** {rep['selection']}.", ""]
    lines += [f"{rep['num_images']} slices, {sum(r['num_gt'] for r in rep['per_class'])} annotated boxes, "
              f"{rep['num_detections']} detections"
              + (f" ({rep['dropped_detections']} dropped: unknown category)" if rep["dropped_detections"] else "")
              + ".", "", "## Summary", ""]
    lines += _headline(rep, label, compare_label)
    lines += ["", "All figures are percentages. AP (average precision) summarises the precision–recall curve: "
              "100 means every box found before any false alarm. @.5 counts a detection as correct when it "
              "overlaps a box by at least half (IoU ≥ 0.5); @[.5:.95] averages ten stricter overlap "
              "requirements (0.50 … 0.95)."]
    if ivs:
        lines.append(f"Intervals: {ivs['method']} ({ivs['n_resamples']} resamples, seed {ivs['seed']}); "
                     "they show how much the figure would move on another set of slices like these.")
    if ultra:
        lines.append("The Ultralytics flavour is the figure Ultralytics' validator (and papers using it) reports "
                     "for the same boxes: its own matching and a smoothed precision envelope; set papers' "
                     "numbers against that column.")
    lines += ["", f"Tail classes: {', '.join(rep['tail_classes'])} — {rep['tail_rule']}."]
    if rep["tail_excluded"]:
        lines.append(f"Excluded from mAP_tail (no ground truth in this split): {', '.join(rep['tail_excluded'])}.")
    lines += _per_class_md(rep, compare_label)
    if rep.get("froc"):
        lines += _froc_md(rep["froc"])
    if rep.get("tide"):
        lines += _tide_md(rep["tide"])
    if rep.get("colocation"):
        lines += _colocation_md(rep["colocation"], rep.get("colocation_touching"))
    lines += _confusion_md(rep)
    if "worst_slices" in rep:
        lines += _worst_md(rep)
    lines += ["", "## COCO summary (pycocotools-exact)", "", "```", *summary_lines(list(rep["stats"].values())),
              "```", ""]
    plots = ["pr_curves.png", "per_class_ap.png", "confusion.png"]
    if rep.get("tide"):
        plots.append("tide.png")
    if rep.get("froc"):
        plots.append("froc.png")
    lines.append("Files: " + ", ".join(f"`{p}`" for p in plots)
                 + (", `per_image.csv` (TP / FP / FN per slice and class)" if "per_image" in rep else "") + ".")
    return "\n".join(lines) + "\n"


def _per_class_md(rep: dict[str, Any], compare_label: str) -> list[str]:
    cmp, ivs, ultra, froc = rep.get("compare"), rep.get("intervals"), rep.get("ultralytics"), rep.get("froc")
    one = None
    if froc and 1.0 in froc["rates"]:
        one = str(1.0)
    hdr = "| class | boxes | AP@[.5:.95]" + (" (95 %)" if ivs else "") + " | AP@.5" + (" (95 %)" if ivs else "") + " |"
    sep = "|---|---:|---:|---:|"
    if ultra:
        hdr += " AP@[.5:.95] Ultralytics |"
        sep += "---:|"
    hdr += " AR@[.5:.95] |"
    sep += "---:|"
    if one:
        hdr += " sensitivity at 1 FP/slice |"
        sep += "---:|"
    diff = rep.get("difference")
    if cmp:
        hdr += f" AP ({compare_label}) |" + (" difference (95 %, paired) |" if diff else "")
        sep += "---:|" + ("---:|" if diff else "")
    lines = ["", "## Per class", "", hdr, sep]
    for row in rep["per_class"]:
        name = f"**{row['class']}** (tail)" if row["tail"] else row["class"]
        if ivs:
            ap = _fmt_ci(ivs["per_class"][row["class"]])
            ap50 = _fmt_ci(ivs["per_class_ap50"][row["class"]])
        else:
            ap, ap50 = _fmt(row["ap"]), _fmt(row["ap50"])
        line = f"| {name} | {row['num_gt']} | {ap} | {ap50} |"
        if ultra:
            line += f" {_fmt(row.get('ap_ultralytics'))} |"
        line += f" {_fmt(row['ar100'])} |"
        if one:
            line += f" {_fmt(row['froc_sensitivity'][one])} |"
        if cmp:
            line += f" {_fmt(row[f'ap_{compare_label}'])} |"
            if diff:
                line += f" {_fmt_delta(diff['per_class'][row['class']])} |"
        lines.append(line)
    lines += ["", "A class with few boxes has a wide interval: its AP rests on a handful of slices. "
              "AR@[.5:.95]: share of boxes found at all (up to 100 detections per slice and class), "
              "averaged over the ten overlap requirements."]
    return lines


def _froc_md(froc: dict[str, Any]) -> list[str]:
    rates = froc["rates"]
    label = {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}
    hdr = "| class | boxes | " + " | ".join(label.get(r, f"{r:g}") for r in rates) + " | mean |"
    lines = ["", f"## FROC: sensitivity at false positives per slice (IoU ≥ {froc['iou']:.2f})", "",
             "Share of boxes found (in %) when the score threshold is set so that at most the given number of "
             "false detections per slice is allowed (of that class; the last rows count all classes).", "",
             hdr, "|---|---:|" + "---:|" * (len(rates) + 1)]
    for name, c in froc["per_class"].items():
        lines.append(f"| {name} | {c['num_gt']} | " + " | ".join(_fmt(v) for v in c["sensitivity"])
                     + f" | {_fmt(c['cpm'])} |")
    lines.append("| mean over classes | | " + " | ".join(_fmt(v) for v in froc["mean"]["sensitivity"])
                 + f" | {_fmt(froc['mean']['cpm'])} |")
    lines.append(f"| all boxes pooled | {froc['pooled']['num_gt']} | "
                 + " | ".join(_fmt(v) for v in froc["pooled"]["sensitivity"]) + f" | {_fmt(froc['pooled']['cpm'])} |")
    return lines


def _tide_md(tide: dict[str, Any]) -> list[str]:
    lines = ["", f"## Why boxes are missed or false alarms raised (TIDE, IoU {tide['fg_iou']:.1f})", "",
             f"AP@.5 is {_fmt(tide['map'])}. Each row says how many AP points would be gained if only that kind "
             "of error were fixed, and how many such errors there are.", "",
             "| error | meaning | AP points gained | count |", "|---|---|---:|---:|"]
    for t in ERROR_TYPES:
        d = tide["delta_map"][t]
        lines.append(f"| {t} | {_ERROR_WORDS[t]} | {'—' if d is None else f'{100 * d:.1f}'} | {tide['counts'][t]} |")
    names = list(tide["per_class"])
    lines += ["", "Per class (AP points gained / count):", "",
              "| class | AP@.5 | " + " | ".join(ERROR_TYPES) + " |", "|---|---:|" + "---:|" * len(ERROR_TYPES)]
    for n in names:
        c = tide["per_class"][n]
        cells = []
        for t in ERROR_TYPES:
            d = c["delta"][t]
            cells.append("—" if d is None else f"{100 * d:.1f} / {c['counts'][t]}")
        lines.append(f"| {n} | {_fmt(c['ap'])} | " + " | ".join(cells) + " |")
    return lines


def _colocation_md(colo: dict[str, Any], touching: dict[str, Any] | None = None) -> list[str]:
    lines = ["", "## Classes labelled on the same structure (ground truth)", ""]
    pairs = {tuple(p["classes"]): [p["count"], 0, p["identical"]] for p in colo["pairs"]}
    for p in (touching or {}).get("pairs", []):
        pairs.setdefault(tuple(p["classes"]), [0, 0, p["identical"]])[1] = p["count"]
    if not pairs:
        return [*lines, "No two annotated boxes of one slice overlap."]
    lo = touching["iou"] if touching else None
    lines += ["Pairs of annotated boxes on one slice that overlap. A detection placed on such a pair overlaps "
              "the other class's box too, so where it is a false positive the error analysis may call it a "
              f"classification error (IoU ≥ {colo['iou']:.1f} with the other box)"
              + (f" or \"both\" ({lo:.1f}–{colo['iou']:.1f})" if lo is not None else "")
              + " rather than a duplicate or a misplaced box.", "",
              f"| classes | IoU ≥ {colo['iou']:.1f} |" + (f" IoU ≥ {lo:.1f} |" if lo is not None else "")
              + " identical boxes |", "|---|---:|" + ("---:|" if lo is not None else "") + "---:|"]
    for (a, b), (n_hi, n_lo, same) in sorted(pairs.items(), key=lambda kv: (-kv[1][0], -kv[1][1])):
        name = f"{a} + {b}" if a != b else f"{a} + {a} (same class)"
        lines.append(f"| {name} | {n_hi} |" + (f" {n_lo} |" if lo is not None else "") + f" {same} |")
    return lines


def _confusion_md(rep: dict[str, Any]) -> list[str]:
    conf = rep["confusion"]
    labels = conf["labels"]
    lines = ["", f"## Confusion matrix (IoU ≥ {conf['iou']}, score ≥ {conf['score']})", "",
             "Rows: annotated class (last row: detections on no box); columns: predicted class (last column: "
             "boxes no detection matched).", "",
             "| annotated \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, row in zip(labels, conf["matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _worst_md(rep: dict[str, Any]) -> list[str]:
    pi = rep.get("per_image", {})
    lines = ["", "## Slices with the most missed tail boxes", ""]
    if not rep["worst_slices"]:
        return [*lines, "No tail box is missed at this score threshold."]
    lines += [f"At IoU ≥ {pi.get('iou', 0.5):.2f} and score ≥ {pi.get('score_threshold', 0):g}.", "",
              "| slice | image id | tail boxes missed | tail boxes on the slice | missed, by class | "
              "false detections on the slice |",
              "|---|---:|---:|---:|---|---:|"]
    for w in rep["worst_slices"]:
        by = ", ".join(f"{k} {v}" for k, v in w["missed"].items())
        lines.append(f"| `{w['file_name']}` | {w['image_id']} | {w['missed_tail']} | {w['tail_gt']} | {by} | "
                     f"{w['false_positives']} |")
    return lines


def _save_fig(fig, path: Path) -> None:
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})  # no text chunk


def _plots(result: dict[str, Any], out: Path, compare: dict[str, Any] | None, label: str, compare_label: str,
           analysis: dict[str, Any] | None = None) -> None:
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
    yerr = None
    ivs = (analysis or {}).get("intervals")
    if ivs:
        lo = np.array([ivs["per_class"][n]["low"] for n in names], float)
        hi = np.array([ivs["per_class"][n]["high"] for n in names], float)
        ok = np.isfinite(lo) & np.isfinite(hi) & (np.asarray(result["per_class_ap"]) >= 0)
        yerr = np.where(ok, np.vstack([np.maximum(ap - lo, 0), np.maximum(hi - ap, 0)]), 0.0)
    ax.bar(x - (width / 2 if compare is not None else 0), ap, width, color=colours, label=label, yerr=yerr,
           capsize=3 if yerr is not None else 0)
    if compare is not None:
        ax.bar(x + width / 2, np.maximum(np.asarray(compare["per_class_ap"]), 0), width, color="#7f7f7f",
               label=compare_label)
        ax.legend(fontsize=8)
    ax.set_xticks(x, [f"{n}\n(tail)" if n in tail else n for n in names], fontsize=8)
    title = "Per-class AP (tail classes in red)" + (", 95 % bootstrap intervals" if yerr is not None else "")
    ax.set(ylabel="AP@[.5:.95]", ylim=(0, 1), title=title)
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

    if analysis and "tide" in analysis:
        _tide_plot(analysis["tide"], out, plt)
    if analysis and "froc" in analysis:
        _froc_plot(analysis["froc"], tail, out, plt)


def _tide_plot(tide: dict[str, Any], out: Path, plt) -> None:
    names = list(tide["per_class"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    overall = [100 * max(tide["delta_map"][t] or 0.0, 0.0) for t in ERROR_TYPES]
    colours = plt.get_cmap("tab10")(np.arange(len(ERROR_TYPES)))
    axes[0].barh(np.arange(len(ERROR_TYPES)), overall, color=colours)
    axes[0].set_yticks(np.arange(len(ERROR_TYPES)), ERROR_TYPES, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="AP@.5 points gained if fixed", title="All classes")
    x = np.arange(len(names))
    width = 0.8 / len(ERROR_TYPES)
    for i, t in enumerate(ERROR_TYPES):
        vals = [100 * max(tide["per_class"][n]["delta"][t] or 0.0, 0.0) for n in names]
        axes[1].bar(x + (i - (len(ERROR_TYPES) - 1) / 2) * width, vals, width, color=colours[i], label=t)
    axes[1].set_xticks(x, names, fontsize=8, rotation=20, ha="right")
    axes[1].set(ylabel="AP@.5 points gained", title="Per class")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    _save_fig(fig, out / "tide.png")
    plt.close(fig)


def _froc_plot(froc: dict[str, Any], tail: set[str], out: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rates = np.asarray(froc["rates"])
    for name, c in froc["per_class"].items():
        if not c["num_gt"]:
            continue
        f, s = np.asarray(c["curve"]["fppi"]), np.asarray(c["curve"]["sensitivity"])
        # the last operating point holds for any larger allowance: draw it to the right edge
        f, s = np.r_[f, max(f[-1], rates.max() * 1.5)], np.r_[s, s[-1]]
        ax.step(np.maximum(f, rates.min() / 2), s, where="post", lw=2.2 if name in tail else 1.2,
                ls="-" if name in tail else "--", label=f"{name}{' (tail)' if name in tail else ''}")
    ax.plot(rates, froc["mean"]["sensitivity"], "ko", ms=5, label="mean over classes")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, ["1/8", "1/4", "1/2", "1", "2", "4", "8"] if len(rates) == 7 and rates[0] == 0.125
                  else [f"{r:g}" for r in rates])
    ax.set(xlim=(rates.min() / 2, rates.max() * 1.5), ylim=(0, 1.02), xlabel="false positives per slice",
           ylabel="sensitivity", title=f"FROC @ IoU {froc['iou']:.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_fig(fig, out / "froc.png")
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, *, title: str = "", label: str = "this run",
                 compare: dict[str, Any] | None = None, compare_label: str = "baseline",
                 plots: bool = True, analysis: dict[str, Any] | None = None, selection: str | None = None) -> Path:
    """Write report.json, report.md, per_image.csv and the plots; return the folder.

    Args:
        result: ``evaluate_coco`` result of the reported detections.
        out_dir: report folder (created).
        title, label: report title and the run's column name.
        compare, compare_label: ``evaluate_coco`` result of a second run on the same GT, and its name.
        plots: write the PNG plots.
        analysis: :func:`detection_analysis` output (intervals, TIDE, FROC, per-image, ...).
        selection: what chose the model and what measures it, e.g. ``"selected on the val split;
            measured on the test split"`` — printed at the top.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report_dict(result, title=title, compare=compare, compare_label=compare_label, analysis=analysis,
                      selection=selection)
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", _markdown(rep, label, compare_label))
    if analysis and "per_image" in analysis:
        write_per_image_csv(out / "per_image.csv", analysis["per_image"])
    if plots:
        _plots(result, out, compare, label, compare_label, analysis)
    return out

