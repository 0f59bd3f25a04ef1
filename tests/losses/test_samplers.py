"""Samplers: over many epochs the drawn class frequencies match each strategy's target."""

from __future__ import annotations

import numpy as np
import pytest

from welde_det.losses.samplers import (
    ClassBalancedSampler,
    InstanceBalancedSampler,
    ProgressivelyBalancedSampler,
    RepeatFactorSampler,
    SquareRootSampler,
    build_detection_sampler,
    build_sampler,
    repeat_factors,
)

LABELS = np.repeat(np.arange(4), [800, 150, 40, 10])  # 80 : 15 : 4 : 1
TOL = 0.01  # absolute tolerance on class frequency over 20 epochs x 1000 draws


def _empirical(sampler, epochs=20):
    counts = np.zeros(4)
    for e in range(epochs):
        sampler.set_epoch(e)
        counts += np.bincount(LABELS[list(sampler)], minlength=4)
    return counts / counts.sum()


@pytest.mark.parametrize(("cls", "target"), [
    (InstanceBalancedSampler, np.array([800, 150, 40, 10]) / 1000),
    (ClassBalancedSampler, np.full(4, 0.25)),
    (SquareRootSampler, np.sqrt([800, 150, 40, 10]) / np.sqrt([800, 150, 40, 10]).sum()),
])
def test_class_frequency_matches_target(cls, target):
    freq = _empirical(cls(LABELS, seed=3))
    assert np.abs(freq - target).max() < TOL


def test_progressive_interpolates_over_epochs():
    s = ProgressivelyBalancedSampler(LABELS, total_epochs=10, num_samples=20000, seed=0)
    ib = np.array([800, 150, 40, 10]) / 1000
    for epoch, t in ((0, 0.0), (5, 0.5), (10, 1.0)):
        s.set_epoch(epoch)
        target = (1 - t) * ib + t * 0.25
        assert s.probabilities() == pytest.approx(target)
        counts = np.bincount(LABELS[list(s)], minlength=4)
        assert np.abs(counts / counts.sum() - target).max() < TOL


def test_deterministic_per_seed_and_epoch():
    a, b = ClassBalancedSampler(LABELS, seed=7), ClassBalancedSampler(LABELS, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_repeat_factors_formula():
    # 10 images; class 0 in all, class 1 in one image -> f = 1.0 and 0.1
    images = [[0]] * 9 + [[0, 1]]
    r = repeat_factors(images, threshold=0.4)
    assert r[:9] == pytest.approx([1.0] * 9)
    assert r[9] == pytest.approx(np.sqrt(0.4 / 0.1))
    assert repeat_factors([[], [0]], 0.4)[0] == 1.0


def test_repeat_factor_sampler_expected_repeats():
    images = [[0]] * 90 + [[1]] * 10
    s = RepeatFactorSampler(images, threshold=0.5, seed=0)
    expected_rare = np.sqrt(0.5 / 0.1)
    draws = np.zeros(100)
    for e in range(200):
        s.set_epoch(e)
        draws += np.bincount(list(s), minlength=100)
    assert draws[90:].mean() / 200 == pytest.approx(expected_rare, rel=0.03)
    assert draws[:90].mean() / 200 == pytest.approx(1.0)


def test_build_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("balanced", LABELS)
    with pytest.raises(ValueError, match="non-negative integer"):
        build_sampler("class", [0.5, 1.0])
    assert isinstance(build_sampler("progressive", LABELS, total_epochs=3), ProgressivelyBalancedSampler)


def _long_tailed_images(seed: int = 0) -> list[list[int]]:
    """200 images: class 0 in 160, class 1 in 30, class 2 in 8, class 3 in 2 (some shared), 10 empty."""
    rng = np.random.default_rng(seed)
    images: list[list[int]] = [[] for _ in range(200)]
    for c, n in ((0, 160), (1, 30), (2, 8), (3, 2)):
        for i in rng.choice(190, size=n, replace=False):
            images[i].append(c)
    return images


def test_repeat_factor_frequencies_match_r_over_sum_r():
    """Over E epochs image i is drawn E·r_i times in expectation, so its share is r_i / Σ r.

    Tolerance: per epoch the count of image i is ⌊r_i⌋ + Bernoulli(r_i − ⌊r_i⌋), so its mean over
    E epochs lies within 5 standard deviations sqrt(p(1 − p) / E) of r_i (exactly r_i when r_i is
    an integer); the share of the draws is then within 2 % (relative) of r_i / Σ r.
    """
    images = _long_tailed_images()
    s = RepeatFactorSampler(images, threshold=0.1, seed=3)
    f = np.array([160, 30, 8, 2]) / 200
    r_class = np.maximum(1.0, np.sqrt(0.1 / f))
    r = np.array([max((r_class[c] for c in im), default=1.0) for im in images])
    np.testing.assert_allclose(s.factors, r)
    assert r.max() > 2 and (r == 1).sum() > 100  # long-tailed: rare images repeat, common ones do not
    epochs = 3000
    counts = np.zeros(len(images))
    for e in range(epochs):
        s.set_epoch(e)
        counts += np.bincount(list(s), minlength=len(images))
    p = r - np.floor(r)
    assert np.all(np.abs(counts / epochs - r) <= 5 * np.sqrt(p * (1 - p) / epochs) + 1e-12)
    np.testing.assert_allclose(counts / counts.sum(), s.expected_frequencies(), rtol=0.02)
    assert len(s) == round(r.sum())


def test_repeat_factor_sampler_advances_by_itself_and_shards_for_ddp():
    images = _long_tailed_images()
    a, b = RepeatFactorSampler(images, seed=1), RepeatFactorSampler(images, seed=1)
    first, second = list(a), list(a)  # no set_epoch: each pass is the next epoch's draw
    b.set_epoch(1)
    assert second == list(b) and first != second
    assert first == RepeatFactorSampler(images, seed=1).epoch_indices(0).tolist()
    shards = [RepeatFactorSampler(images, seed=1, num_replicas=3, rank=k) for k in range(3)]
    for sh in shards:
        sh.set_epoch(4)
    parts = [list(sh) for sh in shards]
    full = a.epoch_indices(4)
    assert len({len(x) for x in parts}) == 1 and sum(map(len, parts)) == len(full) + (-len(full) % 3)
    np.testing.assert_array_equal(np.concatenate([full, full[: -len(full) % 3]]).reshape(-1, 3).T.ravel(),
                                  np.concatenate(parts))
    with pytest.raises(ValueError, match="rank 3 is not in"):
        RepeatFactorSampler(images, num_replicas=3, rank=3)


def test_build_detection_sampler():
    images = _long_tailed_images()
    assert build_detection_sampler(None, images) is None
    assert build_detection_sampler("none", images) is None
    s = build_detection_sampler("repeat_factor", images, threshold=0.2, seed=5)
    assert isinstance(s, RepeatFactorSampler) and s.threshold == 0.2 and s.seed == 5
    with pytest.raises(ValueError, match="a classification sampler"):
        build_detection_sampler("class", images)
    with pytest.raises(ValueError, match="unknown detection sampler 'lvis'"):
        build_detection_sampler("lvis", images)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        build_detection_sampler("repeat_factor", images, threshold=0)
