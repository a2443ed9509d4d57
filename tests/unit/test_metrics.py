"""Cold-start metrics (gmeta.metrics) and the JSON report (gmeta.report) against plain-Python references."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from gmeta.data.schema import STATES
from gmeta.metrics import METRIC_NAMES, ColdStartMetrics, per_task_auc
from gmeta.report import METRICS_FILENAME, write_metrics

# -- references (plain Python, no vectorisation) ------------------------------------------------


def brute_force_auc(scores: list[float], labels: list[float]) -> float:
    """Share of (positive, negative) pairs ranked correctly, ties counting one half; NaN without both."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y > 0.5]
    neg = [s for s, y in zip(scores, labels, strict=True) if y <= 0.5]
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for p in pos:
        for n in neg:
            if p > n:
                wins += 1.0
            elif p == n:
                wins += 0.5
    return wins / (len(pos) * len(neg))


def rank_auc(scores: list[float], labels: list[float]) -> float:
    """Mann-Whitney U from average ranks (ties share the mean of their ranks); NaN without both classes."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # ranks are 1-based
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    n_pos = sum(1 for y in labels if y > 0.5)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y > 0.5)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bce_with_logits(x: float, y: float) -> float:
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def assert_close_or_nan(actual: float, expected: float, tol: float = 1e-5) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), f"expected NaN, got {actual}"
    else:
        assert actual == pytest.approx(expected, abs=tol)


def random_scores(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Logits with many exact ties (a coarse grid) mixed with continuous values."""
    coarse = torch.randint(-3, 4, shape, generator=gen).float() / 2
    fine = torch.randn(shape, generator=gen) * 2
    use_coarse = torch.rand(shape, generator=gen) < 0.6
    return torch.where(use_coarse, coarse, fine)


# -- per_task_auc ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_task_auc_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    T, Q = 12, 9
    scores = random_scores(gen, (T, Q))
    labels = (torch.rand(T, Q, generator=gen) < 0.5).float()
    mask = torch.rand(T, Q, generator=gen) < 0.75
    labels[0] = 1.0  # single class (all positive)
    labels[1] = 0.0  # single class (all negative)
    mask[2] = False  # fully masked
    labels[3] = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 0])
    # task 3 keeps only positives
    mask[3] = torch.tensor([True, True, False, False, False, False, False, False, False])
    labels[4], mask[4] = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0, 1]), True
    scores[4] = 0.5  # every pair tied -> 0.5

    got = per_task_auc(scores, labels, mask)
    assert got.shape == (T,)
    for t in range(T):
        kept = [q for q in range(Q) if mask[t, q]]
        expected = brute_force_auc([float(scores[t, q]) for q in kept], [float(labels[t, q]) for q in kept])
        assert_close_or_nan(float(got[t]), expected, tol=1e-6)
    for t in range(4):
        assert math.isnan(float(got[t]))
    assert float(got[4]) == 0.5


def test_per_task_auc_known_values_and_masked_samples_ignored() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 9.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    got = per_task_auc(scores, labels, mask)
    assert float(got[0]) == 1.0
    # task 1: positives {0.0, 1.0} vs negative {1.0} -> (0 + 0.5) / 2; the masked 9.0 positive is ignored
    assert float(got[1]) == pytest.approx(0.25)
    # a masked sample's score must not matter
    scores2 = scores.clone()
    scores2[1, 3] = -100.0
    assert torch.equal(per_task_auc(scores2, labels, mask), got)


def test_per_task_auc_is_invariant_to_monotone_transform() -> None:
    gen = torch.Generator().manual_seed(5)
    scores = random_scores(gen, (6, 7)).double()
    labels = (torch.rand(6, 7, generator=gen) < 0.5).double()
    mask = torch.rand(6, 7, generator=gen) < 0.8
    a, b = per_task_auc(scores, labels, mask), per_task_auc(torch.sigmoid(scores), labels, mask)
    assert torch.allclose(a, b, equal_nan=True)


# -- ColdStartMetrics -----------------------------------------------------------------------------


