"""Stage 2 of the out-of-core build: one partition of encoded rows -> TaskRecords -> tar shards.

Each partition holds whole task keys (``code % partitions``), so its tasks are complete. The rows
are sorted by (code, state, win, pos), cut into tasks, and turned into records exactly as
``gmeta.data.tasks.build_tasks`` does (the same warm-evaluation hold-out and the same
``_split_query``); train tasks are shuffled within the partition and every split is written in
shards of ``tasks_per_shard`` tasks. A worker holds one partition at a time.

With a single partition the shards are byte-identical to ``write_shards``' (same task order, same
train permutation, same record keys), which the tests use as a strong check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gmeta.data.batch import TaskRecord
from gmeta.data.build.plan import PlanColumns
from gmeta.data.checksums import sha256_file
from gmeta.data.schema import STATES
from gmeta.data.shards import write_tar
from gmeta.data.tasks import SPLITS, TaskConfig, _split_query, task_id

#: a task before its arrays are gathered: (task id, state, support rows, query rows)
Planned = tuple[str, str, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class PartitionJob:
    """Everything a worker process needs to write partition ``part`` (picklable)."""

    part: int
    partitions: int
    part_dir: Path
    out_dir: Path
    columns: PlanColumns
    task_config: TaskConfig
    seed: int
    tasks_per_shard: int


def _load(job: PartitionJob) -> tuple[dict[str, np.ndarray], pa.ChunkedArray] | None:
    """The partition's columns sorted by (code, state, win, pos), or None for an empty partition."""
    files = sorted(job.part_dir.glob("*.parquet")) if job.part_dir.is_dir() else []
    if not files:
        return None
    table = pq.read_table(files)
    if table.num_rows == 0:
        return None

    def col(name: str, dtype: Any) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype, copy=False)

    code, state, pos = col("code", np.int64), col("state", np.int64), col("pos", np.int64)
    # window of a long history (max_interactions_policy=window), -1 for a whole history
    win = col("win", np.int64) if "win" in table.column_names else np.full(len(code), -1, np.int64)
    order = np.lexsort((pos, win, state, code))
    c = job.columns
    n = len(order)

    def stack(names: tuple[str, ...], dtype: Any) -> np.ndarray:
        if not names:
            return np.zeros((n, 0), dtype)
        return np.stack([col(x, dtype)[order] for x in names], axis=1)

    fm = len(c.multi_hot)
    width = len(c.multi_hot[0]) if fm else 0
    multi = np.stack([stack(names, np.int64) for names in c.multi_hot], axis=1) if fm else None
    arrays = {
        "code": code[order],
        "state": state[order],
        "win": win[order],
        "is_val": col("is_val", bool)[order],
        "sparse": stack(c.sparse, np.int64),
        "multi_hot": multi if multi is not None else np.zeros((n, 0, width), np.int64),
        "dense": stack(c.dense, np.float32),
        "label": col("label", np.float32)[order],
    }
    return arrays, table.column("k").take(pa.array(order))


def _plan(
    arrays: dict[str, np.ndarray], keys: pa.ChunkedArray, cfg: TaskConfig, seed: int
) -> tuple[dict[str, list[Planned]], int]:
    """Tasks per split in the reference's order, plus the number of held-out warm tasks."""
    code, state, win = arrays["code"], arrays["state"], arrays["win"]
    new_task = (code[1:] != code[:-1]) | (state[1:] != state[:-1]) | (win[1:] != win[:-1])
    starts = np.flatnonzero(np.r_[True, new_task])
    ends = np.r_[starts[1:], len(code)]
    values = keys.take(pa.array(starts)).to_pylist()
    q = cfg.query_size
    plan: dict[str, list[Planned]] = {s: [] for s in SPLITS}
    held_out = 0
    for s, e, value in zip(starts.tolist(), ends.tolist(), values, strict=True):
        rows = np.arange(s, e)
        st = STATES[state[s]]
        tid = task_id(value, st, int(win[s]))
        eval_split = "val" if arrays["is_val"][s] else "test"
        if st == "warm":
            if cfg.holds_out(int(win[s])) and e - s - q >= cfg.min_interactions:
                plan[eval_split].append((tid, st, rows[:-q], rows[-q:]))
                rows = rows[:-q]
                held_out += 1
            plan["train"].append((tid, st, *_split_query(rows, cfg, seed, tid)))
        else:
            plan[eval_split].append((tid, st, *_split_query(rows, cfg, seed, tid)))
    return plan, held_out


def _record(arrays: dict[str, np.ndarray], task: Planned) -> TaskRecord:
    task_id, st, sup, qry = task
    out: dict[str, np.ndarray] = {}
    for which, idx in (("support", sup), ("query", qry)):
        for name in ("sparse", "multi_hot", "dense", "label"):
            out[f"{which}.{name}"] = np.ascontiguousarray(arrays[name][idx])
    return TaskRecord(task_id=task_id, state=st, arrays=out)


def _counts(plan: dict[str, list[Planned]]) -> dict[str, Any]:
    counts = {
        s: {st: {"tasks": 0, "interactions": 0, "support": 0, "query": 0} for st in STATES} for s in SPLITS
    }
    for s in SPLITS:
        for _task_id, st, sup, qry in plan[s]:
            c = counts[s][st]
            c["tasks"] += 1
            c["support"] += len(sup)
            c["query"] += len(qry)
            c["interactions"] += len(sup) + len(qry)
    return counts


def train_permutation(seed: int, tasks: int, part: int, partitions: int) -> np.ndarray:
    """The shuffle of a partition's train tasks (one partition: ``write_shards``' permutation)."""
    key = [seed, 7] if partitions == 1 else [seed, 7, part]
    return np.random.default_rng(key).permutation(tasks)


def write_partition(job: PartitionJob) -> dict[str, Any]:
    """Write one partition's shards; return their manifest entries, counts and held-out tasks."""
    loaded = _load(job)
    empty: dict[str, list[Planned]] = {s: [] for s in SPLITS}
    if loaded is None:
        return {"part": job.part, "shards": empty, "counts": _counts(empty), "held_out": 0}
    arrays, keys = loaded
    plan, held_out = _plan(arrays, keys, job.task_config, job.seed)
    perm = train_permutation(job.seed, len(plan["train"]), job.part, job.partitions)
    plan["train"] = [plan["train"][i] for i in perm]
    shards: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        (job.out_dir / split).mkdir(parents=True, exist_ok=True)
        shards[split] = []
        tasks = plan[split]
        for k, start in enumerate(range(0, len(tasks), job.tasks_per_shard)):
            records = [_record(arrays, t) for t in tasks[start : start + job.tasks_per_shard]]
            rel = f"{split}/shard-{job.part:05d}-{k:06d}.tar"
            write_tar(job.out_dir / rel, records, start)
            shards[split].append(
                {
                    "path": rel,
                    "tasks": len(records),
                    "samples": sum(r.num("support") + r.num("query") for r in records),
                    "bytes": (job.out_dir / rel).stat().st_size,
                    "sha256": sha256_file(job.out_dir / rel),
                }
            )
    return {"part": job.part, "shards": shards, "counts": _counts(plan), "held_out": held_out}
