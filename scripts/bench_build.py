"""Shard-build benchmark: wall time and peak memory of ``scripts/prepare_data.py`` per size and engine.

Measures, for each requested size (``--rows``) and build engine (``--engines``), one shard build of a
synthetic click log through the ``data=tabular`` config, run as a fresh subprocess::

    python scripts/prepare_data.py data=tabular data.source.path=<parquet> \
        data.source.schema_path=<yaml> data.data_dir=<out> data.force=true \
        data.task_config.label_threshold=0.5 data.engine=<engine>

* ``seconds``: wall time of that process, from start to exit (Python and library imports, reading the
  Parquet file, task building, writing the shards, and the DataModule's ``setup("fit")`` check of the
  result).
* ``peak_rss_gib`` (the main memory figure): the largest sum, over the process tree (the build
  process and every descendant alive at that moment, e.g. process-pool workers), of each process's
  resident set (``/proc/<pid>/statm``), sampled every ``--sample-s`` seconds (0.2). Pages shared
  between forked workers count once per process, so this is an upper bound of the tree's footprint;
  a peak shorter than the sampling period can be missed.
* ``child_maxrss_gib``: the kernel's peak RSS of the build process and of the descendants it waited
  for (``os.wait4`` ``ru_maxrss``): the largest single process, never a sum, but exact.
* ``tasks``: the tasks written (train + val + test), from the output folder's ``manifest.json``.

Engines: ``data.engine`` is a key of ``conf/data/tabular.yaml`` once the out-of-core builder lands
(``duckdb``, its default, and ``pandas``, the in-memory reference builder). While the config has no
such key, ``pandas`` runs with no engine override (today's builder) and other engines are skipped
with a message. ``--max-rows-pandas`` (default 32M) skips pandas builds above that size, and
``--timeout-s`` stops (kills) a build that runs longer. ``--tree DIR`` builds with another checkout's
``scripts/prepare_data.py``, ``conf/`` and ``src/`` (e.g. ``git archive HEAD`` unpacked in /tmp: a
baseline while the working tree changes).

The click log (cached by (rows, seed) under ``--work-dir``, so reruns skip generation): ~33 rows per
user on average, user activity Zipf-Mandelbrot distributed (rank weights ``(r + U/100)^-1``, a few to
~700 rows per user), each user arriving at a uniform random time in the first 305 of 365 days and
active for a lognormal span (median 20 days, at most 60), so the 80% first-time quantile leaves ~20%
new users; one item per 100 rows, Zipf(1.05) popularity, half of them in the catalogue from day 0 and
half released at uniform times, 15% of clicks going to items released in the last 14 days (so items
also first appear over time). Columns: ``user_id``, ``item_id``, user-side ``age_bucket`` (7) and
``region`` (2,000), per-row ``device`` (5, mostly the user's own), item-side ``category`` (300) and
``brand`` (5,000), dense ``price`` (item), ``position`` (display slot 1-20) and ``tenure_days``
(days since the user's first row), ``click`` (0/1, logistic in user x item affinity, biases, slot
and device: CTR ~0.2), ``ts`` (int64 seconds). Rows are written in time order, one Parquet row group
per slice of time (~500k rows), so generating 128M rows keeps memory flat (a few hundred MB, mostly
per-user state). The schema YAML (README "Your own data") is written next to it.

Run::

    .venv/bin/python scripts/bench_build.py --rows 1M,4M --engines pandas
    .venv/bin/python scripts/bench_build.py --rows 1M,4M,32M,128M --engines duckdb,pandas --out b.jsonl
    .venv/bin/python scripts/bench_build.py --rows 32M,128M --generate-only   # only write the data

Output: a table, then one JSON line per build (skipped ones too) and a final ``summary`` JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
TABULAR_CONF = Path("conf") / "data" / "tabular.yaml"  # relative to the --tree
DEFAULT_WORK_DIR = ROOT / "data" / "bench_build"
GIB = 2**30

# -- click-log generator -----------------------------------------------------------------------

GENERATOR_VERSION = 1  # part of the cache file name: bump when the generated data changes
DAY = 86_400
SPAN_DAYS = 365
MAX_ACTIVE_DAYS = 60  # users arrive in [0, SPAN - MAX_ACTIVE) days and leave before SPAN
T0 = 1_600_000_000  # epoch seconds of day 0
ROWS_PER_USER = 33
ROWS_PER_ITEM = 100
CHUNK_ROWS = 500_000  # target rows per time slice (one Parquet row group each)
N_AGE, N_REGION, N_DEVICE, N_CATEGORY, N_BRAND = 7, 2_000, 5, 300, 5_000
LATENT = 4
FRESH_SHARE, FRESH_DAYS = 0.15, 14
SPARSE = ["user_id", "item_id", "age_bucket", "region", "device", "category", "brand"]
DENSE = ["price", "position", "tenure_days"]
MIN_INTERACTIONS = 13  # conf/data/tabular.yaml's task_config.min_interactions (for the generator stats)

ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("age_bucket", pa.int8()),
        ("region", pa.int16()),
        ("device", pa.int8()),
        ("category", pa.int16()),
        ("brand", pa.int16()),
        ("price", pa.float32()),
        ("position", pa.float32()),
        ("tenure_days", pa.float32()),
        ("click", pa.int8()),
        ("ts", pa.int64()),
    ]
)


def zipf_weights(n: int, s: float, offset: float = 1.0) -> np.ndarray:
    """Rank weights ``(rank + offset)^-s`` for ranks 0..n-1 (float64, sum 1)."""
    w = (np.arange(n, dtype=np.float64) + offset) ** -s
    return w / w.sum()


def split_exactly(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainders)."""
    exact = total * weights
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts


