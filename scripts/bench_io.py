"""Meta-IO throughput: tasks/s and samples/s delivered by ``TaskDataModule``'s train loader.

Measures, on the train split of the MovieLens task shards (``data/movielens1m/shards``) or, when
they are absent or ``--synthetic`` is given, on synthetic MovieLens-like shards built into a temp
dir with ``prepare_shards(SyntheticSource(...), TaskConfig(), out_dir)``:

* ``loader_w{0,1,2}``: one pass over the train split through ``TaskDataModule.train_dataloader()``
  with 0, 1 and 2 DataLoader workers (shard reading, WebDataset decoding, validation, shuffling,
  collation to ``TaskBatch``); the time includes worker start-up.
* ``naive``: the pipeline a non-task-grouped DLRM setup would have: the same interactions as one
  per-interaction row table (a CSV written once to a temp dir, rows in random order, ids already
  encoded), read with pandas each epoch, grouped by task, and per batch each task's rows sorted by
  time, split into support / query (the last ``query_size``), turned into arrays and collated with
  the same ``collate_tasks``. In-process (no workers); the time includes ``read_csv``.
* ``consumed``: what training eats: tasks/s and samples/s of one second-order MAML training step of
  the MovieLens model (``scripts/bench_train.py``'s ``maml`` variant, same batch size) on batches
  from these shards.

Ratios (tasks/s): ``loader/consumed`` (> 1: the loader keeps up with training) and
``loader/naive``, for each worker count.

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gmeta.data.batch import TaskBatch, TaskRecord, collate_tasks
from gmeta.data.datamodule import TaskDataModule
from gmeta.data.shards import iter_shard, prepare_shards, read_manifest
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
    """Flatten the train tasks into one row per interaction (random row order) and write a CSV."""
    manifest = read_manifest(data_dir)
    schema = manifest.schema
    frames = []
    for path, shard in zip(manifest.shard_paths("train"), manifest.shards("train"), strict=True):
        for r in iter_shard(path, schema, expected_tasks=shard["tasks"]):
            for which in ("support", "query"):
                a = r.arrays
                n = a[f"{which}.label"].shape[0]
                cols: dict[str, Any] = {"task": r.task_id, "state": r.state}
                base = 0 if which == "support" else r.num("support")
                cols["time"] = np.arange(base, base + n)
                cols["label"] = a[f"{which}.label"]
                for j in range(a[f"{which}.sparse"].shape[1]):
                    cols[f"s{j}"] = a[f"{which}.sparse"][:, j]
                mh = a[f"{which}.multi_hot"]
                for f in range(mh.shape[1]):
                    for k in range(mh.shape[2]):
                        cols[f"m{f}_{k}"] = mh[:, f, k]
                for j in range(a[f"{which}.dense"].shape[1]):
                    cols[f"d{j}"] = a[f"{which}.dense"][:, j]
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


def naive_batches(csv: Path, meta: dict[str, Any], batch_tasks: int, seed: int) -> Iterator[TaskBatch]:
    """Read rows, group by task, build support/query arrays per batch, collate."""
    df = pd.read_csv(csv)
    groups = df.groupby("task").indices
    keys = np.array(sorted(groups))
    np.random.default_rng(seed).shuffle(keys)
    s_cols = [f"s{j}" for j in range(meta["num_sparse"])]
    fm, length = meta["multi_hot"]
    m_cols = [f"m{f}_{k}" for f in range(fm) for k in range(length)]
    d_cols = [f"d{j}" for j in range(meta["num_dense"])]
    q = meta["query_size"]
    for start in range(0, len(keys), batch_tasks):
        records = []
        for key in keys[start : start + batch_tasks]:
            rows = df.iloc[groups[key]].sort_values("time")
            n_support = len(rows) - q
            arrays: dict[str, np.ndarray] = {}
            for which, part in (("support", rows.iloc[:n_support]), ("query", rows.iloc[n_support:])):
                arrays[f"{which}.sparse"] = part[s_cols].to_numpy(np.int64)
                arrays[f"{which}.multi_hot"] = part[m_cols].to_numpy(np.int64).reshape(len(part), fm, length)
                arrays[f"{which}.dense"] = part[d_cols].to_numpy(np.float32)
                arrays[f"{which}.label"] = part["label"].to_numpy(np.float32)
            records.append(TaskRecord(task_id=str(key), state=str(rows["state"].iloc[0]), arrays=arrays))
        yield collate_tasks(records)


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
    p.add_argument("--batch-tasks", type=int, default=32, help="tasks per batch (the MovieLens default)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--max-batches", type=int, default=None, help="stop each pass after this many batches")
    p.add_argument("--consume-steps", type=int, default=4, help="timed MAML steps for 'consumed'")
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
        results: list[dict] = []

        for w in [int(x) for x in args.workers.split(",") if x != ""]:
            dm = TaskDataModule(
                data_dir=data_dir, batch_tasks=args.batch_tasks, num_workers=w, verify_checksums=False
            )
            dm.setup()
            stats = time_batches(dm.train_dataloader(), args.max_batches)
            results.append(result(f"loader_w{w}", *stats, workers=w))
            print(f"loader with {w} workers: {stats[0]:.2f}s", flush=True)

        t0 = time.perf_counter()
        meta = write_row_table(data_dir, tmp / "rows.csv", args.seed)
        print(f"row table: {meta['rows']} rows written in {time.perf_counter() - t0:.1f}s", flush=True)
        stats = time_batches(
            naive_batches(tmp / "rows.csv", meta, args.batch_tasks, args.seed), args.max_batches
        )
        results.append(result("naive", *stats, workers=0))

        train_args = bench_train.parse_args(
            [
                "--config=movielens",
                f"--movielens-dir={data_dir}",
                f"--movielens-tasks={args.batch_tasks}",
                f"--steps={args.consume_steps}",
                "--warmup=1",
                "--variants=maml",
                f"--num-batches={min(4, args.consume_steps)}",
            ]
        )
        s = bench_train.setup_movielens(train_args, torch.device("cpu"), torch.float32)
        if s is None or not s.batches:
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
                }
            )

    by = {r["variant"]: r["tasks_per_s"] for r in results}
    ratios: dict[str, Any] = {"bench": "io", "variant": "ratios"}
    for r in results:
        if r["variant"].startswith("loader_"):
            w = r["variant"].removeprefix("loader_")
            ratios[f"loader_{w}/consumed"] = by[r["variant"]] / by["consumed"] if "consumed" in by else None
            ratios[f"loader_{w}/naive"] = by[r["variant"]] / by["naive"] if "naive" in by else None

    print()
    header = f"{'variant':<10} {'tasks/s':>10} {'samples/s':>11} {'seconds':>8} {'batches':>7} {'tasks':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['variant']:<10} {r['tasks_per_s']:>10.1f} {r['samples_per_s']:>11.1f} {r['seconds']:>8.2f} "
            f"{r['batches']:>7} {r['tasks']:>6}"
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
