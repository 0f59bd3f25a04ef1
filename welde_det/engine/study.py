"""The multi-seed comparison study: stage 1, then every method's frozen stage, over N seeds, with intervals.

One study (``tools/study.py --config configs/study_<name>.yaml [key=value ...]``, or
:func:`run_study`) trains, through the one pipeline (:func:`~welde_det.engine.run.run_training`
with the per-method config ``<configs>/<framework>_<method>.yaml`` and overrides):

1. **stage 1**: plain CE, the full network (``<framework>_ce.yaml``, ``stage1_epochs`` epochs);
2. **the frozen stage** of every method in ``methods`` — single heads ``ce``, ``focal``, ``cb``,
   ``ldam``, ``lmf`` (``train.freeze_backbone=true``), the architecture-matched ``ce_ensemble``
   control and ``welde`` — each starting from the stage-1 checkpoint (``model.weights``,
   ``stage1_epochs=0``), ``epochs`` epochs, ``train.cache_frozen`` when the study says so;
3. optionally (``end_to_end: [ce, focal, ...]``) single-loss runs trained end to end for the same
   total schedule (``stage1_epochs + epochs`` ordinary epochs);

each for every seed (``train.seed``; the data, its split and the phantom stay fixed by
``data.seed``). Every run is measured by the pipeline on ``train.measure`` with the model chosen by
``train.select`` (never the measured split: the pipeline refuses it).

What the intervals cover (``stage1``):

- ``shared``: one stage 1 (seed = the first seed); the seeds vary the frozen stage only, so
  every interval covers frozen-stage variance (and the images), not stage 1's.
- ``per_seed``: stage 1 is trained again for every seed and each seed's frozen stages start from
  their own; the intervals cover the whole training.

Aggregates (:func:`aggregate`): per method and metric the mean over seeds, the sample standard
deviation (ddof = 1) and a 95 % t-interval over seeds, ``mean ± t(0.975, n − 1)·std/√n``
(``scipy.stats.t``); with one seed std and interval are ``null``.

Paired differences (:func:`paired_differences`, :func:`combine_paired`): WELDE − ``ce_ensemble``,
WELDE − ``ce`` and WELDE − the best single loss (the single frozen head with the highest mean
mAP_tail — chosen on the measured split, which favours the baseline). Per seed, the two runs'
detections on the same ground truth go through :func:`~welde_det.evaluation.intervals.bootstrap_difference`
with the *same* bootstrap seed in every study seed, so replicate ``b`` resamples the same images
for every seed and both methods (every run is measured on the same split). Combined over seeds
by a two-level bootstrap: the point value is the mean over seeds of the full-set differences;
replicate ``b`` draws ``n`` seeds with replacement (seeded) and averages their replicate-``b``
differences; the interval is the 2.5 / 97.5 % percentiles of those replicates (replicates where
the metric is undefined — no tail box drawn — are left out and their share reported). The
interval thus covers the resampling of images and of seeds.

Resuming: the study folder holds ``study_state.json`` (settings and every finished run). Run the
same command again and the study continues: finished runs are kept (not retrained, not
re-evaluated); a run folder left half-finished by a kill is **continued through the pipeline's
own resume** (``run_training(resume=run_dir)``: finished stages kept, a stage continues from its
``last.pt``); a run folder without ``config.yaml`` (killed before training began) is removed
and the run starts again. Settings that change what a run trains (schedule, overrides,
framework, stage 1 mode, cache) cannot change on a resume (a :class:`ConfigError` names them);
``seeds``, ``methods`` and ``end_to_end`` may grow.

Outputs in the study folder: ``study.json``, ``study.md``, ``per_class_ap.png``,
``welde_terms.png`` (WELDE's learned weights and JS diversity per frozen-stage epoch, read from
the runs' ``terms.csv``) and ``runs/<method>/seed<k>/<run folder>``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from welde_det.engine.config import ConfigError

__all__ = [
    "METHODS",
    "METRICS",
    "SINGLE_METHODS",
    "PlannedRun",
    "StudyConfig",
    "aggregate",
    "combine_paired",
    "load_study_config",
    "paired_differences",
    "plan_runs",
    "run_study",
    "study_summary",
]

logger = logging.getLogger(__name__)

#: the frozen-stage methods a study can compare, in table order
METHODS: tuple[str, ...] = ("ce", "focal", "cb", "ldam", "lmf", "ce_ensemble", "welde")
#: the single-loss heads among them (candidates for "the best single loss" and for ``end_to_end``)
SINGLE_METHODS: tuple[str, ...] = ("ce", "focal", "cb", "ldam", "lmf")
#: the headline metrics aggregated over seeds
METRICS: tuple[str, ...] = ("map", "map50", "map_tail", "map50_tail")
STAGE1_MODES = ("shared", "per_seed")
FRAMEWORKS = ("yolo", "rcnn")
STATE = "study_state.json"
#: run config keys the study sets itself (an override of one is refused, naming the study key to use)
STUDY_SET_KEYS: dict[str, str] = {
    "train.epochs": "epochs", "train.stage1_epochs": "stage1_epochs", "train.seed": "seeds",
    "train.freeze_backbone": "(set per method by the study)", "model.weights": "(the stage-1 checkpoint)",
    "output": "out", "name": "(the per-method config's name)", "loss.mode": "methods", "loss.name": "methods",
    "loss.components": "methods (or the per-method config)", "model.framework": "framework",
    "train.cache_frozen": "cache_frozen", "train.cache_views": "cache_views", "task": "(detection)",
}
#: settings a resume may not change (they decide what every run trains)
FIXED_ON_RESUME = ("framework", "stage1", "stage1_epochs", "epochs", "cache_frozen", "cache_views",
                   "overrides", "stage1_overrides", "frozen_overrides", "stage1_seed", "run_configs")


@dataclass(frozen=True)
class StudyConfig:
    """A study, as :func:`load_study_config` reads it.

    Attributes:
        name: the study's name (titles; default folder ``runs/<name>``).
        framework: ``"yolo"`` or ``"rcnn"``; selects ``<configs>/<framework>_<method>.yaml``.
        configs: folder of the per-method configs (default: the study file's folder).
        methods: frozen-stage methods (:data:`METHODS`), in any order, no repeats.
        seeds: the training seeds (``seeds: N`` in the file means 0 … N − 1).
        stage1: ``"shared"`` or ``"per_seed"`` (see the module docstring: what the intervals cover).
        stage1_epochs: epochs of stage 1 (plain CE, full network).
        epochs: epochs of every frozen stage.
        end_to_end: single losses also trained end to end for ``stage1_epochs + epochs`` epochs.
        cache_frozen: ``train.cache_frozen=true`` for every frozen stage (:mod:`welde_det.engine.cache`).
        cache_views: ``train.cache_views`` of the frozen stages (with ``cache_frozen``).
        n_resamples: bootstrap replicates of the paired differences.
        bootstrap_seed: seed of the image and seed resampling.
        out: the study folder.
        overrides: ``key=value`` for every run (as ``tools/train.py``).
        stage1_overrides: ``key=value`` for stage 1 and the end-to-end runs only (``model.weights`` allowed
            here: start stage 1 from local weights).
        frozen_overrides: ``key=value`` for the frozen stages only.
        source: the file it came from (messages).
    """

    name: str
    framework: str = "yolo"
    configs: str = "configs"
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    stage1: str = "shared"
    stage1_epochs: int = 30
    epochs: int = 10
    end_to_end: tuple[str, ...] = ()
    cache_frozen: bool = False
    cache_views: int = 0
    n_resamples: int = 1000
    bootstrap_seed: int = 0
    out: str = ""
    overrides: tuple[str, ...] = ()
    stage1_overrides: tuple[str, ...] = ()
    frozen_overrides: tuple[str, ...] = ()
    source: str = "<study>"

    @property
    def stage1_seed(self) -> int | None:
        """The seed of the shared stage 1 (the first seed), None for ``per_seed``."""
        return self.seeds[0] if self.stage1 == "shared" else None

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resume must keep (:data:`FIXED_ON_RESUME`); ``run_configs`` holds a SHA-256 of each
        per-method config as resolved (its content, not its path: the study may be continued from another
        working folder)."""
        import hashlib

        from welde_det.engine.config import config_to_dict, load_config

        out: dict[str, Any] = {}
        for k in FIXED_ON_RESUME:
            if k == "run_configs":
                out[k] = {m: hashlib.sha256(json.dumps(config_to_dict(load_config(_method_config(self, m))),
                                                       sort_keys=True).encode()).hexdigest()[:16]
                          for m in sorted({"ce", *self.methods, *self.end_to_end})}
            else:
                out[k] = list(v) if isinstance(v := getattr(self, k), tuple) else v
        return out


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the study.

    Attributes:
        key: ``"<method>/seed<k>"`` (``stage1/seed<k>``, ``e2e_<loss>/seed<k>``): the run's place
            under ``runs/`` and its key in ``study_state.json``.
        kind: ``"stage1"``, ``"frozen"`` or ``"end_to_end"``.
        method: ``"stage1"``, a :data:`METHODS` name or ``"e2e_<loss>"``.
        seed: ``train.seed``.
        config: the per-method config file.
        overrides: the run's overrides (without ``model.weights``, added from ``stage1`` at run time).
        stage1: the key of the stage-1 run a frozen stage starts from.
    """

    key: str
    kind: str
    method: str
    seed: int
    config: Path
    overrides: tuple[str, ...]
    stage1: str | None = None


# ----------------------------------------------------------------------------- configuration
_FIELDS = {f.name for f in dataclasses.fields(StudyConfig)} - {"source"}


def _as_overrides(value: Any, key: str, source: str) -> tuple[str, ...]:
    """A mapping (nested sections flattened: ``{train: {lr: 0.01}}`` -> ``train.lr=0.01``) or a list of
    ``key=value`` strings, as override strings."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str) or "=" not in v]
        if bad:
            raise ConfigError(f"{source}: {key} must be a mapping or a list of key=value strings, got {bad[0]!r}")
        return tuple(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key} must be a mapping (e.g. {{imgsz: 256}}), got {value!r}")
    out: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")

    walk(value, "")
    return tuple(out)


def _int(value: Any, key: str, source: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _names(value: Any, key: str, source: str, allowed: Sequence[str], *, empty: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or (not value and not empty):
        raise ConfigError(f"{source}: {key} must be a {'' if empty else 'non-empty '}list of {list(allowed)}, "
                          f"got {value!r}")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ConfigError(f"{source}: {key}: unknown method {unknown[0]!r}; choose from {list(allowed)}")
    repeated = sorted({v for v in value if list(value).count(v) > 1})
    if repeated:
        raise ConfigError(f"{source}: {key}: {repeated[0]!r} is listed twice")
    return tuple(value)


def _seeds(value: Any, source: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{source}: seeds must be a number of seeds >= 1 (or a list of seeds), got {value!r}")
        return tuple(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                          for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{source}: seeds {list(value)} repeat a seed")
        return tuple(value)
    raise ConfigError(f"{source}: seeds must be a number of seeds >= 1 or a non-empty list of seeds >= 0, "
                      f"got {value!r}")


def _study_from_dict(data: dict[str, Any], source: str, folder: Path) -> StudyConfig:
    from welde_det.engine.config import _did_you_mean

    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown study key {key!r}{_did_you_mean(key, _FIELDS)}")
    name = str(data.get("name") or Path(source).stem)
    framework = data.get("framework", "yolo")
    if framework not in FRAMEWORKS:
        raise ConfigError(f"{source}: framework must be one of {list(FRAMEWORKS)}, got {framework!r}")
    stage1 = data.get("stage1", "shared")
    if stage1 not in STAGE1_MODES:
        raise ConfigError(f"{source}: stage1 must be 'shared' (one stage 1; intervals cover the frozen stage) or "
                          f"'per_seed' (stage 1 per seed; intervals cover the whole training), got {stage1!r}")
    cache_frozen = data.get("cache_frozen", False)
    if not isinstance(cache_frozen, bool):
        raise ConfigError(f"{source}: cache_frozen must be true or false, got {cache_frozen!r}")
    configs = Path(str(data.get("configs", ".")))
    configs = configs if configs.is_absolute() else folder / configs
    cache_views = _int(data.get("cache_views", 0), "cache_views", source, 0)
    if cache_views and not cache_frozen:
        raise ConfigError(f"{source}: cache_views={cache_views} needs cache_frozen: true")
    return StudyConfig(
        name=name, framework=framework, configs=os.path.normpath(configs),
        methods=_names(data.get("methods", list(METHODS)), "methods", source, METHODS, empty=False),
        seeds=_seeds(data.get("seeds", 5), source), stage1=stage1,
        stage1_epochs=_int(data.get("stage1_epochs", 30), "stage1_epochs", source, 1),
        epochs=_int(data.get("epochs", 10), "epochs", source, 1),
        end_to_end=_names(data.get("end_to_end") or [], "end_to_end", source, SINGLE_METHODS, empty=True),
        cache_frozen=cache_frozen, cache_views=cache_views,
        n_resamples=_int(data.get("n_resamples", 1000), "n_resamples", source, 1),
        bootstrap_seed=_int(data.get("bootstrap_seed", 0), "bootstrap_seed", source, 0),
        out=str(data.get("out") or Path("runs") / name),
        overrides=_as_overrides(data.get("overrides"), "overrides", source),
        stage1_overrides=_as_overrides(data.get("stage1_overrides"), "stage1_overrides", source),
        frozen_overrides=_as_overrides(data.get("frozen_overrides"), "frozen_overrides", source),
        source=source)


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """Command-line ``key=value``: study keys, then run overrides for all runs / stage 1 / frozen stages.

    ``stage1.<key>=v`` goes to stage 1 (and the end-to-end runs), ``frozen.<key>=v`` to the frozen
    stages; any other key that is not a study key goes to every run.
    """
    study: dict[str, Any] = {}
    every, first, frozen = [], [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. seeds=2 or imgsz=256)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in _FIELDS and key not in ("overrides", "stage1_overrides", "frozen_overrides"):
            try:
                study[key] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it or fix the brackets") \
                    from None
        elif key.startswith("stage1."):
            first.append(item.split(".", 1)[1])
        elif key.startswith("frozen."):
            frozen.append(item.split(".", 1)[1])
        else:
            every.append(item)
    return study, every, first, frozen


def load_study_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study YAML (``base:`` chains allowed, as run configs) and apply ``key=value`` overrides.

    Overrides are study keys (``seeds=2``, ``methods=[ce,welde]``, ``stage1=per_seed``, ``epochs=1``,
    ``stage1_epochs=1``, ``out=DIR``, ...), ``stage1.<key>=v`` / ``frozen.<key>=v`` for one kind of
    run, or any run config key (``imgsz=64``, ``n_images=6``, ``train.lr=0.005``) for every run.
    Every run's config is built and checked by its backend here, before anything is written.

    Raises:
        ConfigError: an unknown or bad study key (named), an unknown method, a run override the
            study sets itself, or a run config its backend refuses (named with the method).
    """
    from welde_det.engine.config import _read_yaml_with_base

    path = Path(path)
    data = _read_yaml_with_base(path)
    study_kv, every, first, frozen = _split_overrides(overrides)
    data = {**data, **study_kv}
    for key, extra in (("overrides", every), ("stage1_overrides", first), ("frozen_overrides", frozen)):
        if extra:
            data[key] = [*_as_overrides(data.get(key), key, str(path)), *extra]
    study = _study_from_dict(data, str(path), path.parent)
    _check_runs(study)
    return study


def _method_config(study: StudyConfig, method: str) -> Path:
    path = Path(study.configs) / f"{study.framework}_{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"{study.source}: method {method!r} needs the run config {path} (configs/"
                          f"<framework>_<method>.yaml); it is not there — set configs: to the folder that holds it")
    return path


def plan_runs(study: StudyConfig) -> list[PlannedRun]:
    """Every run of the study in training order: stage 1 (per seed or once), then per seed the frozen
    stages of ``methods`` and the ``end_to_end`` runs."""
    common = [*study.overrides]
    runs: list[PlannedRun] = []
    fw = study.framework

    def stage1_run(seed: int) -> PlannedRun:
        return PlannedRun(f"stage1/seed{seed}", "stage1", "stage1", seed, _method_config(study, "ce"), (
            *common, *study.stage1_overrides, f"name={fw}_stage1_ce", "train.freeze_backbone=false",
            "train.stage1_epochs=0", f"train.epochs={study.stage1_epochs}", f"train.seed={seed}"))

    if study.stage1 == "shared":
        runs.append(stage1_run(study.seeds[0]))
    cache = ["train.cache_frozen=true", f"train.cache_views={study.cache_views}"] if study.cache_frozen else []
    for seed in study.seeds:
        s1 = f"stage1/seed{study.seeds[0] if study.stage1 == 'shared' else seed}"
        if study.stage1 == "per_seed":
            runs.append(stage1_run(seed))
        for method in (m for m in METHODS if m in study.methods):
            freeze = ["train.freeze_backbone=true"] if method in SINGLE_METHODS else []
            runs.append(PlannedRun(f"{method}/seed{seed}", "frozen", method, seed, _method_config(study, method), (
                *common, *study.frozen_overrides, *freeze, *cache, "train.stage1_epochs=0",
                f"train.epochs={study.epochs}", f"train.seed={seed}"), stage1=s1))
        for loss in (m for m in SINGLE_METHODS if m in study.end_to_end):
            runs.append(PlannedRun(f"e2e_{loss}/seed{seed}", "end_to_end", f"e2e_{loss}", seed,
                                   _method_config(study, loss), (
                                       *common, *study.stage1_overrides, f"name={fw}_{loss}_e2e",
                                       "train.freeze_backbone=false", f"train.stage1_epochs={study.stage1_epochs}",
                                       f"train.epochs={study.epochs}", f"train.seed={seed}")))
    return runs


def _check_runs(study: StudyConfig) -> None:
    """Build every distinct run config and let its backend check it (nothing is written)."""
    from welde_det.engine.backends import get_backend
    from welde_det.engine.config import _field_paths, _resolve_key, load_config
    from welde_det.engine.run import check_unused_keys

    paths = _field_paths()
    for section, items in (("overrides", study.overrides), ("stage1_overrides", study.stage1_overrides),
                           ("frozen_overrides", study.frozen_overrides)):
        for item in items:
            key = item.split("=", 1)[0].strip()
            try:
                full = _resolve_key(key, paths)
            except ConfigError as exc:
                raise ConfigError(f"{study.source}: {section}: {exc}") from None
            if section == "stage1_overrides" and full == "model.weights":
                continue  # stage 1 (and the end-to-end runs) may start from local weights, e.g. COCO-pretrained
            if full in STUDY_SET_KEYS or full.startswith("loss.components"):
                raise ConfigError(f"{study.source}: {section}: {key!r} is set by the study for every run; use the "
                                  f"study key {STUDY_SET_KEYS.get(full, 'methods')} instead")
    seen: set[tuple[str, str]] = set()
    measured: dict[str, str] = {}
    for run in plan_runs(study):
        if (run.kind, run.method) in seen:
            continue
        seen.add((run.kind, run.method))
        where = f"{study.source}: {run.method} ({run.config.name})"
        try:
            cfg = load_config(run.config, list(run.overrides))
            backend = get_backend(cfg)
            backend.check(cfg)
            check_unused_keys(cfg, backend.framework, backend.unused_keys(cfg))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if cfg.model.framework != study.framework:
            raise ConfigError(f"{where}: model.framework={cfg.model.framework!r}, but the study's framework is "
                              f"{study.framework!r}")
        measured[run.method] = cfg.train.measure
    if len(set(measured.values())) > 1:
        raise ConfigError(f"{study.source}: the runs measure different splits ({measured}); every run of a study "
                          "must be measured on the same split (set train.measure in overrides)")


# ----------------------------------------------------------------------------- statistics
def _t_quantile(q: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, dof))


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def aggregate(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof = 1) and the t-interval over seeds of one metric.

    ``ci95 = mean ± t((1 + confidence) / 2, n − 1) · std / √n`` (Student's t, ``scipy.stats.t``).
    Values that are None or NaN (a class without ground truth) are left out; with fewer than two
    values ``std`` and ``ci95`` are None (one seed says nothing about the spread).

    Returns:
        ``{"mean", "std", "ci95": [lo, hi], "n"}``.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = float(x.std(ddof=1))
    half = _t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def combine_paired(point: Sequence[float], replicates: np.ndarray, seed_draws: np.ndarray | None,
                   confidence: float = 0.95) -> dict[str, Any]:
    """Combine per-seed paired bootstrap differences into one interval (the two-level bootstrap).

    Args:
        point: (n,) the full-set difference A − B of each seed.
        replicates: (n, B) the per-seed bootstrap differences; column ``b`` of every row used the same
            resampled images.
        seed_draws: (B, n) seed indices drawn with replacement for each replicate, or None to keep
            every seed once (then only the images are resampled).
        confidence: interval coverage.

    Returns:
        ``value`` (mean of ``point``), ``ci95`` ``[lo, hi]`` (percentiles, linear, of the replicates
        ``mean_j replicates[seed_draws[b, j], b]``, undefined ones left out), ``undefined`` (their
        share), ``per_seed`` (``point``) and ``positive_seeds`` (seeds with A − B > 0).
    """
    p = np.asarray(point, dtype=np.float64)
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != len(p):
        raise ValueError(f"replicates must be (n_seeds, B) = ({len(p)}, B), got {r.shape}")
    if seed_draws is None:
        boot = r.mean(axis=0)
    else:
        d = np.asarray(seed_draws)
        if d.shape != (r.shape[1], len(p)):
            raise ValueError(f"seed_draws must be (B, n_seeds) = ({r.shape[1]}, {len(p)}), got {d.shape}")
        boot = r[d, np.arange(r.shape[1])[:, None]].mean(axis=1)
    ok = ~np.isnan(boot)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    ci = np.quantile(boot[ok], [lo_q, hi_q]).tolist() if ok.any() else None
    value = float(p.mean()) if len(p) and not np.isnan(p).any() else None
    return {"value": value, "ci95": ci, "undefined": float(1 - ok.mean()) if len(boot) else 0.0,
            "per_seed": [_finite_or_none(v) for v in p.tolist()],
            "positive_seeds": int((p > 0).sum())}


def paired_differences(pairs: Sequence[tuple[Path, Path]], *, n_resamples: int, seed: int,
                       metrics: Sequence[str] = METRICS, device: str | None = "cpu") -> dict[str, Any]:
    """WELDE − other over seeds: ``pairs`` is one ``(run_a, run_b)`` per seed (run folders).

    Per seed, :func:`~welde_det.evaluation.intervals.bootstrap_difference` on run A's
    ``ground_truth.json`` (which must equal run B's: the same split), the two runs'
    ``detections.json``, run A's training ``class_stats.json`` (the tail), ``n_resamples`` replicates
    and the same bootstrap ``seed`` in every study seed; then :func:`combine_paired` with the seeds
    drawn with replacement per replicate (``numpy.random.default_rng(seed + 1)``).
    """
    from welde_det.classes import ClassStats
    from welde_det.evaluation.intervals import bootstrap_difference

    points: dict[str, list[float]] = {m: [] for m in metrics}
    reps: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for run_a, run_b in pairs:
        gt_a, gt_b = (json.loads((r / "ground_truth.json").read_text()) for r in (run_a, run_b))
        if gt_a != gt_b:
            raise ConfigError(f"{run_a} and {run_b} were measured on different ground truth; a paired difference "
                              "needs the same split (were the data or train.measure changed within the study?)")
        res = bootstrap_difference(gt_a, run_a / "detections.json", run_b / "detections.json",
                                   class_stats=ClassStats.load(run_a / "class_stats.json"), n_resamples=n_resamples,
                                   seed=seed, device=device)
        for m in metrics:
            points[m].append(res[m]["value"])
            reps[m].append(np.asarray(res["samples"][m], dtype=np.float64))
    draws = np.random.default_rng(seed + 1).integers(0, len(pairs), size=(n_resamples, len(pairs)))
    return {m: combine_paired(points[m], np.stack(reps[m]), draws) for m in metrics}


# ----------------------------------------------------------------------------- running
def _load_state(study: StudyConfig, folder: Path) -> dict[str, Any]:
    from welde_det.utils.fileio import load_json

    path = folder / STATE
    fresh = {"version": 1, "name": study.name, "settings": study.fingerprint(), "runs": {}}
    if not path.is_file():
        return fresh
    state = load_json(path)
    old_settings = state.get("settings", {})
    changed = [k for k in FIXED_ON_RESUME if k != "run_configs" and old_settings.get(k) != fresh["settings"][k]]
    # a per-method config may not change under finished runs; a method added since has no entry yet
    changed += [f"run config of {m}" for m, h in fresh["settings"]["run_configs"].items()
                if old_settings.get("run_configs", {}).get(m, h) != h]
    if changed:
        detail = "; ".join(f"{k}: {old_settings.get(k)!r} -> {fresh['settings'][k]!r}" if k in fresh["settings"]
                           else f"{k} ({_method_config(study, k.rsplit(' ', 1)[-1]).name}) was edited" for k in changed)
        raise ConfigError(f"{folder} holds a study with other settings ({detail}); a resumed study may only add "
                          "seeds, methods or end_to_end runs. Give another out=DIR for a new study")
    state["settings"]["run_configs"] = {**old_settings.get("run_configs", {}), **fresh["settings"]["run_configs"]}
    return state


def _read_run(run_dir: Path) -> dict[str, Any]:
    rep = json.loads((run_dir / "report.json").read_text())
    return {**{m: rep[m] for m in METRICS},
            "per_class": {row["class"]: (row["ap"] if row.get("num_gt", 1) > 0 and row["ap"] >= 0 else None)
                          for row in rep["per_class"]},
            "num_gt": {row["class"]: row.get("num_gt") for row in rep["per_class"]},
            "tail_classes": rep.get("tail_classes", []), "selection": rep.get("selection"),
            "num_images": rep.get("num_images")}


def _half_finished(parent: Path) -> Path | None:
    """The run folder a killed run left under ``parent``: continued if it has ``config.yaml``, else removed."""
    if not parent.is_dir():
        return None
    found = None
    for child in sorted(p for p in parent.iterdir() if p.is_dir()):
        if (child / "config.yaml").is_file():
            found = child  # the newest (names end in the start time)
        else:
            logger.info("removing %s: its run stopped before its config was written", child)
            shutil.rmtree(child)
    return found


def _train_one(study: StudyConfig, folder: Path, run: PlannedRun, state: dict[str, Any]) -> Path:
    from welde_det.engine.run import run_training

    parent = folder / "runs" / run.key
    leftover = _half_finished(parent)
    if leftover is not None:
        logger.info("%s: continuing the half-finished run %s", run.key, leftover)
        return Path(run_training(resume=leftover))
    overrides = [*run.overrides, f"output={parent}"]
    if run.stage1 is not None:
        s1 = state["runs"].get(run.stage1)
        if s1 is None:
            raise RuntimeError(f"{run.key}: stage 1 {run.stage1} has not finished")  # plan order guarantees it
        overrides.append(f"model.weights={(folder / s1['run_dir'] / 'weights' / 'model.pt').absolute()}")
    return Path(run_training(run.config, overrides))


def run_study(study: StudyConfig, *, on_run_finished: Callable[[PlannedRun, dict[str, Any]], None] | None = None
              ) -> Path:
    """Run (or continue) a study and write its outputs; return the study folder.

    Args:
        study: from :func:`load_study_config`.
        on_run_finished: called after each newly finished run is recorded in ``study_state.json``
            (its plan entry and its record).

    Each finished run prints one line (method, seed, mAP, mAP_tail, run folder relative to the study
    folder, seconds); one progress bar covers the whole study (shown when
    :func:`~welde_det.utils.logging.progress_enabled` and the terminal allow). One process at a time
    works in a study folder: a second gets :class:`~welde_det.utils.locking.OutputLockedError` naming
    the first (``<out>.lock`` beside the folder, released however the holder ends).
    """
    from welde_det.utils.locking import output_lock

    folder = Path(study.out)
    with output_lock(folder, what="study"):  # one study process per folder (OutputLockedError names the other)
        return _run_locked(study, folder, on_run_finished)


def _run_locked(study: StudyConfig, folder: Path,
                on_run_finished: Callable[[PlannedRun, dict[str, Any]], None] | None) -> Path:
    from tqdm import tqdm

    from welde_det.utils.fileio import atomic_write_json
    from welde_det.utils.logging import progress_enabled

    plan = plan_runs(study)
    state = _load_state(study, folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / STATE, state)  # the settings are fixed from the first run on, even a killed one
    done = {r.key for r in plan if r.key in state["runs"] and (folder / state["runs"][r.key]["run_dir"]).is_dir()}
    if done:
        print(f"{folder}: {len(done)} of {len(plan)} runs already finished" +
              ("; continuing with the others" if len(done) < len(plan) else "; writing the results"), flush=True)
    t0 = time.time()
    bar = tqdm(total=len(plan), initial=len(done), desc=study.name, unit="run",
               disable=None if progress_enabled() else True, file=sys.stderr)
    try:
        for i, run in enumerate(plan, 1):
            if run.key in done:
                continue
            start = time.time()
            run_dir = _train_one(study, folder, run, state)
            record = {"key": run.key, "kind": run.kind, "method": run.method, "seed": run.seed,
                      "run_dir": os.path.relpath(run_dir, folder), "seconds": round(time.time() - start, 1),
                      **_read_run(run_dir)}
            state["runs"][run.key] = record
            atomic_write_json(folder / STATE, state)
            bar.update(1)
            tqdm.write(f"[{i}/{len(plan)}] {run.method} seed {run.seed}: mAP {record['map']:.3f} "
                       f"mAP_tail {record['map_tail']:.3f}  {record['run_dir']}  {record['seconds']:.0f} s",
                       file=sys.stdout)
            sys.stdout.flush()
            if on_run_finished is not None:
                on_run_finished(run, record)
    finally:
        bar.close()
    atomic_write_json(folder / STATE, state)
    summary = study_summary(study, folder, state)
    summary["seconds_this_session"] = round(time.time() - t0, 1)
    write_study_outputs(study, folder, summary, state)
    return folder


# ----------------------------------------------------------------------------- outputs
def _variance_text(study: StudyConfig) -> str:
    if study.stage1 == "shared":
        return (f"stage1: shared — one stage 1 (seed {study.seeds[0]}); the seeds vary the frozen stage only, so "
                "the intervals cover frozen-stage variance (and the measured images), not stage 1's")
    return "stage1: per_seed — stage 1 is retrained for every seed; the intervals cover the whole training"


CI95_METHOD = ("95 % t-interval over seeds: mean ± t(0.975, n − 1)·std/√n (scipy.stats.t), std the sample "
               "standard deviation (ddof = 1); null with one seed")
PAIRED_METHOD = ("two-level paired bootstrap: per seed, bootstrap_difference (welde_det.evaluation.intervals) on "
                 "the same ground truth with the same image resamples in every seed; per replicate the seeds are "
                 "drawn with replacement and their replicate differences averaged; value = mean over seeds of the "
                 "full-set differences; ci95 = 2.5/97.5 % percentiles of the replicates (undefined replicates left "
                 "out, share in 'undefined'); covers the resampling of the measured images and of the seeds")


def study_summary(study: StudyConfig, folder: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """``study.json``'s content from the finished runs in ``state`` (paired bootstraps computed here)."""
    runs = state["runs"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for rec in sorted(runs.values(), key=lambda r: (r["method"], r["seed"])):
        wanted = ((rec["kind"] == "frozen" and rec["method"] in study.methods) or
                  (rec["kind"] == "end_to_end" and rec["method"].removeprefix("e2e_") in study.end_to_end))
        if wanted and rec["seed"] in study.seeds:
            by_method.setdefault(rec["method"], []).append(rec)
    order = [m for m in METHODS if m in by_method] + [f"e2e_{m}" for m in SINGLE_METHODS
                                                      if f"e2e_{m}" in by_method]
    methods: dict[str, Any] = {}
    classes: list[str] = []
    for m in order:
        recs = by_method[m]
        classes = classes or list(recs[0]["per_class"])
        entry: dict[str, Any] = {
            "kind": recs[0]["kind"], "n_seeds": len(recs),
            "runs": [{"seed": r["seed"], "run_dir": r["run_dir"], **{k: r[k] for k in METRICS},
                      "per_class": r["per_class"], "seconds": r["seconds"]} for r in recs]}
        for k in METRICS:
            agg = aggregate([r[k] for r in recs])
            entry[k] = {"mean": agg["mean"], "std": agg["std"], "ci95": agg["ci95"]}
        entry["per_class"] = {c: {key: val for key, val in aggregate([r["per_class"].get(c) for r in recs]).items()
                                  if key != "n"} for c in classes}
        methods[m] = entry
    stage1 = [{"seed": r["seed"], "run_dir": r["run_dir"], **{k: r[k] for k in METRICS}, "seconds": r["seconds"]}
              for r in sorted(runs.values(), key=lambda r: r["seed"]) if r["kind"] == "stage1"]
    any_rec = next(iter(runs.values()), {})
    paired = _paired(study, folder, runs, methods)
    return {"name": study.name, "framework": study.framework, "seeds": list(study.seeds), "stage1": study.stage1,
            "variance": _variance_text(study), "stage1_epochs": study.stage1_epochs, "epochs": study.epochs,
            "cache_frozen": study.cache_frozen, "cache_views": study.cache_views,
            "selection": any_rec.get("selection"), "num_images": any_rec.get("num_images"),
            "tail_classes": any_rec.get("tail_classes", []),
            "num_gt": any_rec.get("num_gt", {}), "ci95_method": CI95_METHOD,
            "paired_method": PAIRED_METHOD, "n_resamples": study.n_resamples, "bootstrap_seed": study.bootstrap_seed,
            "stage1_runs": stage1, "methods": methods, "paired": paired,
            "seconds_training": round(sum(r["seconds"] for r in runs.values()), 1)}


def _paired(study: StudyConfig, folder: Path, runs: Mapping[str, Any], methods: Mapping[str, Any]
            ) -> dict[str, Any]:
    if "welde" not in methods:
        return {}
    singles = [m for m in SINGLE_METHODS if m in methods and methods[m]["map_tail"]["mean"] is not None]
    best = max(singles, key=lambda m: methods[m]["map_tail"]["mean"]) if singles else None
    out: dict[str, Any] = {}
    for label, other in (("welde-ce_ensemble", "ce_ensemble"), ("welde-ce", "ce"), ("welde-best_single", best)):
        if other is None or other not in methods:
            continue
        seeds = [s for s in study.seeds if f"welde/seed{s}" in runs and f"{other}/seed{s}" in runs]
        if not seeds:
            continue
        pairs = [(folder / runs[f"welde/seed{s}"]["run_dir"], folder / runs[f"{other}/seed{s}"]["run_dir"])
                 for s in seeds]
        entry: dict[str, Any] = {"a": "welde", "b": other, "seeds": seeds,
                                 **paired_differences(pairs, n_resamples=study.n_resamples, seed=study.bootstrap_seed)}
        if label == "welde-best_single":
            entry["chosen_by"] = ("the single frozen head with the highest mean mAP_tail over seeds, chosen on the "
                                  "measured split (this favours the baseline)")
        out[label] = entry
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _cell(agg: Mapping[str, Any]) -> str:
    if agg["mean"] is None:
        return "—"
    if agg["std"] is None:
        return _pct(agg["mean"])
    lo, hi = agg["ci95"]
    return f"{_pct(agg['mean'])} ± {_pct(agg['std'])} [{_pct(lo)}, {_pct(hi)}]"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}"


def reading(summary: Mapping[str, Any]) -> list[str]:
    """The automatic reading: what each paired interval does and does not show (never beyond it)."""
    lines = []
    names = {"map": "mAP", "map_tail": "mAP_tail"}
    for label, entry in summary["paired"].items():
        other = entry["b"] + (" (the best single loss)" if label == "welde-best_single" else "")
        for m, shown in names.items():
            d = entry[m]
            if d["ci95"] is None or d["value"] is None:
                lines.append(f"- WELDE − {other}, {shown}: undefined (no replicate defines it).")
                continue
            lo, hi = d["ci95"]
            span = f"{_signed(d['value'])} points, 95 % interval [{_signed(lo)}, {_signed(hi)}]"
            if lo > 0:
                verdict = "the interval lies above 0: in this study WELDE is higher"
            elif hi < 0:
                verdict = "the interval lies below 0: in this study WELDE is lower"
            else:
                verdict = "the interval includes 0: this study does not show a difference"
            lines.append(f"- WELDE − {other}, {shown}: {span} ({d['positive_seeds']} of {len(d['per_seed'])} seeds "
                         f"positive); {verdict}.")
    n = len(summary["seeds"])
    if n < 3:
        lines.append(f"- {n} seed(s): the seed part of every interval rests on very few draws; read them as rough.")
    lines.append(f"- Variance covered: {summary['variance']}. Nothing here generalises beyond this data, split and "
                 "schedule.")
    return lines


def study_markdown(study: StudyConfig, summary: Mapping[str, Any]) -> str:
    """``study.md``: settings, the table (mean ± std [ci95] per method and metric), per-class AP, the
    paired differences and the reading."""
    methods = summary["methods"]
    lines = [f"# Study {summary['name']}: {summary['framework']}, {len(summary['seeds'])} seed(s)", "",
             f"Stage 1: plain CE, full network, {summary['stage1_epochs']} epochs; frozen stage: {summary['epochs']} "
             f"epochs from the stage-1 checkpoint" + (f", cached (train.cache_frozen, cache_views="
                                                      f"{summary['cache_views']})" if summary["cache_frozen"] else "")
             + f". Seeds {summary['seeds']}. {summary['variance']}.", "",
             f"Every run: {summary['selection'] or 'see its report'} ({summary['num_images']} images measured). "
             "AP in %, pycocotools-exact.", "",
             f"Cells: mean ± std [95 % interval]; {CI95_METHOD}.", "",
             "| method | seeds | mAP@[.5:.95] | mAP@.5 | mAP_tail | mAP50_tail |", "|---|---:|---:|---:|---:|---:|"]
    for m, e in methods.items():
        lines.append(f"| {m} | {e['n_seeds']} | " + " | ".join(_cell(e[k]) for k in METRICS) + " |")
    for r in summary["stage1_runs"]:
        lines.append(f"| stage 1 (CE, full network), seed {r['seed']} | 1 | "
                     + " | ".join(_pct(r[k]) for k in METRICS) + " |")
    if methods:
        tail = set(summary["tail_classes"])
        classes = list(next(iter(methods.values()))["per_class"])
        lines += ["", "Per-class AP (mean ± std over seeds):", "",
                  "| class | GT | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
        for c in classes:
            name = f"**{c}** (tail)" if c in tail else c
            cells = " | ".join("—" if (a := methods[m]["per_class"][c])["mean"] is None else
                               (_pct(a["mean"]) + ("" if a["std"] is None else f" ± {_pct(a['std'])}"))
                               for m in methods)
            lines.append(f"| {name} | {summary['num_gt'].get(c, '')} | {cells} |")
    if summary["paired"]:
        lines += ["", f"Paired differences (points): {PAIRED_METHOD}; {summary['n_resamples']} replicates.", "",
                  "| difference | metric | value | 95 % interval | per seed |", "|---|---|---:|---|---|"]
        for label, entry in summary["paired"].items():
            title = f"WELDE − {entry['b']}" + (" (best single)" if label == "welde-best_single" else "")
            for m in METRICS:
                d = entry[m]
                ci = "—" if d["ci95"] is None else f"[{_signed(d['ci95'][0])}, {_signed(d['ci95'][1])}]"
                lines.append(f"| {title} | {m} | {_signed(d['value'])} | {ci} | "
                             f"{', '.join(_signed(v) for v in d['per_seed'])} |")
        best = summary["paired"].get("welde-best_single")
        if best:
            lines += ["", f"Best single loss: {best['b']} — {best['chosen_by']}."]
    lines += ["", "## Reading", "", *reading(summary), "",
              "![per-class AP](per_class_ap.png)", "", "![WELDE weights and diversity](welde_terms.png)", ""]
    return "\n".join(lines)


def _save_figure(fig: Any, path: Path) -> None:
    """PNG without Matplotlib's Software text chunk, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    os.replace(tmp, path)


def plot_per_class(summary: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: per class, each method's mean AP over seeds with its 95 % t-interval."""
    from matplotlib.figure import Figure

    methods = summary["methods"]
    classes = list(next(iter(methods.values()))["per_class"]) if methods else []
    fig = Figure(figsize=(max(6.0, 1.3 * len(classes) * max(1, len(methods)) / 3), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        pc = methods[m]["per_class"]
        xs = np.arange(len(classes)) + (j - (len(methods) - 1) / 2) * width
        means = [np.nan if pc[c]["mean"] is None else 100 * pc[c]["mean"] for c in classes]  # no GT: no bar
        err = np.array([[100 * (pc[c]["mean"] - pc[c]["ci95"][0]), 100 * (pc[c]["ci95"][1] - pc[c]["mean"])]
                        if pc[c]["ci95"] else [0.0, 0.0] for c in classes]).T
        ax.bar(xs, means, width, yerr=err if len(classes) else None, capsize=2, label=m)
    tail = set(summary["tail_classes"])
    ax.set_xticks(np.arange(len(classes)))
    ax.set_xticklabels([f"{c}*" if c in tail else c for c in classes], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("AP@[.5:.95] (%)")
    ax.set_title(f"{summary['name']}: per-class AP, mean over seeds with 95 % t-interval (* tail)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, max(1, len(methods))))
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def welde_history(run_dir: Path) -> list[dict[str, float]]:
    """The frozen stage's per-epoch WELDE terms of a run (its ``terms.csv``: YOLO writes it in the stage
    folder, Faster R-CNN in the run folder with a ``stage`` column)."""
    for path in (run_dir / "stage2" / "terms.csv", run_dir / "terms.csv"):
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if str(r.get("stage", "")) in ("2", "stage2")]
            if rows:
                return [{k: float(v) for k, v in r.items() if k not in ("stage",) and v not in ("", None)}
                        for r in rows]
    return []


def plot_welde_terms(folder: Path, summary: Mapping[str, Any], path: Path) -> Path | None:
    """WELDE's learned weights (one colour per component, one line per seed) and the JS diversity per
    frozen-stage epoch; None when no WELDE run logged its terms."""
    from matplotlib.figure import Figure

    runs = summary["methods"].get("welde", {}).get("runs", [])
    histories = [(r["seed"], welde_history(folder / r["run_dir"])) for r in runs]
    histories = [(s, h) for s, h in histories if h]
    if not histories:
        return None
    fig = Figure(figsize=(9, 3.6))
    ax_w, ax_d = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    comps = [k.removeprefix("weight_") for k in histories[0][1][0] if k.startswith("weight_")]
    colours = {c: f"C{i}" for i, c in enumerate(comps)}
    for n, (seed, hist) in enumerate(histories):
        epochs = np.arange(1, len(hist) + 1)
        for c in comps:
            ax_w.plot(epochs, [h.get(f"weight_{c}", np.nan) for h in hist], color=colours[c], alpha=0.8,
                      marker="o", markersize=3, label=c if n == 0 else None)
        ax_d.plot(epochs, [h.get("diversity", np.nan) for h in hist], alpha=0.8, marker="o", markersize=3,
                  label=f"seed {seed}")
    ax_w.set_xlabel("frozen-stage epoch")
    ax_w.set_ylabel("learned weight (softplus θ)")
    ax_w.set_title("WELDE weights (one line per seed)", fontsize=9)
    ax_w.legend(fontsize=7)
    ax_d.set_xlabel("frozen-stage epoch")
    ax_d.set_ylabel("JS diversity")
    ax_d.set_title("WELDE diversity", fontsize=9)
    ax_d.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def write_study_outputs(study: StudyConfig, folder: Path, summary: dict[str, Any], state: Mapping[str, Any]
                        ) -> None:
    """``study.json``, ``study.md``, ``per_class_ap.png`` and ``welde_terms.png`` in the study folder."""
    from welde_det.utils.fileio import atomic_write_json, atomic_write_text

    if summary["methods"]:
        plot_per_class(summary, folder / "per_class_ap.png")
    summary["plots"] = {"per_class_ap": "per_class_ap.png",
                        "welde_terms": "welde_terms.png" if plot_welde_terms(folder, summary,
                                                                             folder / "welde_terms.png") else None}
    atomic_write_json(folder / "study.json", _json_safe(summary))
    atomic_write_text(folder / "study.md", study_markdown(study, summary))


def _json_safe(obj: Any) -> Any:
    """NaN / inf as null (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
