"""One meta-learning task per user from raw support and candidate rows, and their batches.

A user's task holds the user's support rows (labelled, in time order: as training sorts a task's
interactions) as the support set and the candidates (in input order) as the query set, both
encoded by the training ``FeatureEncoder``. Tasks are grouped into ``TaskBatch``es of at most
``batch_users`` users, padded to the longest support / candidate list of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gmeta.data.batch import TaskBatch, TaskRecord, collate_tasks
from gmeta.data.encoder import EncodedRows, FeatureEncoder, show_value
from gmeta.data.schema import OOV_ID
from gmeta.serving import ServeError
from gmeta.serving.inputs import check_columns, first_true, row_where

log = logging.getLogger(__name__)


@dataclass
class UserTask:
    """One user's encoded task plus what the output needs.

    Attributes:
        key: the user's key value.
        record: the task (support = the user's support rows, query = the candidates).
        candidate_rows: positions of the user's candidates in the candidates table.
        support_size: number of support rows (0: the score is the un-adapted one).
        user_known: the user id has its own trained row (None: the task key is hashed or not a field).
    """

    key: str
    record: TaskRecord
    candidate_rows: np.ndarray
    support_size: int
    user_known: bool | None


def _support_order(support: pd.DataFrame, time: str | None, key: str, name: str) -> np.ndarray:
    """Row positions of ``support`` by time (stable: ties keep input order), or input order without time."""
    if not (time and time in support.columns and len(support)):
        return np.arange(len(support))
    t = support[time]
    if pd.api.types.is_datetime64_any_dtype(t):
        t = t.astype("int64")
    t = pd.to_numeric(t, errors="coerce")
    if t.isna().any():
        r = first_true(t.isna().to_numpy())
        raise ServeError(
            f"{row_where(name, support, key, r)}, column {time!r}: time {show_value(support[time].iloc[r])} "
            "is missing or not numeric (drop the column to keep the file's order)"
        )
    return np.argsort(t.to_numpy(), kind="stable")


def _groups(keys: np.ndarray, order: Sequence[int] | np.ndarray) -> dict[str, list[int]]:
    """Key value -> its row positions, in ``order``; keys in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i in order:
        out.setdefault(keys[i], []).append(int(i))
    return out


def build_user_tasks(
    support: pd.DataFrame,
    candidates: pd.DataFrame,
    encoder: FeatureEncoder,
    key: str,
    names: tuple[str, str] = ("support", "candidates"),
) -> list[UserTask]:
    """One task per user in ``candidates`` (first-appearance order), after validating both tables.

    Support users without candidates are skipped (logged). Raises ``ServeError`` (missing columns,
    keys, bad times) or ``EncodingError`` (a bad value) naming the table, row, user and column.
    """
    schema = encoder.schema
    sup_name, cand_name = names
    feats = [f.name for f in schema.fields]
    check_columns(support, list(dict.fromkeys([key, *feats, schema.label])), sup_name)
    check_columns(
        candidates,
        list(dict.fromkeys([key, *feats])),
        cand_name,
        hint="Candidate rows need every feature column: fill item columns from an item table (--items) "
        "and user columns from the support rows (--user-columns)",
    )
    support = support.reset_index(drop=True)
    candidates = candidates.reset_index(drop=True)
    for name, df in ((sup_name, support), (cand_name, candidates)):
        if df[key].isna().any():
            r = first_true(df[key].isna().to_numpy())
            raise ServeError(f"{name}: row {r}, column {key!r}: missing user key (NaN)")
    if len(candidates) == 0:
        raise ServeError(f"{cand_name}: no candidate rows")
    sup_enc = encoder.encode(support, key=key, name=sup_name, with_label=True)
    cand_enc = encoder.encode(candidates, key=key, name=cand_name, with_label=False)

    order = _support_order(support, schema.time, key, sup_name)
    sup_groups = _groups(support[key].astype(str).to_numpy(), order)
    cand_groups = _groups(candidates[key].astype(str).to_numpy(), range(len(candidates)))
    orphans = [k for k in sup_groups if k not in cand_groups]
    if orphans:
        log.warning(
            "%s: %d user(s) have no candidates and are skipped: %s", sup_name, len(orphans), orphans[:5]
        )

    # "known" = the user id has its own trained row; meaningless for a hashed id (always a bucket)
    task_key_col = next(
        (j for j, f in enumerate(schema.sparse) if f.name == schema.task_key and f.hash_buckets == 0), None
    )
    tasks = []
    for k, cand_rows in cand_groups.items():
        sup_rows = np.asarray(sup_groups.get(k, []), dtype=np.int64)
        q = np.asarray(cand_rows, dtype=np.int64)
        known = None if task_key_col is None else bool((cand_enc.sparse[q, task_key_col] != OOV_ID).all())
        record = TaskRecord(
            task_id=k,
            state="warm" if known else "user_cold",
            arrays={**_set_arrays("support", sup_enc, sup_rows), **_set_arrays("query", cand_enc, q)},
        )
        tasks.append(UserTask(k, record, q, len(sup_rows), known))
    return tasks


def _set_arrays(which: str, rows: EncodedRows, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {
        f"{which}.sparse": rows.sparse[idx],
        f"{which}.multi_hot": rows.multi_hot[idx],
        f"{which}.dense": rows.dense[idx],
        f"{which}.label": rows.label[idx],
    }


def task_batches(tasks: Sequence[UserTask], batch_users: int) -> Iterator[tuple[list[UserTask], TaskBatch]]:
    """(chunk of at most ``batch_users`` tasks, their collated ``TaskBatch``), in order."""
    if batch_users < 1:
        raise ValueError(f"batch_users must be >= 1, got {batch_users}")
    for start in range(0, len(tasks), batch_users):
        chunk = list(tasks[start : start + batch_users])
        yield chunk, collate_tasks([t.record for t in chunk])
