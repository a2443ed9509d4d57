"""Hydra multirun: one output dir per job and a summary of every job's metrics in the sweep dir."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from gmeta.data.schema import STATES

ROOT = Path(__file__).resolve().parents[2]


def test_multirun_writes_one_dir_per_job_and_a_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "+experiment=synthetic_maml",
        "debug=fdr",
        "meta=maml,none",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
        "callbacks.progress_bar=null",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert (sweep / "0" / "cold_start_metrics.json").is_file()
    assert (sweep / "1" / "cold_start_metrics.json").is_file()
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["job"], r["method"]) for r in rows} == {("0", "maml"), ("1", "none")}
    assert {r["state"] for r in rows} == set(STATES)
    assert len(rows) == 2 * len(STATES) * 2  # jobs x states x (adapted, not adapted)
    assert all("meta=" in r["overrides"] for r in rows)
