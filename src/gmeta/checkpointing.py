"""Checkpoint callbacks: ``last.ckpt`` as the latest state, best-checkpoint tracking across run folders.

* ``LastCheckpoint`` writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` meta-steps and at
  every epoch's end (after validation), whatever the monitored metric did: resuming from it loses
  at most ``every_n_train_steps`` steps. Lightning's ``ModelCheckpoint(save_last=True)`` rewrites
  ``last.ckpt`` only together with a monitored save, and skips an epoch-end save when a step save
  happened at the same global step (then ``last.ckpt`` would predate that epoch's validation).
* ``BestCheckpoint`` is Lightning's ``ModelCheckpoint`` whose tracking (best path and score, the
  top-k files and their scores) survives a resume in ANOTHER run folder. Lightning keeps only the
  best path there and forgets the score, so the first validation after the resume always counts as
  the best, however bad. The old files stay where they are and are never deleted from the new run
  (Lightning removes checkpoints only inside its own ``dirpath``).

What makes a resumed run continue bit for bit is the checkpoint's content: weights, optimizer and
row-optimizer state, Lightning's loop progress, these callbacks' state and the training data
position (``TaskDataModule.state_dict``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def at_epoch_end(trainer: L.Trainer) -> bool:
    """Whether the training step that just finished was the epoch's last one.

    A checkpoint written right after it, before that epoch's validation, would make a resume skip
    the validation (Lightning restarts such a checkpoint in the next epoch), so the step-boundary
    saves leave this step to the epoch-end save.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop.batch_progress.is_last_batch) or epoch_loop._num_ready_batches_reached()


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` meta-steps and at every epoch end.

    A ``Checkpoint`` callback, so Lightning runs it after the other callbacks, and after a
    ``ModelCheckpoint`` listed before it: the epoch-end ``last.ckpt`` includes that epoch's best-model
    update. Runs with ``fast_dev_run`` write nothing (as Lightning's checkpoint callbacks).

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: meta-steps between saves within an epoch (0: only at epoch ends).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 50) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: L.Trainer) -> Path:
        """Write ``last.ckpt`` now (every rank must call this: saving may gather sharded tables)."""
        trainer.save_checkpoint(self.path)
        log.debug("saved %s at global step %d", self.path, trainer.global_step)
        return self.path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        n = self.every_n_train_steps
        # Trainer.fast_dev_run is set outside the class (trainer/setup.py), so Lightning does not type it
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]
        if n and trainer.global_step % n == 0 and not at_epoch_end(trainer) and not fast_dev_run:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the epoch's validation (it runs inside the epoch loop) and the monitored save
        if not trainer.fast_dev_run:  # type: ignore[attr-defined]  # set outside Trainer: untyped
            self.save(trainer)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps its best/top-k tracking when a run resumes in another folder."""

    @property
    def state_key(self) -> str:
        # Lightning's own key: checkpoints written with a plain ModelCheckpoint restore into this one
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__) :]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict.get("dirpath", self.dirpath)
        if previous == self.dirpath:
            super().load_state_dict(state_dict)
            return
        # another folder: the scores stay valid, the files stay where they were written
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
        missing = [p for p in self.best_k_models if not Path(p).is_file()]
        log.info(
            "resumed from %s into %s: best checkpoint so far %s (%s=%s)",
            previous,
            self.dirpath,
            self.best_model_path,
            self.monitor,
            None if self.best_model_score is None else float(self.best_model_score),
        )
        if missing:
            log.warning(
                "checkpoints tracked as best by the resumed run are missing: %s; their scores still "
                "count, but testing the best checkpoint will fail if one of them stays the best",
                missing,
            )
