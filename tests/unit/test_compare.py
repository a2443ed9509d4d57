"""The comparison tool's statistics (gmeta.compare) against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from gmeta.compare import Predictions, bootstrap_aucs, interval, task_weights, weighted_auc


def reference_auc(scores, labels) -> float:
    """Pairwise definition: P(positive scores above negative), ties half (float64)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_reference_agrees_with_torchmetrics():
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=50), (rng.random(50) < 0.5).astype(float)
    tm = float(binary_auroc(torch.tensor(scores), torch.tensor(labels).long()))
    assert reference_auc(scores, labels) == pytest.approx(tm, abs=1e-6)


def test_weighted_auc_equals_the_auc_of_the_repeated_samples():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # rounded: many ties
    labels = (rng.random(200) < 0.4).astype(float)
    weights = rng.integers(0, 4, size=(3, 200)).astype(float)
    got = weighted_auc(scores, labels, np.vstack([np.ones(200), weights]))
    assert got[0] == pytest.approx(reference_auc(scores, labels), abs=1e-12)
    for row, w in zip(got[1:], weights, strict=True):
        rep = np.repeat(np.arange(200), w.astype(int))
        assert row == pytest.approx(reference_auc(scores[rep], labels[rep]), abs=1e-12)


def test_one_class_gives_nan():
    assert np.isnan(weighted_auc(np.arange(4.0), np.ones(4), np.ones((1, 4))))[0]


def test_task_weights_resample_whole_tasks():
    index = np.array([0, 0, 1, 2, 2, 2])
    w = task_weights(index, 3, replicates=50, rng=np.random.default_rng(1))
    assert (w[0] == 1).all()
    for row in w:  # the samples of one task share its count; counts sum to the number of tasks
        assert row[0] == row[1] and row[3] == row[4] == row[5]
        assert row[0] + row[2] + row[3] == 3


def test_paired_bootstrap_of_identical_methods_is_exactly_zero_and_detects_a_real_gap():
    rng = np.random.default_rng(2)
    tasks = np.repeat([f"u{i}" for i in range(60)], 10)
    label = (rng.random(600) < 0.5).astype(float)
    good = label + rng.normal(scale=1.0, size=600)
    bad = label + rng.normal(scale=3.0, size=600)
    state = np.ones(600, dtype=int)  # user_cold

    def preds(x):
        return Predictions(tasks, state, label, {0: x})

    aucs = bootstrap_aucs({"a": [preds(good)], "b": [preds(good)], "c": [preds(bad)]}, replicates=300)
    same = interval(aucs[("a", "user_cold", 0)] - aucs[("b", "user_cold", 0)])
    assert same.value == same.low == same.high == 0.0
    gap = interval(aucs[("a", "user_cold", 0)] - aucs[("c", "user_cold", 0)])
    assert gap.value > 0.1 and gap.excludes_zero()
    with pytest.raises(ValueError, match="other query samples"):
        bootstrap_aucs({"a": [preds(good)], "d": [Predictions(tasks[::-1], state, label, {0: good})]})
