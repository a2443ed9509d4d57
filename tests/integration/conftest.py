"""ONE training run shared by the train, evaluation-report and serving tests.

``train.py +experiment=synthetic_maml`` runs once per session as a user runs it (a subprocess, every
output under a temporary folder), then ``eval.py`` once on its best checkpoint. Tests read the run
and eval folders and never write into them (a test that changes a file copies it first); further runs
go into folders of their own next to them, reusing the shards.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from entry_points import run_entry_point
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gmeta.data.schema import Schema
from gmeta.data.shards import read_manifest
from gmeta.data.tasks import TaskSplits, build_tasks
from helpers import EPOCHS, TrainedRun


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    tmp = tmp_path_factory.mktemp("trained_run")
    run_dir = tmp / "run"
    run_entry_point(
        "train.py",
        "+experiment=synthetic_maml",
        f"trainer.max_epochs={EPOCHS}",
        # the adaptation schedule is chosen on validation (a small grid: it runs in every session)
        # and stored in the best checkpoint, which eval.py and serving then adapt with
        "adaptation=auto",
        "adaptation.support_sizes=[1,5]",
        "adaptation.steps=[1]",
        "adaptation.lrs=[0.1,1.0]",
        "adaptation.groups=[[bottom,top]]",
        f"hydra.run.dir={run_dir}",
        tmp=tmp,
    )
    data_dir = tmp / "data" / "synthetic" / "shards"
    return TrainedRun(tmp=tmp, run_dir=run_dir, data_dir=data_dir, manifest=read_manifest(data_dir))


@pytest.fixture(scope="session")
def evaluated_run(trained_run: TrainedRun) -> Path:
    """``eval.py`` (metrics and report) on the shared run's best checkpoint; its output folder."""
    out = trained_run.tmp / "eval"
    run_entry_point(
        "eval.py",
        "data=synthetic",
        f"ckpt_path={trained_run.best_ckpt}",
        f"hydra.run.dir={out}",
        tmp=trained_run.tmp,
    )
    return out


@pytest.fixture(scope="session")
def run_table(trained_run: TrainedRun) -> tuple[pd.DataFrame, Schema]:
    """(raw interactions, raw Schema) the shared run built its shards from (its resolved data.source)."""
    cfg = OmegaConf.load(trained_run.run_dir / "config_resolved.yaml")
    return instantiate(cfg.data.source).load()


@pytest.fixture(scope="session")
def run_splits(trained_run: TrainedRun, run_table: tuple[pd.DataFrame, Schema]) -> TaskSplits:
    """The shared run's tasks from the pandas reference builder: the same tasks as its DuckDB build
    (tests/unit/test_build_engine.py), with each task's raw row indices (``.rows``)."""
    cfg = OmegaConf.load(trained_run.run_dir / "config_resolved.yaml")
    df, schema = run_table
    splits = build_tasks(df, schema, instantiate(cfg.data.task_config), seed=cfg.data.build_seed)
    counts = trained_run.manifest.data["counts"]["test"]
    for state, n in counts.items():  # guards the equivalence this fixture relies on
        assert sum(1 for r in splits.split("test") if r.state == state) == n["tasks"], state
    return splits
