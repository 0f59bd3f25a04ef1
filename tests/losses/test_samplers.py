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