class Reference:
    """Independent accumulation: per state, the kept (logit, label) samples and the real tasks' samples."""

    def __init__(self) -> None:
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self.tasks: dict[int, list[list[tuple[float, float]]]] = {}

    def update(self, logits, labels, mask, state, task_mask) -> None:
        T, Q = logits.shape
        for t in range(T):
            if not bool(task_mask[t]):
                continue
            code = int(state[t])
            kept = [(float(logits[t, q]), float(labels[t, q])) for q in range(Q) if bool(mask[t, q])]
            self.samples.setdefault(code, []).extend(kept)
            self.tasks.setdefault(code, []).append(kept)

    def compute(self) -> dict[str, dict[str, float]]:
        out = {}
        for code, name in enumerate(STATES):
            if code not in self.tasks:
                continue
            samples = self.samples[code]
            xs, ys = [x for x, _ in samples], [y for _, y in samples]
            # the metric ranks sigmoid(logit) in float32: do the same so that saturation ties agree
            probs = torch.sigmoid(torch.tensor(xs, dtype=torch.float32)).tolist()
            task_aucs = [brute_force_auc([x for x, _ in t], [y for _, y in t]) for t in self.tasks[code]]
            task_aucs = [a for a in task_aucs if not math.isnan(a)]
            logloss = sum(bce_with_logits(x, y) for x, y in samples) / len(samples) if samples else math.nan
            out[name] = {
                "auc": rank_auc(probs, ys),
                "logloss": logloss,
                "gauc": sum(task_aucs) / len(task_aucs) if task_aucs else math.nan,
                "tasks": len(self.tasks[code]),
                "samples": len(samples),
                "gauc_tasks": len(task_aucs),
            }
        return out


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for state, exp in expected.items():
        assert set(got[state]) == set(METRIC_NAMES) | {"gauc_tasks"}
        for key in ("tasks", "samples", "gauc_tasks"):
            assert got[state][key] == exp[key], (state, key)
            assert isinstance(got[state][key], int)
        for key in ("auc", "logloss", "gauc"):
            assert_close_or_nan(got[state][key], exp[key])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cold_start_metrics_match_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    metric, ref = ColdStartMetrics(), Reference()
    # real tasks only ever get states 0, 1, 3; dummy tasks also get state 2 ("item_cold"), which must
    # therefore be absent from the result
    real_states = torch.tensor([0, 1, 3])
    for _ in range(4):
        T, Q = rng.randint(3, 8), rng.randint(2, 10)
        logits = random_scores(gen, (T, Q))
        labels = (torch.rand(T, Q, generator=gen) < 0.4).float()
        mask = torch.rand(T, Q, generator=gen) < 0.7
        state = real_states[torch.randint(0, 3, (T,), generator=gen)]
        task_mask = torch.rand(T, generator=gen) < 0.7
        task_mask[0] = True
        mask[1] = False  # a fully masked task (real or dummy)
        labels[2 % T] = 1.0  # a single-class task
        n_dummy = rng.randint(1, 3)  # dummy tasks padding the batch: random content, state 2
        logits = torch.cat([logits, 50 * torch.randn(n_dummy, Q, generator=gen)])
        labels = torch.cat([labels, (torch.rand(n_dummy, Q, generator=gen) < 0.5).float()])
        mask = torch.cat([mask, torch.ones(n_dummy, Q, dtype=torch.bool)])
        state = torch.cat([state, torch.full((n_dummy,), 2)])
        task_mask = torch.cat([task_mask, torch.zeros(n_dummy, dtype=torch.bool)])
        metric.update(logits, labels, mask, state, task_mask)
        ref.update(logits, labels, mask, state, task_mask)

    got, expected = metric.compute(), ref.compute()
    assert "item_cold" not in got
    assert set(got) <= {"warm", "user_cold", "user_item_cold"} and got
    assert_metrics_equal(got, expected)
    # counts are consistent with the inputs
    assert sum(v["tasks"] for v in got.values()) == sum(len(t) for t in ref.tasks.values())


