"""Which inner loop evaluation adapts with: the ``adaptation`` config group, as a Lightning callback.

``mode``:
    ``fixed``: the ``meta`` config's inner loop for every task (a schedule in the checkpoint is ignored);
    ``checkpoint``: the schedule stored in the checkpoint if it has one, else as ``fixed``;
    ``auto``: choose a schedule on the validation split (``gmeta.meta.schedule_search``) when testing
        starts, i.e. for the weights being tested; it is logged, written to
        ``<output_dir>/adaptation_schedule.json`` with every grid point's validation AUC, and (when a
        checkpoint file or directory is being tested, in training: the best one) stored in that
        checkpoint, so that ``eval.py`` and serving adapt the same way.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from gmeta.checkpoint_io import atomic_save
from gmeta.errors import ConfigError
from gmeta.meta.learner import MetaLearner
from gmeta.meta.schedule import SCHEDULE_KEY, AdaptationSchedule
from gmeta.meta.schedule_search import SearchSpace, search_schedule

log = logging.getLogger(__name__)

MODES = ("fixed", "checkpoint", "auto")
SCHEDULE_FILENAME = "adaptation_schedule.json"


def store_schedule(ckpt_path: str | Path, schedule: AdaptationSchedule) -> Path:
    """Add ``schedule`` to a checkpoint file (or a sharded checkpoint's ``meta.pt``), atomically."""
    from gmeta.parallel.sharded_checkpoint import META_FILE, is_sharded_checkpoint

    path = Path(ckpt_path)
    target = path / META_FILE if is_sharded_checkpoint(path) else path
    checkpoint = torch.load(target, map_location="cpu", weights_only=False)
    checkpoint[SCHEDULE_KEY] = schedule.to_dict()
    atomic_save(checkpoint, target)
    return target


class Adaptation(Callback):
    """Sets ``pl_module.learner.schedule`` when testing starts, per ``mode`` (module docstring).

    Args:
        mode: one of ``MODES``.
        output_dir: where ``adaptation_schedule.json`` goes (mode ``auto``).
        search: the ``SearchSpace`` fields (support_sizes, steps, lrs, groups, tolerance, per_state).
    """

    def __init__(self, mode: str = "fixed", output_dir: str | None = None, **search: Any) -> None:
        if mode not in MODES:
            raise ConfigError(f"adaptation.mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.output_dir = Path(output_dir) if output_dir else None
        self.space = SearchSpace.from_config(search)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        learner = cast(MetaLearner, pl_module.learner)  # a MetaDLRMModule's
        if self.mode == "fixed":
            learner.schedule = None
        elif self.mode == "auto":
            datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by fit/test(datamodule=)
            schedule, records = search_schedule(pl_module, datamodule.val_dataloader(), self.space)  # type: ignore[arg-type]
            learner.schedule = schedule
            if trainer.is_global_zero:
                self._save(schedule, records, trainer.ckpt_path)
        if learner.schedule is not None:
            log.info("adapting with the schedule %s", learner.schedule.describe())

    def _save(
        self, schedule: AdaptationSchedule, records: list[dict[str, Any]], ckpt: str | Path | None
    ) -> None:
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean = [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in records
            ]
            doc = {"schedule": schedule.to_dict(), "description": schedule.describe(), "grid": clean}
            (self.output_dir / SCHEDULE_FILENAME).write_text(json.dumps(doc, indent=2) + "\n")
        if ckpt and Path(ckpt).exists():
            log.info("stored the adaptation schedule in %s", store_schedule(ckpt, schedule))