def schema_yaml() -> str:
    spec = {"task_key": "user_id", "label": "click", "time": "ts", "sparse": SPARSE, "dense": DENSE}
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None)


def generate(rows: int, seed: int, path: Path) -> dict[str, Any]:
    """Write a ``rows``-row click log to ``path`` (Parquet, time-ordered); return its statistics."""
    t_start = time.perf_counter()
    rng = np.random.default_rng([seed, GENERATOR_VERSION])
    n_users = max(1, round(rows / ROWS_PER_USER))
    n_items = max(200, rows // ROWS_PER_ITEM)

    # users, in arrival order (user_id is a random permutation, so ids do not encode time)
    counts = split_exactly(rows, zipf_weights(n_users, 1.0, max(1.0, n_users / 100)))
    counts = rng.permutation(counts).astype(np.int32)
    if counts.min() < 1:
        raise ValueError(f"--rows {rows}: too few rows for {n_users} users")
    arrive = np.sort(rng.uniform(0, (SPAN_DAYS - MAX_ACTIVE_DAYS) * DAY, n_users))
    span = np.clip(np.exp(rng.normal(np.log(20.0), 0.8, n_users)), 0.5, MAX_ACTIVE_DAYS) * DAY
    leave = arrive + span
    del span
    remaining = counts - 1  # the first row of each user is at its arrival time
    user_ids = rng.permutation(n_users).astype(np.int64) + 1
    u_age = rng.choice(N_AGE, n_users, p=[0.05, 0.2, 0.25, 0.2, 0.15, 0.1, 0.05]).astype(np.int8)
    u_region = (rng.choice(N_REGION, n_users, p=zipf_weights(N_REGION, 0.9)) + 1).astype(np.int16)
    u_device = rng.choice(N_DEVICE, n_users, p=[0.45, 0.3, 0.15, 0.07, 0.03]).astype(np.int8)
    u_vec = rng.normal(0, 1, (n_users, LATENT)).astype(np.float32)
    u_vec[:, 0] += (u_age.astype(np.float32) - 3) / 3  # age shifts taste: a user-side feature with signal
    u_bias = rng.normal(0, 0.5, n_users).astype(np.float32)

    # items, in release order: half in the catalogue from day 0, half released at uniform times
    n_catalog = n_items // 2
    release = np.sort(np.r_[np.zeros(n_catalog), rng.uniform(0, SPAN_DAYS * DAY, n_items - n_catalog)])
    item_ids = rng.permutation(n_items).astype(np.int64) + 1
    popularity = zipf_weights(n_items, 1.05)[rng.permutation(n_items)]
    cum_pop = np.cumsum(popularity)
    i_category = (rng.choice(N_CATEGORY, n_items, p=zipf_weights(N_CATEGORY, 0.8)) + 1).astype(np.int16)
    i_brand = rng.integers(1, N_BRAND + 1, n_items).astype(np.int16)
    i_price = np.exp(rng.normal(3.0, 1.0, n_items)).astype(np.float32)
    i_vec = rng.normal(0, 1, (n_items, LATENT)).astype(np.float32)
    i_vec[:, 0] += ((i_category.astype(np.float32) % N_AGE) - 3) / 3
    i_bias = rng.normal(0, 0.5, n_items).astype(np.float32)

    slices = max(1, math.ceil(rows / CHUNK_ROWS))
    edges = np.linspace(0, SPAN_DAYS * DAY, slices + 1)
    edges[-1] = np.inf
    written = clicks = 0
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, ARROW_SCHEMA, compression="snappy") as writer:
        for b in range(slices):
            b0, b1 = edges[b], edges[b + 1]
            lo = int(np.searchsorted(arrive, b0 - MAX_ACTIVE_DAYS * DAY))
            hi = int(np.searchsorted(arrive, b1))
            start = np.maximum(arrive[lo:hi], b0)
            overlap = np.clip(np.minimum(leave[lo:hi], b1) - start, 0, None)
            left = leave[lo:hi] - start
            # a user's remaining rows fall uniformly over its remaining active time: a sequence of
            # binomials over time slices is an exact multinomial, without holding the whole log
            p = np.divide(overlap, left, out=np.zeros_like(left), where=left > 0).clip(0, 1)
            k = rng.binomial(remaining[lo:hi], p).astype(np.int32)
            remaining[lo:hi] -= k
            users = np.repeat(np.arange(lo, hi), k)
            t = np.repeat(start, k) + rng.uniform(0, 1, len(users)) * np.repeat(overlap, k)
            first = np.flatnonzero((arrive[lo:hi] >= b0) & (arrive[lo:hi] < b1)) + lo
            users = np.r_[users, first]
            t = np.r_[t, arrive[first]]
            order = np.argsort(t, kind="stable")
            users, t = users[order], t[order]
            n = len(users)
            if n == 0:
                continue
            del order, k, p, overlap, left, start

            # items: Zipf over those released by now, or (FRESH_SHARE) uniform over the last 14 days'
            released = np.searchsorted(release, t, side="right")  # >= n_catalog >= 1
            item = np.searchsorted(cum_pop, rng.uniform(0, 1, n) * cum_pop[released - 1], side="right")
            fresh_lo = np.maximum(np.searchsorted(release, t - FRESH_DAYS * DAY), n_catalog)
            fresh = (rng.uniform(0, 1, n) < FRESH_SHARE) & (released > fresh_lo)
            offset = rng.uniform(0, 1, int(fresh.sum())) * (released - fresh_lo)[fresh]
            item[fresh] = fresh_lo[fresh] + offset.astype(np.int64)
            item = np.minimum(item, released - 1)
            del released, fresh_lo, fresh

            device = np.where(rng.uniform(0, 1, n) < 0.85, u_device[users], rng.integers(0, N_DEVICE, n))
            position = np.minimum(rng.geometric(0.15, n), 20).astype(np.float32)
            affinity = np.einsum("ij,ij->i", u_vec[users], i_vec[item]) / 2
            logit = (
                -1.5 + u_bias[users] + i_bias[item] + affinity - 0.06 * (position - 1) + 0.3 * (device == 0)
            )
            click = (rng.uniform(0, 1, n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
            del affinity, logit
            table = pa.table(
                {
                    "user_id": user_ids[users],
                    "item_id": item_ids[item],
                    "age_bucket": u_age[users],
                    "region": u_region[users],
                    "device": device.astype(np.int8),
                    "category": i_category[item],
                    "brand": i_brand[item],
                    "price": i_price[item],
                    "position": position,
                    "tenure_days": ((t - arrive[users]) / DAY).astype(np.float32),
                    "click": click,
                    "ts": T0 + np.floor(t).astype(np.int64),
                },
                schema=ARROW_SCHEMA,
            )
            writer.write_table(table, row_group_size=n)
            written += n
            clicks += int(click.sum())
            del table, users, t, item, device, position, click
    if written != rows or int(remaining.sum()) != 0:
        tmp.unlink()
        raise AssertionError(
            f"generator wrote {written} rows for --rows {rows} ({remaining.sum()} left over)"
        )
    tmp.rename(path)
    return {
        "rows": rows,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "users": n_users,
        "users_ge_min_interactions": int((counts >= MIN_INTERACTIONS).sum()),
        "max_rows_per_user": int(counts.max()),
        "items": n_items,
        "ctr": clicks / rows,
        "parquet_bytes": path.stat().st_size,
        "row_groups": pq.ParquetFile(path).metadata.num_row_groups,
        "generate_s": round(time.perf_counter() - t_start, 2),
    }


def dataset(rows: int, seed: int, work_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The cached (Parquet, schema YAML, stats) for (rows, seed), generated on first use."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"clicks_v{GENERATOR_VERSION}_{rows}_seed{seed}"
    parquet, meta = work_dir / f"{stem}.parquet", work_dir / f"{stem}.json"
    schema = work_dir / "clicks_schema.yaml"
    if not schema.is_file() or schema.read_text() != schema_yaml():
        schema.write_text(schema_yaml())
    if parquet.is_file() and meta.is_file():
        stats = json.loads(meta.read_text())
        if stats.get("parquet_bytes") == parquet.stat().st_size:
            return parquet, schema, {**stats, "cached": True}
    print(f"generating {rows:,} rows (seed {seed}) -> {parquet}", file=sys.stderr, flush=True)
    stats = generate(rows, seed, parquet)
    meta.write_text(json.dumps(stats, indent=1))
    return parquet, schema, {**stats, "cached": False}


# -- process-tree memory sampling ----------------------------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc)."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields restart after the last ')'
        out[int(entry.name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return out


def tree_rss(root: int) -> tuple[int, int]:
    """(bytes resident, processes) summed over ``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    total, procs, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
            procs += 1
        except (OSError, IndexError, ValueError):
            continue  # exited between the scan and the read (or a zombie)
    return total, procs


def run_measured(
    cmd: list[str],
    log_path: Path,
    timeout_s: float,
    sample_s: float,
    cwd: Path = ROOT,
    env: dict | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` (stdout+stderr to ``log_path``), sampling its process tree's RSS until it exits."""
    peak = peak_procs = samples = 0
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                seconds = time.perf_counter() - t0
                break
            rss, procs = tree_rss(proc.pid)
            samples += 1
            peak, peak_procs = max(peak, rss), max(peak_procs, procs)
            if not timed_out and time.perf_counter() - t0 > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the build's own session: it and its workers
            time.sleep(sample_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "child_maxrss_bytes": usage.ru_maxrss * 1024,  # Linux: kilobytes
        "max_procs": peak_procs,
        "samples": samples,
    }


# -- builds ------------------------------------------------------------------------------------


def config_has_engine(tree: Path) -> bool:
    """Whether the tree's ``conf/data/tabular.yaml`` has the ``engine`` key (``data.engine=`` is accepted)."""
    return "engine" in (yaml.safe_load((tree / TABULAR_CONF).read_text()) or {})


def parse_rows(text: str) -> list[int]:
    """'1M,4M,32M,128M', '1e6,4e6', '20k', '20000' -> row counts."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = scale.get(part[-1], 1)
        value = float(part[:-1] if part[-1] in scale else part) * mult
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"--rows: {part!r} is not a positive whole number of rows")
        out.append(int(value))
    if not out:
        raise argparse.ArgumentTypeError("--rows: no sizes given")
    return out


def human(rows: int) -> str:
    """1000000 -> '1M', 20000 -> '20k', 1234 -> '1234'."""
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if rows % div == 0:
            return f"{rows // div}{unit}"
    return str(rows)


def read_tasks(out_dir: Path) -> dict[str, Any]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    by_split = {split: int(v["tasks"]) for split, v in manifest["splits"].items()}
    by_state: dict[str, int] = {}
    for per_state in manifest.get("counts", {}).values():
        for state, c in per_state.items():
            by_state[state] = by_state.get(state, 0) + int(c["tasks"])
    stats = manifest.get("stats", {})
    return {
        "tasks": sum(by_split.values()),
        "tasks_by_split": by_split,
        "tasks_by_state": by_state,
        "task_keys": stats.get("task_keys"),
        "interactions": stats.get("interactions"),
        "positive_rate": stats.get("positive_rate"),
    }


def build(args: argparse.Namespace, rows: int, engine: str, has_engine: bool, data: tuple) -> dict[str, Any]:
    parquet, schema, gen = data
    out_dir = args.work_dir / "shards" / f"{human(rows)}_{engine}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        str(args.tree / "scripts" / "prepare_data.py"),
        "data=tabular",
        f"data.source.path={parquet}",
        f"data.source.schema_path={schema}",
        f"data.data_dir={out_dir}",
        "data.force=true",
        "data.task_config.label_threshold=0.5",
    ]
    if has_engine:
        cmd.append(f"data.engine={engine}")
    cmd += args.override
    log_path = args.work_dir / "logs" / f"build_{human(rows)}_{engine}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    # the tree's own package first (an editable install of this checkout would shadow another tree)
    pythonpath = os.pathsep.join(x for x in (str(args.tree / "src"), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PROJECT_ROOT": str(args.tree)}
    m = run_measured(cmd, log_path, args.timeout_s, args.sample_s, cwd=args.tree, env=env)
    line: dict[str, Any] = {
        "bench": "build",
        "rows": rows,
        "engine": engine,
        "engine_override": has_engine,
        "status": "ok",
        "seconds": round(m["seconds"], 3),
        "rows_per_s": round(rows / m["seconds"], 1),
        "peak_rss_gib": round(m["peak_rss_bytes"] / GIB, 4),
        "child_maxrss_gib": round(m["child_maxrss_bytes"] / GIB, 4),
        "max_procs": m["max_procs"],
        "rss_samples": m["samples"],
        "returncode": m["returncode"],
        "load_avg_1m_before": load_before,
        "users": gen["users"],
        "users_ge_min_interactions": gen["users_ge_min_interactions"],
        "items": gen["items"],
        "parquet_bytes": gen["parquet_bytes"],
        "seed": args.seed,
        "tree": str(args.tree),
        "log": str(log_path),
    }
    if m["timed_out"]:
        line["status"] = "timeout"
    elif m["returncode"] != 0:
        line["status"] = "failed"
    if line["status"] == "ok":
        try:
            line.update(read_tasks(out_dir))
        except (OSError, KeyError, ValueError) as e:
            line["status"] = "failed"
            line["error"] = f"no readable manifest in {out_dir}: {e}"
    if line["status"] != "ok":
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"build {human(rows)} {engine}: {line['status']} (log {log_path}):\n{tail}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return line


def skipped(rows: int, engine: str, reason: str) -> dict[str, Any]:
    print(f"skipping {human(rows)} {engine}: {reason}", file=sys.stderr)
    return {"bench": "build", "rows": rows, "engine": engine, "status": "skipped", "reason": reason}


def table(lines: list[dict[str, Any]]) -> str:
    head = f"{'rows':>8} {'engine':>8} {'seconds':>9} {'rows/s':>11} {'peak RSS GiB':>13} {'max1 GiB':>9} {'tasks':>9}"
    out = [head, "-" * len(head)]
    for r in lines:
        if r["status"] != "ok":
            out.append(
                f"{human(r['rows']):>8} {r['engine']:>8} {r['status']:>9}  {r.get('reason', r.get('log', ''))}"
            )
            continue
        out.append(
            f"{human(r['rows']):>8} {r['engine']:>8} {r['seconds']:>9.1f} {r['rows_per_s']:>11,.0f} "
            f"{r['peak_rss_gib']:>13.2f} {r['child_maxrss_gib']:>9.2f} {r['tasks']:>9,}"
        )
    out.append("peak RSS = sampled sum over the build's process tree; max1 = largest single process (wait4)")
    return "\n".join(out)


def git_commit(tree: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", type=parse_rows, default=parse_rows("1M,4M"), help="sizes, e.g. 1M,4M or 1e6,4e6"
    )
    p.add_argument("--engines", default="duckdb,pandas", help="comma-separated data.engine values")
    p.add_argument(
        "--seed", type=int, default=0, help="generator seed (the data is cached per rows and seed)"
    )
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="generated data, logs, shards")
    p.add_argument("--max-rows-pandas", type=parse_rows, default=[32_000_000], help="skip pandas above this")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="kill a build running longer than this")
    p.add_argument("--sample-s", type=float, default=0.2, help="process-tree RSS sampling period")
    p.add_argument("--keep", action="store_true", help="keep the built shard folders")
    p.add_argument("--generate-only", action="store_true", help="only generate (and cache) the data")
    p.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="checkout whose scripts/prepare_data.py, conf/ and src/ build the shards (default: this one)",
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument(
        "--out", "--json-out", dest="out", type=Path, default=None, help="append the JSON lines here"
    )
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.max_rows_pandas = args.max_rows_pandas[0]
    args.work_dir = args.work_dir.resolve()
    args.tree = args.tree.resolve()
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    has_engine = config_has_engine(args.tree)
    if not has_engine:
        print(
            f"{args.tree / TABULAR_CONF} has no 'engine' key: pandas runs today's builder with no "
            "data.engine override; other engines are skipped",
            file=sys.stderr,
        )
    lines: list[dict[str, Any]] = []
    generated: list[dict[str, Any]] = []
    for rows in args.rows:
        data = dataset(rows, args.seed, args.work_dir)
        generated.append({"path": str(data[0]), **data[2]})
        print(json.dumps({"bench": "build", "variant": "data", "path": str(data[0]), **data[2]}), flush=True)
        if args.generate_only:
            continue
        for engine in args.engines:
            if not has_engine and engine != "pandas":
                lines.append(skipped(rows, engine, "data.engine is not in conf/data/tabular.yaml yet"))
            elif engine == "pandas" and rows > args.max_rows_pandas:
                lines.append(skipped(rows, engine, f"rows > --max-rows-pandas {args.max_rows_pandas:,}"))
            else:
                lines.append(build(args, rows, engine, has_engine, data))
            print(json.dumps(lines[-1]), flush=True)
    summary = {
        "bench": "build",
        "variant": "summary",
        "commit": git_commit(args.tree),
        "tree": str(args.tree),
        "cpus": os.cpu_count(),
        "engine_key_in_config": has_engine,
        "data": [
            {k: g[k] for k in ("rows", "users", "items", "ctr", "parquet_bytes", "path")} for g in generated
        ],
        "builds": [
            {k: r.get(k) for k in ("rows", "engine", "status", "seconds", "peak_rss_gib", "tasks")}
            for r in lines
        ],
    }
    if lines:
        print("\n" + table(lines))
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for line in [*lines, summary]:
                f.write(json.dumps(line) + "\n")
    return [*lines, summary]


if __name__ == "__main__":
    main()
