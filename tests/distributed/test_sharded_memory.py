"""A table of 16M rows x 64 float32 (4 GiB, + row-wise Adagrad state) on 4 gloo processes, checkpointed
sharded and resumed on 2: no process ever holds the whole table.

Peak resident memory (``ru_maxrss``) of every rank, measured in the worker. The issue asks for at
most 40% of the table's bytes; that holds where each rank owns a quarter (4 ranks). On 2 ranks each
rank OWNS half the table, so 40% is impossible there: the bound is its half plus 25% (the
interpreter, torch and Lightning, and the bounded read buffer), still far below the 100%+ a gathered
checkpoint needs. Slow (a few minutes, ~6 GB of RAM and 4 GB of disk): ``make test-all``.
"""

from __future__ import annotations

import pytest
from launch import log_tail, run_group

ROWS, DIM = 16_000_000, 64
VOCABS = (ROWS - 2_000, 1_000, 600, 400)  # 16M rows in all
TABLE_BYTES = ROWS * DIM * 4  # float32 weights alone (the Adagrad state adds 4 bytes per row)


@pytest.mark.slow
def test_sixteen_million_rows_train_checkpoint_and_resume_without_any_rank_holding_the_table(tmp_path):
    ckpt = tmp_path / "step3.ckpt"
    base = {
        "scenario": "memory",
        "algos": ["fomaml"],
        "vocabs": list(VOCABS),
        "dim": DIM,
        "float64": False,
        "checkpoint_format": "sharded",
        "timeout_s": 900,
    }
    groups = {
        4: {**base, "world": 4, "steps": 4, "save_at": 3, "ckpt": str(ckpt)},
        2: {**base, "world": 2, "steps": 4, "first_step": 3, "resume_from": str(ckpt)},
    }
    peaks = {}
    for world, spec in groups.items():
        out = tmp_path / f"w{world}"
        group = run_group(spec, out, deadline_s=1500)
        for rank, code in enumerate(group["codes"]):
            assert code == 0, f"{world} ranks, rank {rank} failed:\n{log_tail(out, rank)}"
        results = {r: group["results"][r]["result"]["fomaml"] for r in range(world)}
        peaks[world] = [results[r]["peak_rss"] for r in range(world)]
        print(f"{world} ranks: peak RSS / table bytes:", [f"{p / TABLE_BYTES:.1%}" for p in peaks[world]])
        assert sum(results[r]["local_rows"] for r in range(world)) == ROWS
        steps = [len(results[r]["losses"]) for r in range(world)]
        assert steps == [spec["steps"] - spec.get("first_step", 0)] * world, steps
        if world == 4:
            assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 4
    assert max(peaks[4]) <= 0.40 * TABLE_BYTES, peaks
    assert max(peaks[2]) <= 0.75 * TABLE_BYTES, peaks
