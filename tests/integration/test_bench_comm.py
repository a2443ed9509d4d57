"""scripts/bench_comm.py runs 2 real processes and reports the documented collectives (smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~14 s; tests/distributed audits the collectives of a meta-step (fast)
def test_bench_comm_reports_five_collectives_per_step_and_a_costlier_naive_design(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_comm.py"),
        "--experiment",
        "synthetic_maml",
        "--steps",
        "3",
        "--override",
        f"paths.data_dir={tmp_path}/data",
        "--override",
        f"paths.log_dir={tmp_path}/logs",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_design = {line["design"]: line for line in lines}
    ours, naive = by_design["gmeta"], by_design["naive"]
    assert ours["collectives_per_step"] == 5
    assert set(ours["by_tag"]) == {"lookup/header", "lookup/ids", "lookup/rows", "dense/grads", "rows/grads"}
    assert naive["collectives_per_step"] == 10  # synthetic_maml: 1 inner step
    assert naive["bytes_per_rank_step"] > ours["bytes_per_rank_step"] > 0
