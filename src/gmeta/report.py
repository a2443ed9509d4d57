"""Cold-start results: a printed table and the machine-readable ``cold_start_metrics.json``.

A record is one (state, method, adapted) row: ``{"state", "method", "adapted", "auc", "logloss",
"gauc", "tasks", "samples", "gauc_tasks"}`` (see ``gmeta.metrics.ColdStartMetrics``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gmeta.data.schema import STATES

METRICS_FILENAME = "cold_start_metrics.json"


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def sort_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (STATES.index(r["state"]), r["method"], r["adapted"]))


#: columns of a record as shown in tables (printed and Markdown)
RECORD_COLUMNS: tuple[str, ...] = ("state", "method", "adapted", "auc", "logloss", "gauc", "tasks", "samples")


def record_cells(r: dict[str, Any], method_suffix: str = "") -> tuple[str, ...]:
    """One record as the strings of ``RECORD_COLUMNS``."""
    return (
        r["state"],
        r["method"] + method_suffix,
        "yes" if r["adapted"] else "no",
        _fmt(r["auc"]),
        _fmt(r["logloss"]),
        _fmt(r["gauc"]),
        str(r["tasks"]),
        str(r["samples"]),
    )


def metrics_table(records: Sequence[dict[str, Any]], title: str = "cold-start metrics") -> Table:
    table = Table(title=title)
    for col in RECORD_COLUMNS:
        table.add_column(col, justify="left" if col in ("state", "method") else "right")
    for r in sort_records(records):
        table.add_row(*record_cells(r))
    return table


def print_metrics(records: Sequence[dict[str, Any]], title: str = "cold-start metrics") -> None:
    Console().print(metrics_table(records, title))


def write_metrics(records: Sequence[dict[str, Any]], output_dir: str | Path) -> Path:
    """Write the records as JSON (NaN -> null) into ``output_dir/cold_start_metrics.json``."""
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in sort_records(records)
    ]
    path = Path(output_dir) / METRICS_FILENAME
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
