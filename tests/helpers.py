"""Helpers shared by the test folders (importable as ``helpers``: pytest puts ``tests/`` on sys.path
for ``tests/conftest.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gmeta.data.shards import Manifest


def records_by_key(path: Path) -> dict[tuple[str, bool], dict[str, Any]]:
    """A ``cold_start_metrics.json`` keyed by (cold-start state, adapted)."""
    records = json.loads(path.read_text())
    return {(r["state"], r["adapted"]): r for r in records}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint file as a dict (it holds more than tensors: not ``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=False)


#: epochs of the shared run (test_train checks the step count and the resume against it)
EPOCHS = 3


@dataclass(frozen=True)
class TrainedRun:
    """The session's shared ``train.py`` run (fixture ``trained_run``, tests/integration/conftest.py)."""

    tmp: Path  # paths.data_dir is tmp/data, paths.log_dir tmp/logs
    run_dir: Path  # hydra.run.dir: checkpoints/, csv/, tensorboard/, cold_start_metrics.json, ...
    data_dir: Path  # the task shards the run built (manifest.json, vocab.parquet)
    manifest: Manifest

    @property
    def last_ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def best_ckpt(self) -> Path:
        """The monitored best (save_top_k=1: the only epoch_*.ckpt)."""
        best = sorted((self.run_dir / "checkpoints").glob("epoch_*.ckpt"))
        assert len(best) == 1, best
        return best[0]
