"""Experiment configuration: YAML files loaded into frozen dataclasses, with ``key=value`` overrides.

One :class:`ExperimentConfig` describes a run: the task, the data, the model, the loss (a
single registry loss, the CE-ensemble control or WELDE) and the training schedule. The
resolved config is saved beside every checkpoint and report (:func:`save_config`), so a
run can always be reproduced from its folder.

Overrides are ``section.field=value`` (``train.epochs=3``) or, when the field name is
unique across sections, the bare name (``epochs=3``, ``imgsz=160``, ``n_images=40``).
Values are parsed as YAML scalars/lists and checked against the field's type.

Example:
    >>> cfg = load_config("configs/yolo_welde.yaml", ["epochs=1", "n_images=20"])  # doctest: +SKIP
    >>> cfg.train.epochs
    1
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from welde_det.errors import UserError
from welde_det.utils.fileio import atomic_write_text

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

TASKS = ("detect", "classify")
FRAMEWORKS = ("yolo", "rcnn", "classify")
LOSS_MODES = ("single", "ce_ensemble", "welde")


class ConfigError(UserError):
    """A configuration file or override is invalid; the message names the key and value."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from.

    Attributes:
        source: ``"phantom"`` (generate the synthetic lumbar phantom, cached), or a path:
            a COCO JSON / folder with ``annotations/``, a YOLO ``data.yaml`` or folder, a
            MedMNIST-style ``.npz`` or an image folder (class per sub-folder).
        n_images: phantom studies to generate (one mid-sagittal slice each).
        difficulty: phantom difficulty in [0, 1].
        contrast: phantom contrast, ``"t1"``, ``"t2"`` or ``"both"``.
        seed: phantom / split seed.
        cache_dir: where generated data is cached (ignored by git).
        sampler: optional sampler name (``welde_det.losses.samplers``): for the detectors
            ``repeat_factor`` (LVIS: an image is drawn max(1, √(t / f_c)) times per epoch, f_c
            the share of training images holding class c); for classification any
            registry sampler (``class_balanced``, ``progressive``, ...).
        repeat_threshold: t of ``repeat_factor``.
        channels: input channels given to the model (1 = grayscale, 3 = RGB-grey).
        bit_depth: 8 or 16. With 16 the phantom writes 16-bit PNGs and the detectors
            train on 16-bit slices without 8-bit quantisation (YOLO through
            ``HighBitYOLODataset``; Faster R-CNN reads every PNG at its own depth). The
            classification path reads ``.npz`` arrays and image files at their own depth
            whatever this says.
        tail: explicit tail class names (empty = ClassStats' default rule).
        tail_threshold: instance threshold for the tail set (0 = unused).
        names: class names for a YOLO folder without a ``data.yaml`` (empty = read them
            from the data; a YOLO folder with no names anywhere is an error).
        class_floor: count floor for classes with no training instance (0 = such a class
            is an error naming it; 1 trains anyway, e.g. on a tiny phantom).
    """

    source: str = "phantom"
    n_images: int = 200
    difficulty: float = 0.5
    contrast: str = "both"
    seed: int = 0
    cache_dir: str = "data/generated"
    sampler: str | None = None
    repeat_threshold: float = 0.1
    channels: int = 3
    bit_depth: int = 8
    tail: tuple[str, ...] = ()
    tail_threshold: int = 0
    names: tuple[str, ...] = ()
    class_floor: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which network.

    Attributes:
        framework: ``"yolo"``, ``"rcnn"`` or ``"classify"``.
        arch: architecture name (``yolov8n.yaml``, ``fasterrcnn_resnet50_fpn``,
            ``resnet50``, ...). Names that would download weights are refused.
        weights: local checkpoint/weights path, or ``None`` for random initialisation
            (a welde_det checkpoint, an Ultralytics ``.pt`` or a torchvision state dict;
            loaded with ``torch.load(weights_only=True)`` and an allow-list of modules).
        hidden: adapter bottleneck width for WELDE heads (0 = feature dim // 4).
    """

    framework: str = "yolo"
    arch: str = "yolov8n.yaml"
    weights: str | None = None
    hidden: int = 0


@dataclass(frozen=True)
class LossConfig:
    """The classification loss.

    Attributes:
        mode: ``"single"`` (one registry loss), ``"ce_ensemble"`` (K ``ce`` heads, the
            architecture-matched control) or ``"welde"``.
        name: registry loss name for ``mode="single"``.
        components: registry names of the K WELDE components.
        params: extra keyword arguments per loss name, e.g. ``{"focal": {"gamma": 2.0}}``.
        ema_momentum, sum_penalty, diversity, weight_floor, warmup_steps: the
            :class:`~welde_det.welde.WELDEObjective` settings (METHOD.md §3).
        drw_epoch: epoch at which LDAM/LMF deferred re-weighting switches on (-1 = off).
        head: the heads' type, ``"auto"`` (YOLO: linear with s = 1; softmax heads: cosine
            with s = 30 for ``ldam``/``lmf``, linear for the rest), ``"linear"`` or ``"cosine"``
            (``welde_det.welde.spec``: a head that cannot become confident is refused).
        cls_pw: Ultralytics' class-weight power for the plain BCE (YOLO, ``mode: single``,
            ``name: ce`` only; refused elsewhere).
    """

    mode: str = "single"
    name: str = "ce"
    components: tuple[str, ...] = ("ce", "focal", "cb", "ldam")
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    ema_momentum: float = 0.99
    sum_penalty: float = 10.0
    diversity: float = 0.1
    weight_floor: float = 0.05
    warmup_steps: int = 50
    drw_epoch: int = -1
    head: str = "auto"
    cls_pw: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The schedule.

    Attributes:
        epochs: epochs of the main stage (stage 2 for WELDE / ``ce_ensemble``).
        stage1_epochs: ordinary training epochs before the frozen-backbone stage
            (0 = none; use ``model.weights`` to start from a local checkpoint instead).
        freeze_backbone: freeze backbone (and neck / box branch) in the main stage.
        batch: batch size.
        imgsz: input size in pixels.
        lr: learning rate.
        optimizer: optimiser name.
        weight_decay: weight decay.
        workers: data-loader workers.
        device: ``"cpu"``, ``"cuda"``, ``"0,1"``... or ``""`` for auto.
        seed: global seed.
        amp: mixed precision where the device supports it.
        conf: score threshold used for the saved detections and the report.
        patience: early-stop patience in epochs (0 = off).
        select: what chooses the model: ``"last"`` (the last epoch of the fixed schedule),
            ``"holdout"`` (best mAP on ``select_fraction`` of train carved off, patients
            kept whole) or a split name that is not the measured one.
        select_fraction: the share of train carved off for ``select=holdout``.
        measure: the split the report measures (never the selecting one).
        nbs: YOLO's nominal batch size: Ultralytics accumulates gradients over
            ``nbs / batch`` batches and scales weight decay to it (64, Ultralytics'
            default). Set it to ``batch`` for one optimiser step per batch, which short
            runs on small datasets need (``make demo`` does).
        cache_frozen: run the frozen network once per image (view) and train the frozen
            stage's adapters, heads and θ on its cached outputs (:mod:`welde_det.engine.cache`;
            same loss, gradients and optimiser, one device only).
        cache_views: with ``cache_frozen``: 0 = one plain (un-augmented) view per image;
            V ≥ 1 (YOLO) = V augmented views drawn once before training, epoch e on view e mod V.
        checkpoint_every_s: with ``cache_frozen`` (YOLO): a cached epoch takes seconds, so the
            frozen stage writes its resumable ``last.pt`` at most once per this many seconds —
            always at the last epoch, and on every new best when validation runs each epoch. A
            killed run repeats at most this much work; 0 writes every epoch, as Ultralytics does.
    """

    epochs: int = 30
    stage1_epochs: int = 0
    freeze_backbone: bool = False
    batch: int = 16
    imgsz: int = 384
    lr: float = 0.01
    optimizer: str = "auto"
    weight_decay: float = 0.0005
    workers: int = 2
    device: str = ""
    seed: int = 0
    amp: bool = False
    conf: float = 0.001
    patience: int = 0
    nbs: int = 64
    select: str = "last"
    select_fraction: float = 0.15
    measure: str = "val"
    cache_frozen: bool = False
    cache_views: int = 0
    checkpoint_every_s: float = 30.0


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment.

    Attributes:
        name: run name; the run folder is ``<output>/<name>-<timestamp>``.
        task: ``"detect"`` or ``"classify"``.
        output: root folder for run folders.
    """

    name: str = "run"
    task: str = "detect"
    output: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("model.framework", self.model.framework, FRAMEWORKS)
        _check_choice("loss.mode", self.loss.mode, LOSS_MODES)
        if self.task == "classify" and self.model.framework != "classify":
            raise ConfigError(
                f"task 'classify' needs model.framework 'classify', got {self.model.framework!r}"
            )
        if self.task == "detect" and self.model.framework == "classify":
            raise ConfigError("task 'detect' needs model.framework 'yolo' or 'rcnn'")
        if not 0.0 <= self.data.difficulty <= 1.0:
            raise ConfigError(f"data.difficulty must be in [0, 1], got {self.data.difficulty}")
        if self.data.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.data.channels}")
        if self.data.bit_depth not in (8, 16):
            raise ConfigError(f"data.bit_depth must be 8 or 16, got {self.data.bit_depth}")
        if self.loss.mode != "single" and len(self.loss.components) < 1:
            raise ConfigError("loss.components must name at least one registry loss")
        if not 0.0 < self.train.select_fraction < 1.0:
            raise ConfigError(f"train.select_fraction must be in (0, 1), got {self.train.select_fraction}")
        if self.train.patience and self.train.select == "last":
            raise ConfigError(f"train.patience={self.train.patience} stops on a selection metric, but "
                              "train.select='last' measures none; set train.select=holdout (or a split that is "
                              "not measured), or patience=0")
        if self.data.class_floor < 0:
            raise ConfigError(f"data.class_floor must be >= 0, got {self.data.class_floor}")
        for key in ("epochs", "batch", "imgsz", "nbs"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")

    @property
    def components(self) -> tuple[str, ...]:
        """Registry names of the classification heads this run trains."""
        if self.loss.mode == "single":
            return (self.loss.name,)
        if self.loss.mode == "ce_ensemble":
            return ("ce",) * len(self.loss.components)
        return tuple(self.loss.components)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


# ---------------------------------------------------------------------- dict <-> dataclass
def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (tuples become lists), ready for YAML/JSON."""

    def _plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [_plain(x) for x in v]
        if isinstance(v, dict):
            return {k: _plain(x) for k, x in v.items()}
        return v

    return _plain(cfg)


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(data).__name__}")
    return _build(ExperimentConfig, data, source, prefix="")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {prefix + key!r}{_did_you_mean(key, known)}")
        hint = hints[key]
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + key!r} must be a mapping, got {value!r}")
            kwargs[key] = _build(hint, value, source, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}", source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys are {sorted(known)}"


#: a number in exponent notation without a dot (``1e-4``), which YAML 1.1 (PyYAML) reads as a string
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml12_numbers(value: Any) -> Any:
    """``value`` with exponent-notation strings (``"1e-4"``) inside mappings and lists read as floats."""
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml12_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml12_numbers(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``hint`` (int/float/bool/str, Optional, tuple, dict)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key, source) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return _yaml12_numbers(dict(value))  # e.g. loss.params.focal.gamma: 1e-4
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; Python's float() does not
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{source}: {key} must be a number (e.g. 0.01 or 1e-4), got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number (e.g. 0.01 or 1e-4), got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


# ---------------------------------------------------------------------- overrides
def _field_paths(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            paths += _field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
    """Return ``cfg`` with ``key=value`` overrides applied.

    Args:
        cfg: the base config.
        overrides: strings ``section.field=value`` or ``field=value`` (unique bare name);
            ``loss.params.focal.gamma=1.5`` sets one entry of a dict field.

    Raises:
        ConfigError: malformed override, unknown or ambiguous key, or a value of the wrong type.
    """
    data = config_to_dict(cfg)
    paths = _field_paths()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix "
                              "the brackets") from None
        full = _resolve_key(key, paths)
        node = data
        parts = full.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return config_from_dict(data, source="overrides")


def _resolve_key(key: str, paths: list[str]) -> str:
    if key in paths:
        return key
    # a key below a dict-valued field, e.g. loss.params.focal.gamma
    for p in paths:
        if key.startswith(p + "."):
            return key
    matches = [p for p in paths if p.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override key {key!r} is ambiguous: use one of {matches}")
    close = difflib.get_close_matches(key, paths + [p.split(".")[-1] for p in paths], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown override key {key!r}{hint}")


# ---------------------------------------------------------------------- files
def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    A config may name a ``base:`` file (relative to itself) whose values it extends.
    """
    if path is None:
        cfg = ExperimentConfig()
    else:
        cfg = config_from_dict(_read_yaml_with_base(Path(path)), source=str(path))
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def _read_yaml_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base:' chain {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml_with_base(path.parent / base, (*_seen, path.resolve()))
    return _deep_merge(merged, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def replace_section(cfg: ExperimentConfig, section: str, **changes: Any) -> ExperimentConfig:
    """Copy of ``cfg`` with fields of one section changed (validation re-runs)."""
    return replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
