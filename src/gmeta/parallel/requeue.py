"""SLURM pre-emption / time-limit handling that is safe with sharded tables.

SLURM sends a signal (``--signal=USR1@<seconds>``) some time before it kills a job. Lightning's own
``SLURMEnvironment(auto_requeue=True)`` saves a checkpoint *inside the signal handler*; with
``HybridParallelStrategy`` saving gathers the table shards (a collective), and a handler runs wherever
each rank happens to be — one rank may be inside a lookup's AlltoAll while another starts the gather,
so the collectives would not match. ``SlurmRequeue`` only sets a flag in the handler; after every
meta-step all ranks agree on the flag (one 1-element all_reduce), then all save Lightning's
``hpc_ckpt_<n>.ckpt`` together, rank 0 requeues the job with ``scontrol requeue`` and training stops.
When SLURM restarts the job, Lightning resumes from the newest ``hpc_ckpt_*.ckpt`` of the run folder.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class SlurmRequeue(L.Callback):
    """Checkpoint and requeue at the first meta-step boundary after ``signal`` arrives.

    Args:
        signal_name: the signal SLURM sends (``USR1`` to match ``--signal=USR1@...``).
        requeue: run ``scontrol requeue $SLURM_JOB_ID`` on rank 0 (False: only checkpoint and stop).
    """

    def __init__(self, signal_name: str = "USR1", requeue: bool = True) -> None:
        self.signum = signal.Signals["SIG" + signal_name.upper().removeprefix("SIG")]
        self.requeue = requeue
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True  # only a flag: no collective may run inside a signal handler

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = signal.signal(self.signum, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        log.warning("SLURM signal %s: saving %s and requeueing", self.signum.name, path)
        trainer.save_checkpoint(path)  # every rank: gathers the sharded tables
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        if self.requeue and trainer.is_global_zero and job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        trainer.should_stop = True
