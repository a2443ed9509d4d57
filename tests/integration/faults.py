"""Fault injection for resume tests: a callback that kills (or signals) its own process at one point.

Used in-process (``how="raise"``: the run is abandoned as a kill would leave it) and by ``train.py``
subprocesses (``+callbacks.fault._target_=faults.KillAt``, with ``tests/integration`` on PYTHONPATH).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L

#: where a fault can strike (Lightning hooks)
HOOKS = (
    "train_batch_start",
    "train_batch_end",
    "validation_batch_start",
    "save_checkpoint",
    "train_epoch_end",
)


class Killed(BaseException):
    """The in-process stand-in for SIGKILL (a BaseException: nothing on the way catches it)."""


class KillAt(L.Callback):
    """Strike at ``hook`` when its counter reaches ``at``: the global step for training hooks, the
    epoch for validation and epoch-end hooks, the number of checkpoint saves so far for
    ``save_checkpoint`` (inside the save, before the file is written).

    Args:
        how: ``raise`` (``Killed``), or a signal name (``KILL``, ``TERM``, ``INT``) sent to this process.
        rank: the global rank that strikes (None: every rank).
    """

    def __init__(self, hook: str, at: int, how: str = "KILL", rank: int | None = None) -> None:
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.hook, self.at, self.how, self.rank = hook, int(at), how, rank
        self.saves = 0
        self.fired = False

    def _strike(self, trainer: L.Trainer, count: int) -> None:
        if self.fired or count != self.at or (self.rank is not None and trainer.global_rank != self.rank):
            return
        self.fired = True
        if self.how == "raise":
            raise Killed(f"{self.hook} at {self.at}")
        os.kill(os.getpid(), signal.Signals["SIG" + self.how])

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.hook == "train_batch_start":
            self._strike(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.hook == "train_batch_end":
            self._strike(trainer, trainer.global_step)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.hook == "validation_batch_start" and not trainer.sanity_checking:
            self._strike(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.hook == "train_epoch_end":
            self._strike(trainer, trainer.current_epoch)

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        if self.hook == "save_checkpoint":
            self.saves += 1
            self._strike(trainer, self.saves)
