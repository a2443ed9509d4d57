"""Starting the other ranks of a multi-process run from ``train.py``, also inside Hydra multirun.

Lightning's script launcher starts ranks 1..N-1 by re-running the command line. Under Hydra it
re-runs ``sys.argv`` plus ``hydra.run.dir=<run dir>``, which breaks multirun (``-m``) in two ways:

1. ``sys.argv`` still holds ``-m`` and the sweep lists, so each child starts a whole sweep of its own,
   and ``hydra.run.dir`` is the single-run template, not this job's sweep folder;
2. the launcher leaves ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` in the parent's environment, so the
   NEXT sweep job in the same process believes it was launched externally, starts no children and
   waits for them forever.

``HydraJobLauncher`` re-runs the script with THIS job's overrides (``HydraConfig.overrides.task``)
and output folder, and ``isolated_launch_env`` gives every job a clean environment and waits for the
job's children before the next job starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

import lightning.pytorch.strategies.launchers.subprocess_script as lightning_launcher

log = logging.getLogger(__name__)

#: what Lightning's launcher writes into the parent's environment
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(command, cwd) that runs rank ``local_rank`` of the current Hydra job (single run or sweep job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)  # this job's values, never the sweep lists
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # the children must not rewrite the job's .hydra/ files
    ]
    return command, get_original_cwd()


class HydraJobLauncher(lightning_launcher._SubprocessScriptLauncher):
    """Lightning's ``_SubprocessScriptLauncher`` with children that run exactly this Hydra job."""

    def _call_children_scripts(self) -> None:
        original = lightning_launcher._hydra_subprocess_cmd
        lightning_launcher._hydra_subprocess_cmd = hydra_job_command
        try:
            super()._call_children_scripts()
        finally:
            lightning_launcher._hydra_subprocess_cmd = original


def wait_for_children(launcher: object, timeout_s: float = 600.0) -> None:
    """Wait until the ranks this process launched have exited (they finish the same job)."""
    for proc in getattr(launcher, "procs", None) or []:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("rank process %d still running after %.0f s: killing it", proc.pid, timeout_s)
            proc.kill()
            code = proc.wait()
        if code != 0:
            log.warning("rank process %d exited with code %d", proc.pid, code)


@contextlib.contextmanager
def isolated_launch_env() -> Iterator[None]:
    """Restore the launch variables of ``os.environ`` after the block (one block per Hydra job)."""
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (before any process
    group exists): RANK (torchrun), SLURM_PROCID (srun), else NODE_RANK and LOCAL_RANK (Lightning's
    own launcher sets only these)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
