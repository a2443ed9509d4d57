"""eval.py's report: Markdown + PNG plots + AUC vs support size, on the shared synthetic run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gmeta.data.batch import SetBatch, TaskBatch, truncate_support
from gmeta.data.schema import STATES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZES = ("1", "3", "5", "10", "all")


@pytest.fixture(scope="module")
def eval_dir(evaluated_run: Path) -> Path:
    """eval.py's output folder on the shared run's best checkpoint (tests/integration/conftest.py)."""
    return evaluated_run


def test_report_and_pngs_exist(eval_dir: Path) -> None:
    report = (eval_dir / "report.md").read_text()
    for name in ("curves.png", "auc_by_state.png", "auc_vs_support.png"):
        data = (eval_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, name
        assert f"]({name})" in report
    assert "AUC vs support size" in report and "k=all" in report


def test_support_size_metrics(eval_dir: Path) -> None:
    support = json.loads((eval_dir / "support_size_metrics.json").read_text())
    by_key = {(str(r["support_size"]), r["state"]): r for r in support}
    assert set(by_key) == {(k, s) for k in SIZES for s in STATES}
    adapted = {
        r["state"]: r for r in json.loads((eval_dir / "cold_start_metrics.json").read_text()) if r["adapted"]
    }
    for state in STATES:
        full = by_key[("all", state)]
        # k=all is the test path's adapted evaluation: same tasks, same numbers
        for name in ("auc", "logloss", "gauc"):
            assert full[name] == pytest.approx(adapted[state][name], abs=1e-6), (state, name)
        used = []
        for k in SIZES:
            r = by_key[(k, state)]
            # the query sets are untouched: same tasks and samples for every k
            assert (r["tasks"], r["samples"]) == (adapted[state]["tasks"], adapted[state]["samples"])
            if k != "all":
                assert r["support_samples"] <= int(k) * r["tasks"]
            used.append(r["support_samples"])
        assert used == sorted(used) and used[0] > 0, (state, used)


def _set(mask: torch.Tensor) -> SetBatch:
    t, n = mask.shape
    return SetBatch(
        sparse=torch.arange(t * n * 2).reshape(t, n, 2),
        multi_hot=torch.zeros(t, n, 1, 3, dtype=torch.long),
        dense=torch.rand(t, n, 1),
        label=torch.rand(t, n).round(),
        mask=mask,
    )


def test_truncate_support_keeps_first_k_real_samples() -> None:
    support_mask = torch.tensor(
        [[True, True, True, True, True], [True, True, False, False, False], [False] * 5], dtype=torch.bool
    )
    query_mask = torch.tensor([[True, True], [True, False], [False, False]])
    batch = TaskBatch(
        support=_set(support_mask.clone()),
        query=_set(query_mask.clone()),
        state=torch.tensor([0, 1, 0]),
        task_mask=torch.tensor([True, True, False]),
        task_ids=["a", "b", ""],
    )
    out = truncate_support(batch, 3)
    expected = torch.tensor(
        [[True, True, True, False, False], [True, True, False, False, False], [False] * 5]
    )
    assert torch.equal(out.support.mask, expected)  # task 1 has fewer than k: keeps both
    assert torch.equal(batch.support.mask, support_mask)  # input not mutated
    assert out.query is batch.query and torch.equal(out.query.mask, query_mask)
    for name in ("sparse", "multi_hot", "dense", "label"):
        assert torch.equal(getattr(out.support, name), getattr(batch.support, name))
    assert out.task_ids == batch.task_ids and torch.equal(out.state, batch.state)
    assert torch.equal(truncate_support(batch, 1).support.mask.sum(1), torch.tensor([1, 1, 0]))
    assert truncate_support(batch, None) is batch
