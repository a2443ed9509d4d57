"""Shared by the multi-process benchmarks (``bench_comm.py``, ``bench_checkpoint.py``): start one gloo
process per rank and wait for all of them, then print a result table and one JSON line per result.

Not a benchmark itself. Imported from ``scripts/`` (Python puts a script's folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def run_ranks(
    args: Sequence[str], world: int, deadline_s: float, what: str = "", quiet_others: bool = False
) -> None:
    """Run ``python <args> --rank r`` for r in 0..world-1 as one gloo group on this machine.

    One rank failing (or the deadline passing) kills the others at once: the survivors would
    otherwise wait in a collective until the process group's timeout. Raises ``SystemExit`` naming
    ``what`` and the exit codes. ``quiet_others``: only rank 0 writes to stdout.
    """
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    env.setdefault("PYTHONWARNINGS", "ignore")
    procs = [
        subprocess.Popen(
            [sys.executable, *args, "--rank", str(r)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "NODE_RANK": "0"},
            stdout=subprocess.DEVNULL if quiet_others and r else None,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + deadline_s
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    if any(codes):
        prefix = f"{what}: " if what else ""
        raise SystemExit(f"{prefix}a rank failed or timed out: exit codes {codes}")


@dataclass(frozen=True)
class Column:
    """One right- (``>``) or left- (``<``) aligned column: ``title`` above values in ``fmt``."""

    title: str
    width: int
    fmt: str = ""
    align: str = ">"


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> None:
    """A header line and one line per row, columns separated by one space."""
    print(" ".join(format(c.title, f"{c.align}{c.width}") for c in columns))
    for row in rows:
        print(" ".join(format(v, f"{c.align}{c.width}{c.fmt}") for c, v in zip(columns, row, strict=True)))


def emit_json_lines(lines: Sequence[dict[str, Any]], json_out: Path | None) -> None:
    """Print one JSON line per result (what tests and docs parse), and append them to ``json_out``."""
    for line in lines:
        print(json.dumps(line))
    if json_out:
        with json_out.open("a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
