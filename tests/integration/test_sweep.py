"""Hydra multirun: one output dir per job and a summary of every job's metrics in the sweep dir."""

from __future__ import annotations

import csv
from pathlib import Path

from entry_points import run_entry_point

from gmeta.data.schema import STATES


def test_multirun_writes_one_dir_per_job_and_a_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_entry_point(
        "train.py",
        "-m",
        "+experiment=synthetic_maml",
        "debug=fdr",
        "meta=maml,none",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp_path,
    )

    assert (sweep / "0" / "cold_start_metrics.json").is_file()
    assert (sweep / "1" / "cold_start_metrics.json").is_file()
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["job"], r["method"]) for r in rows} == {("0", "maml"), ("1", "none")}
    assert {r["state"] for r in rows} == set(STATES)
    assert len(rows) == 2 * len(STATES) * 2  # jobs x states x (adapted, not adapted)
    assert all("meta=" in r["overrides"] for r in rows)
