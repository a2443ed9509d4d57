"""Start W worker processes (``worker.py``) as a torchrun-style gloo group and collect their results.

Each rank is a fresh ``python worker.py SPEC RANK`` with ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/
``RANK``/``LOCAL_RANK`` set, so Lightning sees an externally launched job and runs the real strategy
without re-executing pytest. Every group runs under a deadline: a hang fails the test, it never blocks CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parent / "worker.py"
ROOT = WORKER.parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(spec: dict[str, Any], out_dir: Path, deadline_s: float = 240.0) -> dict[str, Any]:
    """Run ``spec`` on ``spec['world']`` processes; returns per-rank results, exit codes and wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out_dir": str(out_dir)}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    world = spec["world"]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    start = time.monotonic()
    procs = []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(spec_path), str(rank)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=out_dir,
                ),
                log,
            )
        )
    codes: list[int | None] = []
    for proc, log in procs:
        remaining = deadline_s - (time.monotonic() - start)
        try:
            codes.append(proc.wait(timeout=max(remaining, 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
        log.close()
    hung = [r for r, c in enumerate(codes) if c is None]
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if hung:
        logs = "\n".join((out_dir / f"rank{r}.log").read_text()[-3000:] for r in hung)
        raise AssertionError(f"ranks {hung} still running after {deadline_s} s:\n{logs}")
    results = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else None
    return {"results": results, "codes": codes, "wall_s": time.monotonic() - start}


def log_tail(out_dir: Path, rank: int) -> str:
    return (out_dir / f"rank{rank}.log").read_text()[-4000:]
