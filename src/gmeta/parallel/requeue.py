"""Stopping on a signal at a meta-step boundary: checkpoint, then exit non-zero (or requeue on SLURM).

A signal handler runs wherever the process happens to be, possibly inside a collective; saving
there (as Lightning's ``SLURMEnvironment(auto_requeue=True)`` does) would start a gather on one rank
while another is inside a lookup's AlltoAll. Lightning's own SIGTERM handling broadcasts inside the
handler and ends the run with ``SystemExit(0)``: a scheduler would see success.

``StopOnSignal`` only sets a flag in the handler. After every meta-step (and at the end of an
epoch, after its validation), all ranks agree on the flags (one small all_reduce; a signal sent
to one rank stops them all), save the latest state together, and raise ``TrainingInterrupted``: a
``SystemExit`` with status 128 + the signal number (SIGTERM 143, SIGINT 130, SIGUSR1 138), as a
shell reports a process killed by that signal. A checkpoint written after the epoch's last step
but before its validation would make a resume skip that validation, so a signal during the last
step waits for the epoch's end. Resuming from the saved ``last.ckpt`` continues exactly
(``gmeta.checkpointing``). A second SIGINT (Ctrl-C twice) interrupts at once, without a checkpoint.
A test run stops the same way after its current batch, with nothing to save.

``SlurmRequeue`` is the SLURM flavour: SLURM sends ``--signal=USR1@<seconds>`` before the time
limit; it saves Lightning's ``hpc_ckpt_<n>.ckpt`` (which Lightning resumes from when SLURM restarts
the job), runs ``scontrol requeue`` on rank 0 and exits with 138.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gmeta.checkpointing import LAST, LastCheckpoint, at_epoch_end

log = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; the exit status is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        where = f"; resume with ckpt_path={self.checkpoint}" if self.checkpoint else ""
        return f"training stopped by {signal.Signals(self.signum).name} (exit status {self.code}){where}"


def _signum(name: str) -> signal.Signals:
    return signal.Signals["SIG" + name.upper().removeprefix("SIG")]


class StopOnSignal(L.Callback):
    """On any of ``signals``: checkpoint at the next meta-step boundary and exit with 128 + signal.

    Args:
        signals: signal names (``TERM``, ``INT``, ``USR1`` ...).
        requeue: after saving, run ``scontrol requeue $SLURM_JOB_ID`` on rank 0 (SLURM).
        hpc_checkpoint: save Lightning's ``hpc_ckpt_<n>.ckpt`` in the run folder (what Lightning resumes
            from when SLURM restarts a job) instead of ``last.ckpt``.
    """

    def __init__(
        self,
        signals: list[str] | tuple[str, ...] = ("TERM", "INT"),
        requeue: bool = False,
        hpc_checkpoint: bool = False,
    ) -> None:
        self.signums = [_signum(s) for s in signals]
        self.requeue = requeue
        self.hpc_checkpoint = hpc_checkpoint
        self.received: list[int] = []  # signals seen by this process, in arrival order
        self._previous: dict[int, Any] = {}

    # -- handlers (only flags: no collective may run inside a signal handler) ----------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signum in self.received:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        self.received.append(signum)
        log.warning("received %s: stopping at the next meta-step boundary", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _install(self) -> None:
        for s in self.signums:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handler)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    # Installed once training runs: Lightning installs its own SIGTERM handler just before.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # A test run (after fit, or eval.py) stops too: nothing to save, but never a success status.
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signum = self._agreed_signal(trainer, pl_module.device)
        if signum:
            raise TrainingInterrupted(signum, None)

    # -- the step boundary -------------------------------------------------------------------------
    def _agreed_signal(self, trainer: L.Trainer, device: torch.device) -> int:
        """The signal any rank received (the same answer on every rank: a collective), or 0."""
        flags = torch.zeros(len(self.signums), device=device)
        for i, s in enumerate(self.signums):
            flags[i] = float(s in self.received)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        hit = [s for s, f in zip(self.signums, flags.tolist(), strict=True) if f > 0]
        if not hit:
            return 0
        mine = [s for s in self.received if s in hit]
        return int(mine[0] if mine else hit[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not at_epoch_end(trainer):  # the epoch's last step: wait for its validation (docstring)
            self._stop_if_signalled(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer, pl_module)

    def _stop_if_signalled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self._agreed_signal(trainer, pl_module.device)
        if not signum:
            return
        path = self._save(trainer)
        if self.requeue:
            self._requeue(trainer)
        raise TrainingInterrupted(signum, path)

    def _save(self, trainer: L.Trainer) -> Path:
        if self.hpc_checkpoint:
            path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            trainer.save_checkpoint(path)  # every rank: gathers the sharded tables
        else:
            # Trainer.callbacks is set by its CallbackConnector, so Lightning does not type it
            callbacks = trainer.callbacks  # type: ignore[attr-defined]
            last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
            if last is not None:
                path = last.save(trainer)
            else:
                path = Path(trainer.default_root_dir) / "checkpoints" / LAST
                trainer.save_checkpoint(path)
        log.warning("saved %s at global step %d", path, trainer.global_step)
        return path

    def _requeue(self, trainer: L.Trainer) -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
            else:
                log.warning("requeued SLURM job %s", job)


class SlurmRequeue(StopOnSignal):
    """SLURM pre-emption / time limit: on ``signal_name`` (sbatch ``--signal=USR1@...``) save
    ``hpc_ckpt_<n>.ckpt`` at the next meta-step boundary, requeue the job, exit with 128 + signal.

    Args:
        signal_name: the signal SLURM sends (``USR1`` to match ``--signal=USR1@...``).
        requeue: run ``scontrol requeue`` on rank 0 (False: only checkpoint and stop).
    """

    def __init__(self, signal_name: str = "USR1", requeue: bool = True) -> None:
        super().__init__(signals=(signal_name,), requeue=requeue, hpc_checkpoint=True)

    @property
    def signum(self) -> signal.Signals:
        return self.signums[0]
