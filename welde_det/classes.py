"""Class statistics: the one source of truth for class names, frequencies and the tail set.

:class:`ClassStats` is built once from the *training* annotations (a COCO JSON file or
dict, or a YOLO label folder), saved inside every checkpoint and report, and is the only
thing losses, samplers and metrics read class frequencies from (METHOD.md §1).

Tail classes default to the ``ceil(C/2)`` classes with the fewest training instances,
ties broken by class index; an explicit list or an instance threshold overrides the rule,
and the rule that chose the set travels with it so every report can print it.

Image counts (training images holding at least one instance of a class) are only ever
measured (:meth:`ClassStats.from_coco`, :meth:`ClassStats.from_yolo`); built from counts
alone they are ``None`` ("not measured"), never a copy of the instance counts. A class with
no training instance is an error naming it, unless a ``floor`` is passed explicitly.

Example:
    >>> stats = ClassStats.from_counts(
    ...     ["DDD", "Normal_IVD", "SS", "Spondylolisthesis", "LDB", "TDB"],
    ...     [633, 4131, 1921, 122, 2033, 151])
    >>> stats.tail_names
    ('DDD', 'Spondylolisthesis', 'TDB')
    >>> round(stats.imbalance_ratio, 1)
    33.9
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from welde_det.utils.fileio import atomic_write_json, load_json

__all__ = ["LUMBAR_CLASSES", "LUMBAR_COUNTS", "ClassStats"]

#: Short names of the public six-class lumbar set's classes in its published label order
#: (``data.yaml`` index 0..5: Degenerative Disc Disease, Normal IVD, Spinal Stenosis,
#: Spondylolisthesis, Lumbar Disc Bulge, Thoracic Disc Bulge). The phantom uses these names;
#: the real set's own (long) names come from its ``data.yaml``.
LUMBAR_CLASSES: tuple[str, ...] = ("DDD", "Normal_IVD", "SS", "Spondylolisthesis", "LDB", "TDB")
#: Published instance counts of the public six-class lumbar set (all splits), in :data:`LUMBAR_CLASSES` order.
LUMBAR_COUNTS: tuple[int, ...] = (633, 4131, 1921, 122, 2033, 151)


@dataclass(frozen=True)
class ClassStats:
    """Per-class instance and image counts, and the tail set, for one training split.

    Args:
        names: class names in label-index order (index ``c`` is logit column ``c``).
        instance_counts: training instances (boxes or images) per class.
        image_counts: training images containing at least one instance, per class, as
            measured; ``None`` when not measured (never copied from ``instance_counts``).
        category_ids: COCO category id of each class (default ``1..C``).
        tail: explicit tail class indices; ``None`` uses the default rule.
        tail_threshold: classes with fewer than this many instances form the tail.
        floor: minimum count substituted for classes with fewer instances (it makes a
            zero-count class legal); ``None`` means a zero-count class is an error.

    Attributes:
        tail: sorted tuple of tail class indices.
        tail_rule: human-readable description of how ``tail`` was chosen.
    """

    names: tuple[str, ...]
    instance_counts: tuple[int, ...]
    image_counts: tuple[int, ...] | None = None
    category_ids: tuple[int, ...] = ()
    tail: tuple[int, ...] = field(default=())
    tail_rule: str = ""
    floor: int | None = None

    def __init__(
        self,
        names: Sequence[str],
        instance_counts: Sequence[int],
        image_counts: Sequence[int] | None = None,
        *,
        category_ids: Sequence[int] | None = None,
        tail: Sequence[int | str] | None = None,
        tail_threshold: int | None = None,
        floor: int | None = None,
    ) -> None:
        names = tuple(str(n) for n in names)
        counts = tuple(int(c) for c in instance_counts)
        if not names:
            raise ValueError("ClassStats needs at least one class name")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate class names: {dup}")
        if len(counts) != len(names):
            raise ValueError(
                f"instance_counts has {len(counts)} entries but there are {len(names)} classes {list(names)}"
            )
        images = tuple(int(c) for c in image_counts) if image_counts is not None else None
        if images is not None and len(images) != len(names):
            raise ValueError(f"image_counts has {len(images)} entries but there are {len(names)} classes")
        for c, (name, n) in enumerate(zip(names, counts)):
            m = images[c] if images is not None else 0
            if n < 0 or m < 0:
                raise ValueError(f"class {name!r} has a negative count (instances={n}, images={m})")
            if images is not None and (m > n or (n > 0) != (m > 0)):
                raise ValueError(
                    f"class {name!r}: {m} images hold its {n} instances; an image count is the number of "
                    "images with at least one instance (0 < images <= instances, or both 0)"
                )
        if floor is not None and floor < 1:
            raise ValueError(f"floor must be a positive integer, got {floor}")
        if floor is None:
            empty = [n for n, c in zip(names, counts) if c == 0]
            if empty:
                raise ValueError(
                    f"class(es) {empty} have zero training instances; losses cannot weight a class "
                    "they never see. Fix the class list or the training split, or pass an explicit floor "
                    "(e.g. floor=1) to substitute a minimum count."
                )
        cat_ids = tuple(int(i) for i in category_ids) if category_ids is not None else tuple(
            range(1, len(names) + 1)
        )
        if len(cat_ids) != len(names) or len(set(cat_ids)) != len(cat_ids):
            raise ValueError(f"category_ids {list(cat_ids)} must be {len(names)} distinct ids")

        object.__setattr__(self, "names", names)
        object.__setattr__(self, "instance_counts", counts)
        object.__setattr__(self, "image_counts", images)
        object.__setattr__(self, "category_ids", cat_ids)
        object.__setattr__(self, "floor", floor)
        idx, rule = self._choose_tail(tail, tail_threshold)
        object.__setattr__(self, "tail", idx)
        object.__setattr__(self, "tail_rule", rule)

    # ------------------------------------------------------------------ tail rule
    def _choose_tail(
        self, tail: Sequence[int | str] | None, threshold: int | None
    ) -> tuple[tuple[int, ...], str]:
        num = len(self.names)
        if tail is not None and threshold is not None:
            raise ValueError("pass either an explicit tail list or tail_threshold, not both")
        if tail is not None:
            chosen = []
            for t in tail:
                if isinstance(t, str):
                    if t not in self.names:
                        raise ValueError(f"tail class {t!r} is not one of {list(self.names)}")
                    chosen.append(self.names.index(t))
                else:
                    if not 0 <= int(t) < num:
                        raise ValueError(f"tail class index {t} is outside 0..{num - 1}")
                    chosen.append(int(t))
            return tuple(sorted(set(chosen))), "explicit list"
        if threshold is not None:
            chosen = [c for c, n in enumerate(self.instance_counts) if n < threshold]
            return tuple(chosen), f"classes with fewer than {threshold} training instances"
        k = math.ceil(num / 2)
        order = sorted(range(num), key=lambda c: (self.instance_counts[c], c))
        return tuple(sorted(order[:k])), (
            f"the ceil(C/2)={k} classes with the fewest training instances (ties by class index)"
        )

    # ------------------------------------------------------------------ derived
    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.names)

    @property
    def effective_counts(self) -> tuple[int, ...]:
        """Instance counts with ``floor`` applied: what losses and samplers should use."""
        if self.floor is None:
            return self.instance_counts
        return tuple(max(c, self.floor) for c in self.instance_counts)

    @property
    def tail_names(self) -> tuple[str, ...]:
        """Names of the tail classes, in class-index order."""
        return tuple(self.names[c] for c in self.tail)

    @property
    def frequencies(self) -> tuple[float, ...]:
        """Fraction of training instances per class."""
        total = sum(self.instance_counts)
        return tuple(c / total if total else 0.0 for c in self.instance_counts)

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest (effective) instance count."""
        counts = self.effective_counts
        return max(counts) / min(counts) if min(counts) > 0 else math.inf

    def index(self, name: str) -> int:
        """Class index of ``name``; the error lists the valid names."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown class {name!r}; classes are {list(self.names)}") from None

    def with_tail(
        self, tail: Sequence[int | str] | None = None, *, tail_threshold: int | None = None
    ) -> ClassStats:
        """Return a copy whose tail set follows another rule (same counts)."""
        return ClassStats(
            self.names,
            self.instance_counts,
            self.image_counts,
            category_ids=self.category_ids,
            tail=tail,
            tail_threshold=tail_threshold,
            floor=self.floor,
        )

    def summary(self) -> str:
        """One line per class plus the tail rule, for logs and reports."""
        lines = [f"{'class':<20} {'instances':>9} {'images':>7} {'freq':>6}  tail"]
        for c, name in enumerate(self.names):
            mark = "*" if c in self.tail else ""
            images = "n/a" if self.image_counts is None else self.image_counts[c]
            lines.append(
                f"{name:<20} {self.instance_counts[c]:>9} {images:>7} "
                f"{100 * self.frequencies[c]:>5.1f}%  {mark}"
            )
        lines.append(f"tail = {list(self.tail_names)} ({self.tail_rule})")
        if self.image_counts is None:
            lines.append("image counts: not measured (built from instance counts only)")
        if self.floor is not None:
            lines.append(f"floor = {self.floor} (counts below it are raised to it for losses and samplers)")
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` restores an equal object."""
        return {
            "names": list(self.names),
            "instance_counts": list(self.instance_counts),
            "image_counts": None if self.image_counts is None else list(self.image_counts),
            "category_ids": list(self.category_ids),
            "tail": list(self.tail),
            "tail_names": list(self.tail_names),
            "tail_rule": self.tail_rule,
            "floor": self.floor,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassStats:
        """Inverse of :meth:`to_dict` (the stored tail set is kept as an explicit list)."""
        try:
            stats = cls(
                data["names"],
                data["instance_counts"],
                data.get("image_counts"),
                category_ids=data.get("category_ids"),
                tail=data.get("tail"),
                floor=data.get("floor"),
            )
        except KeyError as exc:
            raise ValueError(f"ClassStats dict is missing the key {exc.args[0]!r}") from None
        # Keep the original rule text: the set was chosen by it, not by hand.
        if data.get("tail_rule"):
            object.__setattr__(stats, "tail_rule", str(data["tail_rule"]))
        return stats

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON form atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassStats:
        """Read what :meth:`save` wrote."""
        return cls.from_dict(load_json(path))

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_counts(cls, names: Sequence[str], counts: Sequence[int], **kw: Any) -> ClassStats:
        """Build from names and instance counts (image counts: ``image_counts=`` if measured, else ``None``)."""
        return cls(names, counts, **kw)

    @classmethod
    def from_coco(cls, coco: str | os.PathLike | Mapping[str, Any], **kw: Any) -> ClassStats:
        """Count a COCO detection dataset (path or dict).

        Classes follow the order of ``categories`` sorted by id; crowd annotations
        (``iscrowd=1``) are not counted as training instances. Image counts are measured
        (images holding at least one non-crowd instance of the class).

        Args:
            coco: COCO JSON path or the loaded dict.
            **kw: ``tail``, ``tail_threshold``, ``floor`` as in the constructor.

        Raises:
            ValueError: malformed data, or a class without training instances (named, with
                the source) when no ``floor`` is given.
        """
        source = str(coco) if not isinstance(coco, Mapping) else "<COCO dict>"
        data = load_json(coco) if not isinstance(coco, Mapping) else coco
        for key in ("categories", "annotations"):
            if key not in data:
                raise ValueError(f"{source}: COCO data has no {key!r} list")
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        if not cats:
            raise ValueError(f"{source}: COCO data has an empty 'categories' list")
        id_to_idx = {int(c["id"]): i for i, c in enumerate(cats)}
        inst = [0] * len(cats)
        imgs: list[set] = [set() for _ in cats]
        for ann in data["annotations"]:
            cid = int(ann["category_id"])
            if cid not in id_to_idx:
                raise ValueError(
                    f"{source}: annotation {ann.get('id')} has category_id {cid}, "
                    f"not among the categories {sorted(id_to_idx)}"
                )
            if ann.get("iscrowd", 0):
                continue
            inst[id_to_idx[cid]] += 1
            imgs[id_to_idx[cid]].add(ann["image_id"])
        try:
            return cls(
                [c["name"] for c in cats],
                inst,
                [len(s) for s in imgs],
                category_ids=[int(c["id"]) for c in cats],
                **kw,
            )
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_yolo(
        cls, labels_dir: str | os.PathLike, names: Sequence[str], **kw: Any
    ) -> ClassStats:
        """Count a YOLO label folder (``*.txt`` lines ``cls cx cy w h``).

        Args:
            labels_dir: folder searched recursively for ``.txt`` label files.
            names: class names in label-index order (e.g. from ``data.yaml``).
            **kw: ``tail``, ``tail_threshold``, ``floor`` as in the constructor.

        Raises:
            ValueError: a bad label line (``file:line``), or a class without training
                instances (named, with the folder) when no ``floor`` is given.
        """
        labels_dir = Path(labels_dir)
        if not labels_dir.is_dir():
            raise FileNotFoundError(f"{labels_dir}: YOLO label folder not found")
        files = sorted(labels_dir.rglob("*.txt"))
        if not files:
            raise ValueError(f"{labels_dir}: no .txt label files found")
        num = len(names)
        inst = [0] * num
        imgs = [0] * num
        for path in files:
            seen = set()
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls_idx = int(float(parts[0]))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: class id {parts[0]!r} is not a number") from None
                if not 0 <= cls_idx < num:
                    raise ValueError(
                        f"{path}:{lineno}: class id {cls_idx} is outside 0..{num - 1} ({list(names)})"
                    )
                inst[cls_idx] += 1
                seen.add(cls_idx)
            for c in seen:
                imgs[c] += 1
        try:
            return cls(names, inst, imgs, **kw)
        except ValueError as exc:
            raise ValueError(f"{labels_dir}: {exc}") from None