def test_cold_start_metrics_known_values() -> None:
    """A hand-checked batch: task counts, NaN for single-class / empty states, dummy tasks ignored."""
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.0],  # warm: labels 1, 0, 1 -> AUC 1.0
            [0.0, 1.0, 5.0],  # warm: labels 0, 1, masked -> AUC 1.0
            [1.0, 1.0, 1.0],  # user_cold, positives only -> single class
            [3.0, 3.0, 3.0],  # item_cold: fully masked
            [9.0, -9.0, 9.0],  # dummy (user_item_cold): ignored
        ]
    )
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 0], [0, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    state = torch.tensor([0, 0, 1, 2, 3])
    task_mask = torch.tensor([True, True, True, True, False])
    metric = ColdStartMetrics()
    metric.update(logits, labels, mask, state, task_mask)
    got = metric.compute()
    assert set(got) == {"warm", "user_cold", "item_cold"}

    warm = got["warm"]
    # pooled warm samples: scores 2,-1,0,0,1 labels 1,0,1,0,1 -> pos {2,0,1} vs neg {-1,0}: 5.5 / 6
    assert warm["auc"] == pytest.approx(5.5 / 6)
    xs, ys = [2.0, -1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0]
    assert warm["logloss"] == pytest.approx(
        sum(bce_with_logits(x, y) for x, y in zip(xs, ys, strict=True)) / 5, abs=1e-6
    )
    assert warm["gauc"] == pytest.approx(1.0)
    assert (warm["tasks"], warm["samples"], warm["gauc_tasks"]) == (2, 5, 2)

    cold = got["user_cold"]
    assert math.isnan(cold["auc"]) and math.isnan(cold["gauc"])
    assert cold["logloss"] == pytest.approx(bce_with_logits(1.0, 1.0), abs=1e-6)
    assert (cold["tasks"], cold["samples"], cold["gauc_tasks"]) == (1, 3, 0)

    item = got["item_cold"]  # a real task with no kept sample: counted, but every score is NaN
    assert math.isnan(item["auc"]) and math.isnan(item["logloss"]) and math.isnan(item["gauc"])
    assert (item["tasks"], item["samples"], item["gauc_tasks"]) == (1, 0, 0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_cold_start_metrics_fresh_and_reset() -> None:
    metric = ColdStartMetrics()
    assert metric.compute() == {}
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, generator=gen), (torch.rand(4, 5, generator=gen) < 0.5).float()
    mask, state = torch.ones(4, 5, dtype=torch.bool), torch.tensor([0, 1, 2, 3])
    metric.update(logits, labels, mask, state, torch.ones(4, dtype=torch.bool))
    assert set(metric.compute()) == set(STATES)
    metric.reset()
    assert metric.compute() == {}
    # only dummy tasks: nothing to report
    metric.update(logits, labels, mask, state, torch.zeros(4, dtype=torch.bool))
    assert metric.compute() == {}


def test_cold_start_metrics_split_across_updates_equals_one_update() -> None:
    gen = torch.Generator().manual_seed(7)
    T, Q = 10, 6
    logits = random_scores(gen, (T, Q))
    labels = (torch.rand(T, Q, generator=gen) < 0.5).float()
    mask = torch.rand(T, Q, generator=gen) < 0.8
    state = torch.randint(0, len(STATES), (T,), generator=gen)
    task_mask = torch.ones(T, dtype=torch.bool)
    whole, parts = ColdStartMetrics(), ColdStartMetrics()
    whole.update(logits, labels, mask, state, task_mask)
    for sl in (slice(0, 3), slice(3, 4), slice(4, T)):
        parts.update(logits[sl], labels[sl], mask[sl], state[sl], task_mask[sl])
    a, b = whole.compute(), parts.compute()
    assert set(a) == set(b)
    for s in a:
        for k in a[s]:
            assert_close_or_nan(b[s][k], a[s][k], tol=1e-6)


# -- report ---------------------------------------------------------------------------------------


def test_write_metrics_json(tmp_path) -> None:
    metric = ColdStartMetrics()
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=gen)
    labels = torch.tensor([[1.0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 1]])
    state = torch.tensor([3, 1, 0, 2, 0])
    metric.update(logits, labels, torch.ones(5, 4, dtype=torch.bool), state, torch.ones(5, dtype=torch.bool))
    per_state = metric.compute()
    assert math.isnan(per_state["user_cold"]["auc"])  # the single-class task gives NaNs to serialise
    records = [
        {"state": s, "method": m, "adapted": a, **v}
        for m in ("maml", "none")
        for a in (True, False)
        for s, v in per_state.items()
    ]
    random.Random(0).shuffle(records)

    path = write_metrics(records, tmp_path)
    assert path == tmp_path / METRICS_FILENAME

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-JSON constant {name} in the metrics file")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert isinstance(data, list) and len(data) == len(records)
    required = {"state", "method", "adapted", "auc", "logloss", "gauc", "tasks", "samples"}
    for rec in data:
        assert required <= set(rec)
    order = [STATES.index(r["state"]) for r in data]
    assert order == sorted(order)
    assert [(r["state"], r["method"], r["adapted"]) for r in data] == sorted(
        ((r["state"], r["method"], r["adapted"]) for r in records),
        key=lambda k: (STATES.index(k[0]), k[1], k[2]),
    )
    for rec in data:
        src = per_state[rec["state"]]
        for key in ("auc", "logloss", "gauc"):
            if math.isnan(src[key]):
                assert rec[key] is None
            else:
                assert rec[key] == pytest.approx(src[key])
        assert (rec["tasks"], rec["samples"]) == (src["tasks"], src["samples"])
    assert [r for r in data if r["state"] == "user_cold"][0]["gauc"] is None
