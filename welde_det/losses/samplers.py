"""Class-aware batch sampling (Scholz et al.; Kang et al.; LVIS repeat factors).

Classification samplers draw indices with replacement so that class c is drawn with
probability q_c ∝ n_c^p / Σ_j n_j^p, each class's samples uniformly:

- ``InstanceBalancedSampler``: p = 1 (the data's own distribution, i.e. shuffling);
- ``ClassBalancedSampler``: p = 0 (every class equally often);
- ``SquareRootSampler``: p = 1/2;
- ``ProgressivelyBalancedSampler``: q(t) = (1 − t/T)·q^{IB} + (t/T)·q^{CB} over T epochs.

``RepeatFactorSampler`` is the image-level sampler for detection (LVIS, Gupta et al. 2019;
Detectron2's ``RepeatFactorTrainingSampler``): with f_c the fraction of training images
containing class c and threshold t, r_c = max(1, sqrt(t / f_c)); an image repeats
r_i = max_{c in image} r_c times per epoch, with stochastic rounding (⌊r_i⌋ times, plus once
more with probability r_i − ⌊r_i⌋, drawn afresh every epoch). Over many epochs image i is
drawn with frequency r_i / Σ_j r_j. :func:`build_detection_sampler` builds it by name
(``data.sampler=repeat_factor``) for Faster R-CNN's DataLoader and YOLO's trainer.

All samplers are seeded and deterministic for (seed, epoch); call ``set_epoch`` every
epoch (as with ``DistributedSampler``). The repeat-factor sampler also moves to the next
epoch by itself after each pass, for loaders that never call ``set_epoch`` (Ultralytics'
single-process ``InfiniteDataLoader`` re-iterates its sampler pass after pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "DETECTION_SAMPLERS",
    "ClassBalancedSampler",
    "InstanceBalancedSampler",
    "ProgressivelyBalancedSampler",
    "RepeatFactorSampler",
    "SquareRootSampler",
    "build_detection_sampler",
    "build_sampler",
    "class_sampling_probabilities",
    "repeat_factors",
]


def _labels_array(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if arr.size == 0:
        raise ValueError("a sampler needs at least one labelled sample")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise ValueError("sampler labels must be non-negative integer class indices")
    return arr.astype(np.int64)


def class_sampling_probabilities(counts: Sequence[int] | np.ndarray, power: float) -> np.ndarray:
    """q_c ∝ n_c^power over classes that have samples (others get 0)."""
    n = np.asarray(counts, dtype=np.float64)
    q = np.where(n > 0, np.power(np.maximum(n, 1e-300), power), 0.0)
    return q / q.sum()


class _ClassAwareSampler(Sampler[int]):
    """Draws ``num_samples`` indices: a class from q, then a sample of that class uniformly."""

    def __init__(self, labels, *, num_samples: int | None = None, seed: int = 0) -> None:
        self.labels = _labels_array(labels)
        self.num_classes = int(self.labels.max()) + 1
        self.counts = np.bincount(self.labels, minlength=self.num_classes)
        self.num_samples = int(num_samples or len(self.labels))
        self.seed = int(seed)
        self.epoch = 0
        order = np.argsort(self.labels, kind="stable")
        self._by_class = np.split(order, np.cumsum(self.counts)[:-1])

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the draw of ``epoch``."""
        self.epoch = int(epoch)

    def probabilities(self) -> np.ndarray:  # pragma: no cover - abstract
        """Target class distribution q (C,)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = rng.choice(self.num_classes, size=self.num_samples, p=self.probabilities())
        out = np.empty(self.num_samples, dtype=np.int64)
        for c in np.unique(classes):
            where = np.nonzero(classes == c)[0]
            members = self._by_class[c]
            out[where] = members[rng.integers(0, len(members), size=len(where))]
        return iter(out.tolist())


class InstanceBalancedSampler(_ClassAwareSampler):
    """Classes drawn in proportion to their counts (q_c ∝ n_c)."""

    def probabilities(self) -> np.ndarray:
        return class_sampling_probabilities(self.counts, 1.0)


class ClassBalancedSampler(_ClassAwareSampler):
    """Every class drawn equally often (q_c = 1/C over non-empty classes)."""

    def probabilities(self) -> np.ndarray:
        return class_sampling_probabilities(self.counts, 0.0)


class SquareRootSampler(_ClassAwareSampler):
    """q_c ∝ sqrt(n_c)."""

    def probabilities(self) -> np.ndarray:
        return class_sampling_probabilities(self.counts, 0.5)


class ProgressivelyBalancedSampler(_ClassAwareSampler):
    """Interpolates from instance- to class-balanced over ``total_epochs`` (Kang et al., 2020).

    Args:
        total_epochs: T; at epoch t the distribution is (1 − t/T)·q^{IB} + (t/T)·q^{CB}.
    """

    def __init__(self, labels, *, total_epochs: int, num_samples: int | None = None, seed: int = 0) -> None:
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        super().__init__(labels, num_samples=num_samples, seed=seed)
        self.total_epochs = int(total_epochs)

    def probabilities(self) -> np.ndarray:
        t = min(self.epoch / self.total_epochs, 1.0)
        return (1 - t) * class_sampling_probabilities(self.counts, 1.0) + t * class_sampling_probabilities(
            self.counts, 0.0
        )


def repeat_factors(image_classes: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """Per-image repeat factors r_i = max_{c in i} max(1, sqrt(t / f_c)); images without boxes get 1.

    Args:
        image_classes: for each image, the class indices of its boxes.
        threshold: t, the image-fraction below which a class is over-sampled.
    """
    if threshold <= 0:
        raise ValueError(f"repeat-factor threshold must be > 0, got {threshold}")
    num_images = len(image_classes)
    if num_images == 0:
        raise ValueError("repeat_factors needs at least one image")
    per_image = [set(int(c) for c in cls) for cls in image_classes]
    num_classes = 1 + max((max(s) for s in per_image if s), default=-1)
    image_count = np.zeros(max(num_classes, 1))
    for s in per_image:
        for c in s:
            image_count[c] += 1
    frac = image_count / num_images
    r_class = np.where(frac > 0, np.maximum(1.0, np.sqrt(threshold / np.maximum(frac, 1e-300))), 1.0)
    return np.array([max((r_class[c] for c in s), default=1.0) for s in per_image])


class RepeatFactorSampler(Sampler[int]):
    """Image-level repeat-factor sampling for detection (LVIS; r_c = max(1, sqrt(t / f_c))).

    Each epoch image i appears ⌊r_i⌋ times plus once more with probability r_i − ⌊r_i⌋; the
    order is shuffled. With ``num_replicas > 1`` (DDP) every rank draws the same epoch list,
    padded by wrapping to a multiple of ``num_replicas``, and takes every
    ``num_replicas``-th index from ``rank`` on (as ``DistributedSampler`` shards).

    Args:
        image_classes: per image, the class indices of its boxes.
        threshold: t (0.001 in LVIS; larger values re-sample more).
        seed: base seed; the draw depends on (seed, epoch).
        num_replicas, rank: DDP world size and this process's rank.

    Shape:
        ``factors``: (num_images,) repeat factors r_i; ``len()``: round(Σ r_i) / num_replicas
        (rounded up), the expected number of draws per epoch on this rank — one epoch's
        draw varies around it with the stochastic rounding.

    Example:
        >>> s = RepeatFactorSampler([[0]] * 9 + [[1]], threshold=0.4)
        >>> float(s.factors[-1]), len(s)
        (2.0, 11)
    """

    def __init__(self, image_classes: Sequence[Sequence[int]], *, threshold: float = 0.1, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"RepeatFactorSampler: rank {rank} is not in [0, num_replicas={num_replicas})")
        self.factors = repeat_factors(image_classes, threshold)
        self.threshold = float(threshold)
        self.seed, self.epoch = int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the draw of ``epoch``."""
        self.epoch = int(epoch)

    def expected_frequencies(self) -> np.ndarray:
        """r_i / Σ_j r_j: each image's share of the draws over many epochs (num_images,)."""
        return self.factors / self.factors.sum()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All ranks' draw of ``epoch`` (before sharding), shuffled."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        whole = np.floor(self.factors)
        reps = whole + (rng.random(len(self.factors)) < self.factors - whole)
        idx = np.repeat(np.arange(len(self.factors)), reps.astype(np.int64))
        return idx[rng.permutation(len(idx))]

    def __len__(self) -> int:
        return -(-round(float(self.factors.sum())) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices(self.epoch)
        self.epoch += 1
        if self.num_replicas > 1:
            pad = -len(idx) % self.num_replicas
            idx = np.concatenate([idx, np.resize(idx, pad)])[self.rank::self.num_replicas]
        return iter(idx.tolist())


#: Detection sampler names for ``data.sampler`` (None or ``"none"``: the loader's own shuffling).
DETECTION_SAMPLERS = ("none", "repeat_factor")


def build_detection_sampler(name: str | None, image_classes: Sequence[Sequence[int]], *, threshold: float = 0.1,
                            seed: int = 0, num_replicas: int = 1, rank: int = 0) -> RepeatFactorSampler | None:
    """The image sampler of a detection DataLoader by name (``data.sampler``).

    Args:
        name: ``"repeat_factor"``; None or ``"none"`` return None (plain shuffling, e.g.
            ``DataLoader(shuffle=True)`` or a ``DistributedSampler``).
        image_classes: per image, in dataset order, the class indices of its boxes.
        threshold: t of the repeat factors (``data.repeat_threshold``).
        seed, num_replicas, rank: see :class:`RepeatFactorSampler`.

    Raises:
        ValueError: an unknown name (the classification samplers are named as such), a bad
            threshold or rank.
    """
    if name is None or name == "none":
        return None
    if name != "repeat_factor":
        hint = " (a classification sampler: detection samples images, not instances)" if name in SAMPLERS else ""
        raise ValueError(f"unknown detection sampler {name!r}{hint}; choose one of {list(DETECTION_SAMPLERS)}")
    return RepeatFactorSampler(image_classes, threshold=threshold, seed=seed, num_replicas=num_replicas, rank=rank)


SAMPLERS = {
    "instance": InstanceBalancedSampler,
    "class": ClassBalancedSampler,
    "sqrt": SquareRootSampler,
    "progressive": ProgressivelyBalancedSampler,
}


def build_sampler(name: str, labels, **kw) -> Sampler[int]:
    """Build a classification sampler by name: ``instance``, ``class``, ``sqrt`` or ``progressive``.

    ``progressive`` needs ``total_epochs``. For detection use :class:`RepeatFactorSampler`.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](labels, **kw)


def expected_class_frequency(sampler: _ClassAwareSampler) -> np.ndarray:
    """The sampler's target class distribution at its current epoch (for reports and tests)."""
    return sampler.probabilities()


