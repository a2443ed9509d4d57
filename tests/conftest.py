"""Shared fixtures for the data pipeline tests: small synthetic tables, tasks and shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmeta.data.shards import write_shards
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import TaskConfig, TaskSplits, build_tasks

#: Small ML-like data: ~120 users, enough new items for item-cold tasks, tasks of 8..40 interactions.
ML_SOURCE_KWARGS = dict(
    num_users=120, num_items=150, min_interactions=6, max_interactions=80, new_item_fraction=0.35, seed=3
)
SMALL_TASK_CONFIG = dict(min_interactions=8, max_interactions=40, query_size=4)


@pytest.fixture(scope="session")
def ml_synthetic_source() -> SyntheticSource:
    return SyntheticSource(**ML_SOURCE_KWARGS)


@pytest.fixture(scope="session")
def small_task_config() -> TaskConfig:
    return TaskConfig(**SMALL_TASK_CONFIG)


@pytest.fixture(scope="session")
def ml_table(ml_synthetic_source):
    """(interactions DataFrame, raw Schema) of the small ML-like synthetic source."""
    return ml_synthetic_source.load()


@pytest.fixture(scope="session")
def small_splits(ml_table, small_task_config) -> TaskSplits:
    df, schema = ml_table
    return build_tasks(df, schema, small_task_config, seed=0)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_splits, small_task_config) -> Path:
    """Shards of ``small_splits`` with 20 tasks per shard (train has several shards)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(small_splits, out, small_task_config, seed=0, tasks_per_shard=20)
    return out
