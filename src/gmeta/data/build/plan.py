"""The hand-over between the relational stage and the partition writers (any engine).

A relational engine writes the encoded rows of every kept task (size within
``[min_interactions, max_interactions]``) as Parquet under ``parts_dir/part=<p>/``, with
``p = code % partitions``. Columns:

    code     int64    the task key's rank in sorted string order (the reference's task order)
    k        string   the task key's value (task ids: ``gmeta.data.tasks.task_id(k, state, win)``)
    state    int32    index into ``STATES`` (new user + 2 * new item)
    win      int64    -1 for a whole (key, state) history; under max_interactions_policy=window (or
                      train_window, warm histories only), the window of a longer history
                      (``gmeta.data.tasks.window_bounds``; 0 = oldest). Optional: a missing
                      column means -1 everywhere
    pos      int64    the row's position in its task (the history, or its window) by (time, input row)
    is_val   bool     the key's evaluation split: val (True) or test
    label    float32  the binarised label
    s<i>     int64    encoded id of sparse field i (0 = OOV)
    m<i>_<j> int64    id j of multi-hot field i's list (-1 = padding)
    d<i>     float32  dense field i
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmeta.data.encoder import FeatureEncoder
from gmeta.data.schema import Schema
from gmeta.data.tasks import TaskConfig


@dataclass(frozen=True)
class PlanColumns:
    """Names of the encoded feature columns, in model order."""

    sparse: tuple[str, ...]
    multi_hot: tuple[tuple[str, ...], ...]
    dense: tuple[str, ...]


def policy_conditions(cfg: TaskConfig) -> tuple[str, str]:
    """SQL conditions of ``max_interactions_policy`` shared by the relational plans (columns
    ``state``, ``n_all``, ``win``), as ``TaskConfig.windows`` / ``holds_out`` decide in the reference:
    (the row's (key, state) history is cut into windows, the row's task may yield a warm evaluation
    task)."""
    every = str(cfg.max_interactions_policy == "window").lower()
    warm_only = str(cfg.max_interactions_policy == "train_window").lower()
    windowed = f"(({every} OR ({warm_only} AND state = 0)) AND n_all > {cfg.max_interactions})"
    holds_out = f"({str(cfg.warm_eval).lower()} AND NOT ({warm_only} AND win >= 0))"
    return windowed, holds_out


def plan_columns(schema: Schema) -> PlanColumns:
    width = schema.max_multi_hot_len
    return PlanColumns(
        sparse=tuple(f"s{i}" for i in range(len(schema.sparse))),
        multi_hot=tuple(tuple(f"m{i}_{j}" for j in range(width)) for i in range(len(schema.multi_hot))),
        dense=tuple(f"d{i}" for i in range(len(schema.dense))),
    )


@dataclass
class PlanResult:
    """What the relational stage produced (see the module docstring).

    Attributes:
        parts_dir: folder holding ``part=<p>/*.parquet``.
        partitions: number of partitions (some may be empty).
        encoder: the fitted feature encoder (schema with vocabulary sizes, vocabularies, label rule).
        stats: interactions, task_keys, filtered, thresholds, positive_rate, vocab_sizes
            (``counts`` and ``warm_eval_held_out`` come from the partition writers).
        columns: the encoded column names.
    """

    parts_dir: Path
    partitions: int
    encoder: FeatureEncoder
    stats: dict[str, Any]
    columns: PlanColumns

    @property
    def schema(self) -> Schema:
        """The schema with vocabulary sizes."""
        return self.encoder.schema

    def part_dir(self, p: int) -> Path:
        return self.parts_dir / f"part={p}"
