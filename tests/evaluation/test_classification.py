"""Classification metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from welde_det.classes import ClassStats
from welde_det.evaluation.classification import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = 5
    y = rng.choice(c, size=200, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    logits = rng.normal(size=(200, c)) + 2.0 * np.eye(c)[y] * rng.random((200, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)  # ties in scores
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["macro_precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["macro_recall"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    np.testing.assert_allclose(m["per_class_f1"], skm.f1_score(y, pred, average=None, zero_division=0))
    ap = [skm.average_precision_score(y == k, probs[:, k]) for k in range(c)]
    np.testing.assert_allclose(m["per_class_ap"], ap, rtol=1e-12)
    assert m["map"] == pytest.approx(np.mean(ap))


def test_tail_map_and_absent_class():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05, 0.0]] * 3 + [[0.1, 0.8, 0.1, 0.0]] * 2 + [[0.2, 0.2, 0.6, 0.0]])
    stats = ClassStats(["a", "b", "c", "d"], [100, 50, 5, 1])
    m = classification_metrics(y, probs, class_stats=stats)
    assert m["tail_classes"] == ["c", "d"]
    assert m["tail_excluded"] == ["d"]
    assert m["per_class_ap"][3] == -1
    assert m["map_tail"] == pytest.approx(m["per_class_ap"][2]) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 3], np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classification_metrics([0, 1], np.ones((3, 3)))
