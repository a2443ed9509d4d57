"""A callback the SLURM tests add to a job (``+callbacks.trigger._target_=preempt_trigger.ScancelAtStep``):
SLURM itself signals or cancels the job at a known meta-step, instead of at a time limit.

On the job's first run only (``SLURM_RESTART_COUNT`` unset or 0), after meta-step ``step``, global
rank 0 runs ``scancel --signal=<signal> <job>``: slurmctld sends that signal to every task of the job,
as it sends USR1 ``signal_delay_s`` before a time limit (``#SBATCH --signal=USR1@...``). With
``signal=None`` it runs ``scancel <job>``: the job is cancelled (SIGTERM to every task, SIGKILL
``KillWait`` seconds later).
Every rank then waits (at most ``wait_s``) until the signal has arrived, so the job stops at the
NEXT meta-step boundary on every run of the test: the ``StopOnSignal``/``SlurmRequeue`` callbacks,
earlier in the callback list, have already looked at their flags for this step.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import lightning as L

from gmeta.parallel.requeue import StopOnSignal


def slurm_job_id() -> str:
    """The id ``scancel``/``scontrol`` take for this job (``<array job>_<task>`` for an array element)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


class ScancelAtStep(L.Callback):
    def __init__(self, step: int, signal: str | None = None, wait_s: float = 60.0) -> None:
        self.step = step
        self.scancel_args = [f"--signal={signal}"] if signal else []
        self.wait_s = wait_s

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        stoppers = [c for c in trainer.callbacks if isinstance(c, StopOnSignal)]
        if trainer.is_global_zero:
            subprocess.run(["scancel", *self.scancel_args, slurm_job_id()], check=True, timeout=30)
        deadline = time.monotonic() + self.wait_s
        while not any(c.requested for c in stoppers):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no signal from `scancel {' '.join(self.scancel_args)}` within {self.wait_s} s"
                )
            time.sleep(0.05)
