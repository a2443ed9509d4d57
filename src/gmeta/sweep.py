"""Hydra callback that summarises a multirun: one row per job with its final cold-start metrics.

Registered in ``conf/hydra/default.yaml``; at the end of ``python train.py -m ...`` it prints a table
and writes ``sweep_summary.csv`` into the sweep directory.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from gmeta.data.schema import STATES
from gmeta.report import METRICS_FILENAME

log = logging.getLogger(__name__)
SUMMARY_FILENAME = "sweep_summary.csv"


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (job, state, adapted) from every job directory holding a metrics file."""
    rows = []
    for metrics in sorted(sweep_dir.glob(f"*/{METRICS_FILENAME}"), key=lambda p: p.parent.name):
        job = metrics.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        # Hydra writes the job's command-line overrides as a YAML list of strings
        overrides: list[str] = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        for r in json.loads(metrics.read_text()):
            rows.append({"job": job.name, "overrides": " ".join(overrides), **r})
    return rows


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One line per job: the overrides that differ between jobs, then adapted AUC per state."""
    jobs: dict[str, dict[str, Any]] = {}
    for r in rows:
        job = jobs.setdefault(r["job"], {"overrides": r["overrides"].split()})
        if r["adapted"]:
            job[r["state"]] = r["auc"]
    common = set.intersection(*(set(j["overrides"]) for j in jobs.values()))
    table = Table(title=title)
    table.add_column("job")
    table.add_column("overrides")
    for state in STATES:
        table.add_column(f"{state} AUC (adapted)", justify="right")
    for name, job in jobs.items():
        differing = " ".join(o for o in job["overrides"] if o not in common)
        cells = ["-" if job.get(s) is None else f"{job[s]:.4f}" for s in STATES]
        table.add_row(name, differing, *cells)
    return table


def write_summary(sweep_dir: Path) -> Path | None:
    rows = collect_sweep(sweep_dir)
    if not rows:
        log.warning("no %s in any job of %s: nothing to summarise", METRICS_FILENAME, sweep_dir)
        return None
    path = sweep_dir / SUMMARY_FILENAME
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Console().print(summary_table(rows, title=f"sweep summary: {sweep_dir}"))
    return path


class SweepSummary(Callback):
    """Hydra callback: summarise every job's ``cold_start_metrics.json`` when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            log.info("wrote %s", path)
