"""The stage plan, the run's data after selection and the config's paths: what every backend shares,
below the skeleton."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from welde_det.engine.config import ExperimentConfig

__all__ = ["KEPT_ANN_FIELDS", "KEPT_IMAGE_FIELDS", "PATH_KEYS", "RunData", "Stage", "map_paths", "plan_stages", "run_relative_paths", "selection_label",
           "working_paths"]

#: config fields holding paths (``data.source`` only when it is not ``"phantom"``)
PATH_KEYS: tuple[tuple[str, str], ...] = (("data", "source"), ("data", "cache_dir"), ("model", "weights"),
                                         ("", "output"))

#: the image / annotation fields a pseudonymised copy of a user's COCO keeps (technical ones only):
#: the run's private view (``engine.run.private_image_view``) and ``tools/evaluate.py --weights``
KEPT_IMAGE_FIELDS = ("id", "width", "height", "pixel_spacing", "slice_index", "slice_axis", "world_x")
KEPT_ANN_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")


@dataclass(frozen=True)
class Stage:
    """One stage of the plan.

    Attributes:
        name: ``"train"`` (one ordinary stage), ``"stage1"`` or ``"stage2"``; also the
            stage's sub-folder.
        components: registry names of the heads trained in this stage.
        mode: ``"single"``, ``"ce_ensemble"`` or ``"welde"``.
        epochs: epochs of this stage.
        frozen: only adapters, heads and θ train (backbone, neck, box branch / RPN and box
            head fixed, BatchNorm statistics included) — the same meaning in every backend.
        epoch_offset: global index of this stage's first epoch (DRW switches on globally).
    """

    name: str
    components: tuple[str, ...]
    mode: str
    epochs: int
    frozen: bool
    epoch_offset: int = 0


def plan_stages(cfg: ExperimentConfig) -> list[Stage]:
    """The stages of a run; the one place that says what "frozen" means.

    - ``single`` loss: ``stage1_epochs + epochs`` ordinary epochs; with
      ``train.freeze_backbone`` the first ``stage1_epochs`` train everything and the last
      ``epochs`` are frozen (``stage1_epochs=0``: frozen throughout, from ``model.weights``).
    - ``welde`` / ``ce_ensemble``: ``stage1_epochs`` of ordinary one-head ``ce`` training
      (skipped at 0: start from ``model.weights``), then ``epochs`` frozen with the K heads.
    """
    t = cfg.train
    comps = tuple(cfg.components)
    if cfg.loss.mode == "single":
        if not t.freeze_backbone:
            return [Stage("train", comps, "single", t.stage1_epochs + t.epochs, False)]
        plan = [Stage("stage1", comps, "single", t.stage1_epochs, False)] if t.stage1_epochs else []
        return [*plan, Stage("stage2", comps, "single", t.epochs, True, t.stage1_epochs)]
    plan = [Stage("stage1", ("ce",), "single", t.stage1_epochs, False)] if t.stage1_epochs else []
    return [*plan, Stage("stage2", comps, cfg.loss.mode, t.epochs, True, t.stage1_epochs)]


@dataclass(frozen=True)
class RunData:
    """The data of a run after resolution and the selection carve.

    Attributes:
        splits: COCO ground truth per split (``train`` is the part trained on).
        image_roots: image folder per split.
        names: class names in class-index order.
        measure: the split measured in the report.
        select: the split that chooses the epoch, or None (``train.select=last``).
        selection: the human-readable rule, "the last epoch (fixed schedule)" or "…".
        resolved: the backend-independent :class:`~welde_det.datasets.resolve.ResolvedData`.
    """

    splits: dict[str, Path]
    image_roots: dict[str, Path]
    names: tuple[str, ...]
    measure: str
    select: str | None
    selection: str
    resolved: Any = None


def selection_label(select: str | None, fraction: float | None = None) -> str:
    """The words a report uses for what chose the model."""
    if select is None:
        return "the last epoch of a fixed schedule (nothing measured chose it)"
    if select == "holdout":
        return f"best mAP on a holdout carved from train ({100 * (fraction or 0):.0f} %, patients kept whole)"
    return f"best mAP on the {select} split"


# ----------------------------------------------------------------------------- config paths
def map_paths(cfg: ExperimentConfig, fn: Any) -> ExperimentConfig:
    """``cfg`` with ``fn(path) -> str`` applied to every path field in use.

    ``data.source`` ``"phantom"`` is a name, not a path; ``data.cache_dir`` is a path only
    for the phantom (left as it is otherwise: a key a backend does not read keeps its value).
    """
    from welde_det.engine.config import replace_section

    phantom = str(cfg.data.source) == "phantom"
    for section, name in PATH_KEYS:
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, name)
        if value is None or ((section, name) == ("data", "source") and phantom) or \
                ((section, name) == ("data", "cache_dir") and not phantom):
            continue
        new = fn(str(value))
        if new != value:
            cfg = replace_section(cfg, section, **{name: new}) if section else dataclasses.replace(cfg, **{name: new})
    return cfg


def working_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Absolute path fields made relative to the working folder (relative ones stay as given).

    The config a run carries into its checkpoints and reports then holds no absolute path
    (a user's folder names can name a patient or a person).
    """
    return map_paths(cfg, lambda p: os.path.relpath(p) if os.path.isabs(p) else p)


def run_relative_paths(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """Path fields relative to the run folder (what ``config.yaml`` stores, so a resume works from anywhere)."""
    base = Path(run_dir).absolute()
    return map_paths(cfg, lambda p: os.path.relpath(os.path.abspath(p), base))
