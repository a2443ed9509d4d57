"""Run train.py / eval.py as a user would: a subprocess with every output under a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gmeta.parallel.launch import LAUNCH_ENV

ROOT = Path(__file__).resolve().parents[2]


def run_entry_point(script: str, *overrides: str, tmp: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (train.py or eval.py) with Hydra overrides; data and logs go under ``tmp``."""
    cmd = [
        sys.executable,
        str(ROOT / script),
        *overrides,
        f"paths.data_dir={tmp}/data",
        f"paths.log_dir={tmp}/logs",
    ]
    if script == "train.py":
        cmd.append("callbacks.progress_bar=null")  # keep the captured output small
    # without launcher variables a test process may have picked up: the run starts its own ranks
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PROJECT_ROOT=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc
