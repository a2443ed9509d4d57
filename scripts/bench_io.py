"""Meta-IO throughput: tasks/s and samples/s delivered by ``TaskDataModule``'s train loader.

Measures, on the train split of the MovieLens task shards (``data/movielens1m/shards``) or, when
they are absent or ``--synthetic`` is given, on synthetic MovieLens-like shards built into a temp
dir with ``prepare_shards(SyntheticSource(...), TaskConfig(), out_dir)``:

* ``loader_w{0,1,2}``: one epoch over the train split through ``TaskDataModule.train_dataloader()``
  with 0, 1 and 2 DataLoader workers (shard reading, decoding, validation, shuffling, collation to
  ``TaskBatch``, and for workers the transfer to the main process). The same loader is iterated
  once per pass, as a fit iterates it once per epoch; its workers are persistent, so only the first
  pass includes their start-up.
* ``naive``: what a pipeline without task-grouped storage does each epoch: read the same
  interactions from a per-interaction row table (a CSV written once to a temp dir, rows in random
  order, ids already encoded) with pandas, group them by task with one stable sort on
  (task, time), turn the columns into numpy arrays once, then per batch slice each task's rows
  (support, then the last ``query_size`` as query) into ``TaskRecord`` views and collate them with
  ``collate_tasks`` (the per-record collation serving uses). No per-task pandas calls.
* ``naive_vec``: the same read and sort, then the strongest in-memory grouping we could write:
  the support/query split of all tasks as vectorised gathers into one ``TaskChunk`` and the
  loader's own vectorised ``collate_chunk_tasks``. It bounds what a row-table pipeline can do at
  this scale (all rows in memory; at production scale the per-epoch global sort is the cost that
  task-grouped shards remove).
* Before timing, one pass of each naive pipeline is checked (untimed) to deliver exactly the
  shards' train tasks (or this rank's share), each once, with byte-identical arrays and states.
* ``consumed``: what training eats: tasks/s and samples/s of one second-order MAML training step of
  the MovieLens model (``scripts/bench_train.py``'s ``maml`` variant, same batch size) on batches
  from these shards, with the meta-step implementation currently in the tree.

``--world W`` times rank 0 of W data-parallel ranks (each takes ``batch-tasks / W`` tasks per
step, as in training): the loader reads only its share of the shards, the naive pipelines must
still read and group every row and keep every W-th task.

``consumed_peak`` is the same step at its fastest timed repetition (the conservative rate for
``loader/consumed`` when other jobs slow the step down).

Loader and naive passes run ``--repeat`` times, round-robin, and the median pass is reported (the
machine is shared; medians of interleaved runs resist drift). Ratios (tasks/s): ``loader/consumed``
(issue 4 target >= 3: the loader keeps up with training with room to spare), ``loader/naive``
(target >= 5) and ``loader/naive_vec``, for each worker count.

Run::

    .venv/bin/python scripts/bench_io.py                  # MovieLens shards if present
    .venv/bin/python scripts/bench_io.py --synthetic --synthetic-users 300 --max-batches 5

Output: a table, then one JSON line per variant and one ``ratios`` JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gmeta.data.batch import SET_ARRAYS, TaskBatch, TaskChunk, TaskRecord, collate_chunk_tasks, collate_tasks
from gmeta.data.datamodule import TaskDataModule
from gmeta.data.schema import STATES
from gmeta.data.shards import prepare_shards, read_manifest, read_shard
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import TaskConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_SHARDS = ROOT / "data" / "movielens1m" / "shards"


def count(batch: TaskBatch) -> tuple[int, int]:
    """(real tasks, real support+query samples) of a batch."""
    tm = batch.task_mask[:, None]
    samples = int((batch.support.mask & tm).sum()) + int((batch.query.mask & tm).sum())
    return int(batch.task_mask.sum()), samples


def time_batches(batches: Iterable[TaskBatch], max_batches: int | None) -> tuple[float, int, int, int]:
    """Pull batches (at most ``max_batches``) and return (seconds, batches, tasks, samples)."""
    t0 = time.perf_counter()
    n = tasks = samples = 0
    it = iter(batches)
    for batch in it:
        t, s = count(batch)
        n, tasks, samples = n + 1, tasks + t, samples + s
        if max_batches is not None and n >= max_batches:
            break
    dt = time.perf_counter() - t0
    del it  # shuts loader workers down
    return dt, n, tasks, samples


# --------------------------------------------------------------------------------------------------
# Naive per-interaction pipeline
# --------------------------------------------------------------------------------------------------


def write_row_table(data_dir: Path, out_csv: Path, seed: int) -> dict[str, Any]:
    """Flatten the train tasks into one row per interaction (random row order) and write a CSV.

    Columns: task, state, time (position in the task: support rows first, then the query rows),
    label, s0.. (sparse ids), m{field}_{k} (multi-hot ids, -1 = padding), d0.. (dense).
    """
    manifest = read_manifest(data_dir)
    schema = manifest.schema
    frames = []
    for path, shard in zip(manifest.shard_paths("train"), manifest.shards("train"), strict=True):
        c = read_shard(path, schema, expected_tasks=shard["tasks"])
        ns = c.sizes("support")
        for which, base in (("support", np.zeros_like(ns)), ("query", ns)):
            n = c.sizes(which)
            a = {name: c.arrays[f"{which}.{name}"] for name in SET_ARRAYS}
            total = int(n.sum())
            within = np.arange(total) - np.repeat(c.offsets[which][:-1], n)
            cols: dict[str, Any] = {
                "task": np.repeat(np.array(c.task_ids, dtype=object), n),
                "state": np.repeat(np.array(STATES, dtype=object)[c.states], n),
                "time": np.repeat(base, n) + within,
                "label": a["label"],
            }
            cols.update({f"s{j}": a["sparse"][:, j] for j in range(a["sparse"].shape[1])})
            mh = a["multi_hot"]
            cols.update({f"m{f}_{k}": mh[:, f, k] for f in range(mh.shape[1]) for k in range(mh.shape[2])})
            cols.update({f"d{j}": a["dense"][:, j] for j in range(a["dense"].shape[1])})
            frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True)
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))]
    df.to_csv(out_csv, index=False)
    return {
        "rows": len(df),
        "tasks": int(df["task"].nunique()),
        "num_sparse": len(schema.sparse),
        "multi_hot": (len(schema.multi_hot), schema.max_multi_hot_len),
        "num_dense": len(schema.dense),
        "query_size": int(manifest.data["task_config"]["query_size"]),
    }


def _load_grouped(csv: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Read the row table and group it by task: one stable sort on (task, time), numpy columns."""
    df = pd.read_csv(csv)
    df = df.sort_values(["task", "time"], kind="stable")
    task = df["task"].to_numpy()
    starts = np.flatnonzero(np.r_[True, task[1:] != task[:-1]])
    fm, length = meta["multi_hot"]
    return {
        "task": task[starts].astype(str),
        "state": df["state"].to_numpy()[starts].astype(str),
        "bounds": np.r_[starts, len(df)],
        "sparse": df[[f"s{j}" for j in range(meta["num_sparse"])]].to_numpy(np.int64),
        "multi_hot": df[[f"m{f}_{k}" for f in range(fm) for k in range(length)]]
        .to_numpy(np.int64)
        .reshape(len(df), fm, length),
        "dense": df[[f"d{j}" for j in range(meta["num_dense"])]].to_numpy(np.float32),
        "label": df["label"].to_numpy(np.float32),
    }


def _share(n: int, seed: int, rank: int, world: int) -> np.ndarray:
    """A shuffled task order, keeping this rank's share (every ``world``-th task)."""
    return np.random.default_rng(seed).permutation(n)[rank::world]


def naive_batches(
    csv: Path, meta: dict[str, Any], batch_tasks: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[TaskBatch]:
    """Read rows, group by task (one sort), per batch slice each task's rows and ``collate_tasks``.

    With ``world`` > 1 this is one rank's view: it must still read and group every row (rows are
    not grouped by task on disk) and keeps every ``world``-th task.
    """
    g = _load_grouped(csv, meta)
    order = _share(len(g["task"]), seed, rank, world)
    q = meta["query_size"]
    for start in range(0, len(order), batch_tasks):
        records = []
        for t in order[start : start + batch_tasks]:
            lo, hi = int(g["bounds"][t]), int(g["bounds"][t + 1])
            arrays: dict[str, np.ndarray] = {}
            for which, a, b in (("support", lo, hi - q), ("query", hi - q, hi)):
                for name in SET_ARRAYS:
                    arrays[f"{which}.{name}"] = g[name][a:b]
            records.append(TaskRecord(task_id=str(g["task"][t]), state=str(g["state"][t]), arrays=arrays))
        yield collate_tasks(records)


def naive_vec_batches(
    csv: Path, meta: dict[str, Any], batch_tasks: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[TaskBatch]:
    """Read rows, group by task (one sort), split all tasks with gathers, vectorised collation."""
    g = _load_grouped(csv, meta)
    q = meta["query_size"]
    lo, hi = g["bounds"][:-1], g["bounds"][1:]
    offsets, arrays = {}, {}
    for which, a, b in (("support", lo, hi - q), ("query", hi - q, hi)):
        n = b - a
        offsets[which] = np.r_[0, np.cumsum(n)]
        rows = np.repeat(a - offsets[which][:-1], n) + np.arange(int(n.sum()))
        for name in SET_ARRAYS:
            arrays[f"{which}.{name}"] = g[name][rows]
    states = np.array([STATES.index(s) for s in g["state"]], dtype=np.int64)
    chunk = TaskChunk(task_ids=[str(t) for t in g["task"]], states=states, offsets=offsets, arrays=arrays)
    order = _share(chunk.num_tasks, seed, rank, world)
    for start in range(0, len(order), batch_tasks):
        yield collate_chunk_tasks([(chunk, int(i)) for i in order[start : start + batch_tasks]])


def check_same_tasks(data_dir: Path, batches: Iterable[TaskBatch], world: int = 1) -> int:
    """Check (untimed) that a naive pass delivers the shards' own train tasks, each once, unchanged.

    Every task's state and support/query arrays must equal the shard record's byte for byte; with
    ``world`` 1 every task must appear, otherwise exactly this rank's share. Returns the task count.
    """
    manifest = read_manifest(data_dir)
    ref: dict[str, TaskRecord] = {}
    for path, shard in zip(manifest.shard_paths("train"), manifest.shards("train"), strict=True):
        c = read_shard(path, manifest.schema, expected_tasks=shard["tasks"])
        ref.update((c.task_ids[i], c.record(i)) for i in range(c.num_tasks))
    seen: set[str] = set()
    for batch in batches:
        for i, tid in enumerate(batch.task_ids):
            if not bool(batch.task_mask[i]):
                continue
            r = ref.get(tid)
            if r is None or tid in seen or STATES[int(batch.state[i])] != r.state:
                raise RuntimeError(f"naive pipeline: task {tid!r} unknown, repeated or with another state")
            seen.add(tid)
            for which in ("support", "query"):
                s = getattr(batch, which)
                n = int(s.mask[i].sum())
                if n != r.num(which) or not bool(s.mask[i, :n].all()):
                    raise RuntimeError(
                        f"naive pipeline: task {tid!r} has {n} {which} samples, not {r.num(which)}"
                    )
                for name in SET_ARRAYS:
                    if getattr(s, name)[i, :n].numpy().tobytes() != r.arrays[f"{which}.{name}"].tobytes():
                        raise RuntimeError(
                            f"naive pipeline: task {tid!r} {which}.{name} differs from the shards"
                        )
    if len(seen) != len(range(0, len(ref), world)):
        raise RuntimeError(
            f"naive pipeline delivered {len(seen)} tasks, expected {len(range(0, len(ref), world))}"
        )
    return len(seen)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def result(variant: str, seconds: float, batches: int, tasks: int, samples: int, **extra: Any) -> dict:
    return {
        "bench": "io",
        "variant": variant,
        "tasks_per_s": tasks / seconds,
        "samples_per_s": samples / seconds,
        "seconds": seconds,
        "batches": batches,
        "tasks": tasks,
        "samples": samples,
        **extra,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(MOVIELENS_SHARDS), help="task shards (train split is read)")
    p.add_argument("--synthetic", action="store_true", help="build synthetic shards in a temp dir instead")
    p.add_argument("--synthetic-users", type=int, default=3000, help="users (tasks) of the synthetic data")
    p.add_argument(
        "--batch-tasks", type=int, default=32, help="meta-batch over all ranks (MovieLens default)"
    )
    p.add_argument(
        "--world",
        type=int,
        default=1,
        help="data-parallel ranks: loader and naive are timed as rank 0 of this many, each rank taking "
        "batch-tasks / world tasks per step ('consumed' is only measured for 1)",
    )
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--max-batches", type=int, default=None, help="stop each pass after this many batches")
    p.add_argument("--repeat", type=int, default=5, help="passes per loader / naive variant (median kept)")
    p.add_argument("--consume-steps", type=int, default=6, help="timed MAML steps for 'consumed'")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}: intra-op threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gmeta-bench-io-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = Path(args.data_dir)
        if args.synthetic or not (data_dir / "manifest.json").is_file():
            if not args.synthetic:
                print(f"no shards in {data_dir}: using synthetic shards", flush=True)
            t0 = time.perf_counter()
            source = SyntheticSource(num_users=args.synthetic_users, num_items=400, schema="movielens")
            data_dir = prepare_shards(source, TaskConfig(), tmp / "shards", tasks_per_shard=64)
            print(f"built synthetic shards in {time.perf_counter() - t0:.1f}s", flush=True)
        manifest = read_manifest(data_dir)
        print(
            f"data: {data_dir} train split: {manifest.num_tasks('train')} tasks, "
            f"{manifest.data['splits']['train']['samples']} samples, {len(manifest.shards('train'))} shards",
            flush=True,
        )
        t0 = time.perf_counter()
        meta = write_row_table(data_dir, tmp / "rows.csv", args.seed)
        print(f"row table: {meta['rows']} rows written in {time.perf_counter() - t0:.1f}s", flush=True)

        # every pass is a new epoch of the loader / a fresh read of the row table
        passes: dict[str, Callable[[int], Iterable[TaskBatch]]] = {}
        for w in [int(x) for x in args.workers.split(",") if x != ""]:
            dm = TaskDataModule(
                data_dir=data_dir,
                batch_tasks=args.batch_tasks,
                num_workers=w,
                verify_checksums=False,
                rank=0,
                world_size=args.world,
            )
            dm.setup()
            # one loader per worker count, iterated once per pass, as a Lightning fit iterates it
            # once per epoch (workers are persistent: only the first pass pays their start-up)
            loader = dm.train_dataloader()
            passes[f"loader_w{w}"] = lambda rep, loader=loader: loader
        csv = tmp / "rows.csv"
        per_rank = args.batch_tasks // args.world
        passes["naive"] = lambda rep: naive_batches(csv, meta, per_rank, args.seed + rep, 0, args.world)
        passes["naive_vec"] = lambda rep: naive_vec_batches(
            csv, meta, per_rank, args.seed + rep, 0, args.world
        )
        for variant in ("naive", "naive_vec"):  # same tasks as the shards, or the comparison is void
            checked = check_same_tasks(data_dir, passes[variant](0), args.world)
            print(f"{variant}: {checked} tasks checked equal to the shards' records", flush=True)
        runs: dict[str, list[tuple[float, int, int, int]]] = {v: [] for v in passes}
        for rep in range(args.repeat):
            for variant, make in passes.items():
                runs[variant].append(time_batches(make(rep), args.max_batches))
            print(
                f"pass {rep + 1}/{args.repeat}: "
                + ", ".join(f"{v} {r[-1][0]:.3f}s" for v, r in runs.items()),
                flush=True,
            )
        results: list[dict] = []
        for variant, stats in runs.items():
            mid = sorted(stats)[len(stats) // 2]  # the median pass (by time) and its counts
            workers = int(variant.removeprefix("loader_w")) if variant.startswith("loader_w") else 0
            results.append(
                result(
                    variant,
                    *mid,
                    workers=workers,
                    world=args.world,
                    seconds_min=min(s[0] for s in stats),
                    seconds_max=max(s[0] for s in stats),
                    passes=len(stats),
                )
            )

        train_args = bench_train.parse_args(
            [
                "--config=movielens",
                f"--movielens-dir={data_dir}",
                f"--movielens-tasks={args.batch_tasks}",
                f"--steps={args.consume_steps}",
                "--warmup=2",
                "--variants=maml",
                f"--num-batches={min(4, args.consume_steps)}",
            ]
        )
        s = (
            bench_train.setup_movielens(train_args, torch.device("cpu"), torch.float32)
            if args.world == 1
            else None
        )
        if args.world > 1:
            print("consumed: only measured with --world 1", flush=True)
        elif s is None or not s.batches:
            print("consumed: no full training batch available, skipped", flush=True)
        else:
            r = bench_train.bench(s, train_args.steps, train_args.warmup, 1, ("maml",))[0]
            sec = r["step_ms"] / 1e3
            results.append(
                {
                    "bench": "io",
                    "variant": "consumed",
                    "tasks_per_s": r["tasks_per_step"] / sec,
                    "samples_per_s": r["samples_per_s"],
                    "seconds": sec,
                    "batches": 1,
                    "tasks": r["tasks_per_step"],
                    "samples": r["samples_per_step"],
                    "workers": 0,
                    "step": "maml (movielens model, second order)",
                    "step_ms_min": r["step_ms_min"],
                    # the fastest timed step: the conservative rate for loader/consumed on a noisy machine
                    "tasks_per_s_peak": r["tasks_per_step"] / (r["step_ms_min"] / 1e3),
                }
            )

    by = {r["variant"]: r["tasks_per_s"] for r in results}
    if "consumed" in by:
        by["consumed_peak"] = next(r for r in results if r["variant"] == "consumed")["tasks_per_s_peak"]
    ratios: dict[str, Any] = {"bench": "io", "variant": "ratios"}
    for r in results:
        if r["variant"].startswith("loader_"):
            w = r["variant"].removeprefix("loader_")
            for base in ("consumed", "consumed_peak", "naive", "naive_vec"):
                ratios[f"loader_{w}/{base}"] = by[r["variant"]] / by[base] if base in by else None

    print()
    header = (
        f"{'variant':<10} {'tasks/s':>10} {'samples/s':>11} {'seconds':>8} {'min':>7} {'max':>7} "
        f"{'batches':>7} {'tasks':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        lo, hi = r.get("seconds_min", r["seconds"]), r.get("seconds_max", r["seconds"])
        print(
            f"{r['variant']:<10} {r['tasks_per_s']:>10.1f} {r['samples_per_s']:>11.1f} {r['seconds']:>8.3f} "
            f"{lo:>7.3f} {hi:>7.3f} {r['batches']:>7} {r['tasks']:>6}"
        )
    print(", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if isinstance(v, float)) + " (tasks/s ratios)")
    print()
    lines = [json.dumps(r) for r in [*results, ratios]]
    for line in lines:
        print(line)
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    return [*results, ratios]


if __name__ == "__main__":
    main()
