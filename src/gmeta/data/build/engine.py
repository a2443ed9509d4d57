"""Run a build: a source -> relational plan -> partitions written into shards -> manifest (last).

``duckdb`` (the default): DuckDB plans in this process, a process pool writes the partitions.
``spark``: Spark plans and its executors write the partitions (``spark_plan``); the manifest is
merged here, on the driver, from what the partition writers return.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from gmeta.data.build.duckdb_plan import ROW, DuckDBPlanner
from gmeta.data.build.partitions import PartitionJob, write_partition
from gmeta.data.build.plan import PlanResult
from gmeta.data.schema import STATES, Schema, SchemaError
from gmeta.data.shards import FORMAT, FORMAT_VERSION, MANIFEST
from gmeta.data.sources.base import Source
from gmeta.data.tasks import SPLITS, TaskConfig, format_stats
from gmeta.errors import ConfigError

log = logging.getLogger(__name__)

#: ``pandas``: the in-memory reference builder; ``duckdb``: the out-of-core one (the default);
#: ``spark``: the same plan on Apache Spark (the ``spark`` extra), beyond one machine
ENGINES: tuple[str, ...] = ("duckdb", "pandas", "spark")


@dataclass
class BuildOptions:
    """How an out-of-core build runs (``data.build`` in the Hydra config).

    Attributes:
        memory_limit: DuckDB's memory limit (e.g. ``"2500MB"``); beyond it, it spills to ``temp_dir``.
            The build process adds ~1 GiB of its own (Python, pyarrow): 2500MB keeps the 128M-row
            build under 4 GiB (docs/benchmarks.md).
        threads: DuckDB threads (None: all cores).
        workers: processes writing partitions (None: all cores; 1: in this process).
        rows_per_partition: input rows per partition (the unit a worker holds in memory).
        temp_dir: spill folder (None: a folder inside the build's temporary output folder).
        spark_master: ``data.engine=spark`` only: the master of a session the build starts
            (None: the one ``spark-submit`` gave, else ``local[*]``); an active session is reused.
        spark_conf: ``data.engine=spark`` only: extra Spark settings for a session the build starts.
    """

    memory_limit: str = "2500MB"
    threads: int | None = None
    workers: int | None = None
    rows_per_partition: int = 2_000_000
    temp_dir: str | None = None
    spark_master: str | None = None
    spark_conf: dict[str, Any] | None = None


def register_source(con: duckdb.DuckDBPyConnection, source: Source) -> Schema:
    """Create the view ``src`` (the source's rows plus their input position ``ROW``); return the schema.

    Sources that can scan lazily (``scan_duckdb``: the tabular source reads CSV/Parquet files
    in DuckDB, out of core) do so; the others load a pandas frame (MovieLens, synthetic: small).
    """
    scan = getattr(source, "scan_duckdb", None)
    if scan is not None:
        return scan(con, ROW)
    df, schema = source.load()
    if ROW in df.columns:
        raise SchemaError(f"column name {ROW!r} is reserved for the builder")
    frame = df.reset_index(drop=True).assign(**{ROW: np.arange(len(df), dtype=np.int64)})
    con.register("src_frame", frame)
    con.execute("CREATE VIEW src AS SELECT * FROM src_frame")
    return schema


def _connect(options: BuildOptions, scratch: Path) -> duckdb.DuckDBPyConnection:
    temp = Path(options.temp_dir) if options.temp_dir else scratch / "spill"
    temp.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"memory_limit": options.memory_limit, "temp_directory": str(temp)}
    if options.threads:
        config["threads"] = int(options.threads)
    return duckdb.connect(":memory:", config=config)


def _merge_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {
        s: {st: {"tasks": 0, "interactions": 0, "support": 0, "query": 0} for st in STATES} for s in SPLITS
    }
    for r in results:
        for s in SPLITS:
            for st in STATES:
                for k, v in r["counts"][s][st].items():
                    counts[s][st][k] += v
    return counts


def build_shards(
    source: Source,
    task_config: TaskConfig,
    out_dir: str | Path,
    seed: int = 0,
    tasks_per_shard: int = 256,
    source_description: dict[str, Any] | None = None,
    options: BuildOptions | None = None,
    engine: str = "duckdb",
) -> dict[str, Any]:
    """Build all splits' shards, ``vocab.parquet`` and ``manifest.json`` (last) in ``out_dir``.

    ``engine``: ``duckdb`` or ``spark``. ``out_dir`` should be a fresh temporary folder that the
    caller renames into place (``gmeta.data.shards.prepare_shards`` does): scratch files live
    inside it until the end.
    """
    if tasks_per_shard < 1:
        raise ConfigError(f"data.tasks_per_shard must be >= 1, got {tasks_per_shard}")
    if engine not in ("duckdb", "spark"):
        raise ValueError(f"build engine must be 'duckdb' or 'spark', got {engine!r}")
    options = options or BuildOptions()
    out = Path(out_dir)
    scratch = out / "_build"
    scratch.mkdir(parents=True, exist_ok=True)
    if engine == "spark":
        from gmeta.data.build.spark_plan import run_spark  # pyspark is an optional extra

        try:
            plan, results = run_spark(source, task_config, out, scratch, seed, tasks_per_shard, options)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return write_manifest(out, plan, results, task_config, seed, source_description, engine)
    try:
        con = _connect(options, scratch)
        try:
            schema = register_source(con, source)
            planner = DuckDBPlanner(con, schema, task_config)
            rows = int(con.execute("SELECT count(*) FROM src").fetchall()[0][0])
            partitions = max(1, math.ceil(rows / max(1, options.rows_per_partition)))
            plan = planner.run(scratch / "parts", partitions)
        finally:
            con.close()
        jobs = [
            PartitionJob(
                part=p,
                partitions=plan.partitions,
                part_dir=plan.part_dir(p),
                out_dir=out,
                columns=plan.columns,
                task_config=task_config,
                seed=seed,
                tasks_per_shard=tasks_per_shard,
            )
            for p in range(plan.partitions)
        ]
        workers = min(len(jobs), options.workers or os.cpu_count() or 1)
        if workers <= 1:
            results = [write_partition(j) for j in jobs]
        else:  # spawn: the parent ran DuckDB's threads; fork after threads is unsafe
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = list(pool.map(write_partition, jobs))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return write_manifest(out, plan, results, task_config, seed, source_description, engine)


def write_manifest(
    out: Path,
    plan: PlanResult,
    results: list[dict[str, Any]],
    task_config: TaskConfig,
    seed: int,
    source_description: dict[str, Any] | None,
    engine: str,
) -> dict[str, Any]:
    """Merge the partition writers' results (in partition order) into ``manifest.json`` (last), with
    the plan's encoder (``vocab.parquet`` and its manifest entries)."""
    counts = _merge_counts(results)
    stats = {**plan.stats, "counts": counts, "warm_eval_held_out": sum(r["held_out"] for r in results)}
    if not any(counts[s][st]["tasks"] for s in SPLITS for st in STATES):
        log.warning("no task left after filtering: check min/max_interactions and the task key")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task_config": task_config.to_dict(),
        "seed": seed,
        "source": source_description,
        "counts": counts,
        "filtered": plan.stats["filtered"],
        "stats": {k: v for k, v in stats.items() if k not in ("counts", "filtered")},
        "build": {"engine": engine, "partitions": plan.partitions},
        "splits": {},
    }
    for split in SPLITS:
        shards = [s for r in results for s in r["shards"][split]]
        manifest["splits"][split] = {
            "tasks": sum(s["tasks"] for s in shards),
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
        }
    manifest.update(plan.encoder.save(out))  # schema, encoder settings, vocab.parquet
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info("tasks built:\n%s", format_stats(stats))
    log.info("wrote %s: %s", out, {s: manifest["splits"][s]["tasks"] for s in SPLITS})
    return manifest
