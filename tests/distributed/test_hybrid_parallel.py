"""HybridParallelStrategy on 1, 2 and 4 gloo processes: exactly one process's results, counted
collectives, reshardable checkpoints, and bad input / failing ranks that end every rank quickly.

Each group is a set of real processes (``launch.run_group`` -> ``worker.py``) running the real
LightningModule under the real strategy in float64 on the same global meta-batches (8 tasks each,
split into contiguous blocks of tasks per rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import log_tail, run_group

ALGOS = ["maml", "fomaml", "none"]
STEPS = 5


def _ok(group: dict, out: Path) -> dict:
    for rank, code in enumerate(group["codes"]):
        assert code == 0, f"rank {rank} failed:\n{log_tail(out, rank)}"
    return group["results"]


def global_losses(results: dict, algo: str) -> torch.Tensor:
    """Per-step global loss: the ranks' losses weighted by their loss weights (real tasks/samples)."""
    per_rank = [results[r]["result"][algo]["losses"] for r in sorted(results)]
    out = []
    for step in zip(*per_rank, strict=True):
        total = sum(s["weight"] for s in step)
        out.append(sum(s["loss"] * s["weight"] for s in step) / total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[dict, Path]]:
    """5 meta-steps of maml / fomaml / none on 1, 2 and 4 processes."""
    base = tmp_path_factory.mktemp("hybrid")
    out = {}
    for world in (1, 2, 4):
        path = base / f"world{world}"
        group = run_group({"scenario": "train", "world": world, "algos": ALGOS, "steps": STEPS}, path)
        out[world] = (_ok(group, path), path)
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("algo", ALGOS)
def test_losses_and_every_parameter_match_one_process(runs, world, algo):
    ref_results, ref_dir = runs[1]
    results, out_dir = runs[world]
    ref_loss, loss = global_losses(ref_results, algo), global_losses(results, algo)
    assert loss.shape == (STEPS,)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    ref = torch.load(ref_dir / f"state_{algo}.pt")
    state = torch.load(out_dir / f"state_{algo}.pt")
    assert state.keys() == ref.keys()
    initial = ref["embedding.weight"].clone()
    for key in ref:  # dense weights, Adam-free buffers, the full table and its Adagrad state
        torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=1e-12, msg=key)
    assert "embedding.optimizer.sum_sq" in ref and bool((ref["embedding.optimizer.sum_sq"] > 0).any())
    del initial
