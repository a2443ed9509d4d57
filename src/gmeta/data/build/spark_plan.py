"""The shard build on Apache Spark (``data.engine=spark``): the DuckDB plan's passes, beyond one machine.

Stage 1 runs ``duckdb_plan``'s logical steps as Spark SQL over the DataFrame of ``spark_source``,
with the same results:

* first interaction per task key (and per item for the ``quantile`` rule): one value per key,
  collected to the driver, where ``np.quantile`` gives the threshold exactly as the reference does;
* task keys sorted in code-point order on the driver (the reference's ``pd.factorize(sort=True)``),
  their val/test side by the seeded blake2b hash, joined back as a broadcast table;
* one window pass: position of every row in its (key, state) task by (time, input row) and the
  task's size; the result is persisted (memory, then disk) because every later step reads it;
* vocabularies from the training rows, sorted on the driver (the vocabulary is written there
  anyway) and joined back; hashed sparse fields hashed by a vectorised Python UDF on the executors;
  multi-hot lists encoded once per distinct raw value on the driver, as the DuckDB plan does (both
  with ``gmeta.data.encoder``'s functions);
* the encoded rows of every kept task written as Parquet to ``<out>/_build/parts/part=<p>/``
  (``p = code % partitions``), the layout of ``plan.PlanResult``.

Stage 2: one Spark task per partition runs ``partitions.write_partition`` on an executor, which
writes that partition's tar shards straight into the output folder. ``engine.write_manifest`` then
merges what the tasks return into the manifest on the driver, last. The output folder (and so the
scratch folder inside it) must therefore be one path that the driver and every executor see: a
local folder in ``local[*]`` mode, a shared file system (NFS, Lustre, a mounted bucket) on a
cluster. Executors need the project's Python environment (``gmeta`` and its dependencies).

Errors name the row, the task and the column with the reference's (and DuckDB's) words.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.data.build.duckdb_plan import ROW
from gmeta.data.build.partitions import PartitionJob, write_partition
from gmeta.data.build.plan import PlanResult, plan_columns, policy_conditions
from gmeta.data.build.spark_source import NANOS_AS_LONG, first_rows, q, source_frame, value_at
from gmeta.data.encoder import (
    FeatureEncoder,
    bucket_ids,
    fit_vocabulary,
    parse_tokens,
    resolved_label_threshold,
    token_ids,
    vocab_index,
)
from gmeta.data.hashing import stable_hash
from gmeta.data.schema import OOV_ID, FieldSpec, Schema, SchemaError
from gmeta.data.sources.base import Source
from gmeta.data.tasks import TaskConfig, auto_threshold_error, check_label_balance, filter_rules
from gmeta.errors import ConfigError

log = logging.getLogger(__name__)


def spark_session(options: Any) -> tuple[Any, bool]:
    """(session, whether this call started it): the active session if any (a notebook, the tests),
    else a new one: under ``spark-submit`` with its master and settings, otherwise on
    ``options.spark_master`` (default ``local[*]``); ``options.spark_conf`` is added in both cases."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "data.engine=spark needs pyspark: pip install 'gmeta[spark]' (make setup installs it)"
        ) from None
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("gmeta-build")
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started the JVM with its --master
    master = options.spark_master or (None if submitted else "local[*]")
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith("local"):  # Python workers: this interpreter (gmeta)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for k, v in (options.spark_conf or {}).items():
        builder = builder.config(str(k), str(v))
    return builder.getOrCreate(), True


def _bucket_udf(f: FieldSpec) -> Any:
    """A vectorised UDF: value -> its hash bucket in field ``f`` (``gmeta.data.encoder.bucket_ids``)."""
    from pyspark.sql.functions import pandas_udf

    # pyspark's stubs predate type-hinted pandas UDFs: they require the legacy functionType
    @pandas_udf("long")  # type: ignore[call-overload]
    def bucket(values: pd.Series) -> pd.Series:
        return pd.Series(bucket_ids(f, values), index=values.index, dtype="int64")

    return bucket


class SparkPlanner:
    """Runs the relational passes of ``DuckDBPlanner`` on a Spark DataFrame ``src`` of raw rows.

    ``src`` has the columns of ``Source.load()`` plus ``ROW``, the 0-based input position.
    """

    def __init__(self, spark: Any, src: Any, schema: Schema, cfg: TaskConfig) -> None:
        self.spark, self.src, self.schema, self.cfg = spark, src, schema, cfg
        self.key = cfg.task_key or schema.task_key
        self._cached: list[Any] = []
        self._n_rows: int | None = None

    # -- helpers ---------------------------------------------------------------------------
    def rows(self) -> int:
        """Number of input rows (counted once)."""
        if self._n_rows is None:
            self._n_rows = int(self.src.count())
        return self._n_rows

    def _where(self, rn: int) -> str:
        value = value_at(self.src, ROW, rn, f"CAST({q(self.key)} AS STRING)")
        return f"row {rn} (task {self.key}={value!r})"

    def _frame(self, table: pa.Table) -> Any:
        return self.spark.createDataFrame(table)

    def _persist(self, df: Any) -> Any:
        from pyspark import StorageLevel

        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self._cached.append(df)
        return df

    def release(self) -> None:
        for df in self._cached:
            df.unpersist()
        self._cached.clear()

    # -- checks (same order and words as the reference) ------------------------------------
    def check_inputs(self) -> None:
        s, key = self.schema, self.key
        columns = set(self.src.columns)
        needed = list(dict.fromkeys([key, *s.required_columns()]))
        missing = [c for c in needed if c not in columns]
        if missing:
            raise SchemaError(
                f"interaction table lacks column(s) {missing} required by the schema/task config"
            )
        if (self.cfg.new_user_quantile is not None or self.cfg.query_selection == "last") and s.time is None:
            log.warning("schema has no time column: using row order as time")
        label = f"try_cast({q(s.label)} AS DOUBLE)"
        checks = {"key": f"{q(key)} IS NULL", "label": f"{label} IS NULL OR isnan({label})"}
        if s.time:
            checks["time"] = f"{q(s.time)} IS NULL OR isnan(CAST({q(s.time)} AS DOUBLE))"
        if self.cfg.label_threshold is None or self.cfg.label_threshold == "auto":
            checks["binary"] = f"{label} NOT IN (0.0D, 1.0D)"
        hits = first_rows(self.src, ROW, checks)
        if hits["key"] is not None:
            raise SchemaError(f"task key {key!r}: missing value (NaN) at row {hits['key']}")
        r = hits.get("time")
        if r is not None:
            raise SchemaError(f"time column {s.time!r}: missing value at {self._where(r)}")
        r = hits["label"]
        if r is not None:
            raise SchemaError(f"label {s.label!r}: NaN or non-numeric value at {self._where(r)}")
        r = hits.get("binary")
        if r is not None:
            value = value_at(self.src, ROW, r, label)
            if self.cfg.label_threshold == "auto":
                raise auto_threshold_error(s.label, value, self._where(r))
            raise SchemaError(
                f"label {s.label!r}: {value} at {self._where(r)} is not 0/1 and label_threshold is None"
            )

    def duplicates(self) -> dict[str, Any]:
        """The reference's duplicate report: rows equal to an earlier row in every column the build reads."""
        from pyspark.sql import functions as F
        from pyspark.sql.window import Window

        cols = list(dict.fromkeys([self.key, *self.schema.required_columns()]))
        # NULLs (and NaNs) fall in one window partition, as in the reference's groupby(dropna=False)
        first = F.min(ROW).over(Window.partitionBy(*[F.col(q(c)) for c in cols]))
        got = (
            self.src.select(ROW, first.alias("first"))
            .where(F.col(ROW) > F.col("first"))
            .agg(
                F.count(F.lit(1)).alias("rows"), F.min(ROW).alias("r"), F.min_by("first", ROW).alias("first")
            )
            .collect()[0]
        )
        if not got["rows"]:
            return {"rows": 0, "example": None}
        r = int(got["r"])
        task = value_at(self.src, ROW, r, f"CAST({q(self.key)} AS STRING)")
        return {
            "rows": int(got["rows"]),
            "example": {"row": r, "same_as_row": int(got["first"]), "task": task},
        }

    def _field_checks(self) -> dict[str, str]:
        """The reference's encoding checks (conditions over the window rows, for ``_raise_field_errors``)."""
        checks = {f"s{i}": f"{q(f'f{i}')} IS NULL" for i in range(len(self.schema.sparse))}
        dense = [f"d{i}" for i in range(len(self.schema.dense))]
        bad = [f"({q(d)} IS NULL OR isnan({q(d)}) OR abs({q(d)}) = double('inf'))" for d in dense]
        if bad:
            checks["dense"] = " OR ".join(bad)
        return checks

    def _raise_field_errors(self, rows: Any, hits: dict[str, int | None]) -> None:
        """The first failed ``_field_checks`` (every row, filtered tasks included) as the reference words it."""
        for i, f in enumerate(self.schema.sparse):
            r = hits[f"s{i}"]
            if r is not None:
                raise SchemaError(f"sparse field {f.name!r}: missing id (NaN) at {self._where(r)}")
        r = hits.get("dense")
        if r is not None:  # the first bad row, then its first bad column (the reference's row-major order)
            dense = [f"d{i}" for i in range(len(self.schema.dense))]
            values = rows.where(f"{q(ROW)} = {r}").select(*dense).collect()[0]
            row = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            c = int(np.flatnonzero(~np.isfinite(row))[0])
            name = self.schema.dense[c].name
            raise SchemaError(f"dense field {name!r}: non-finite value {row[c]} at {self._where(r)}")

    # -- cold-start states -----------------------------------------------------------------
    def _time(self) -> str:
        return q(self.schema.time) if self.schema.time else q(ROW)

    def _firsts(self, column: str) -> pa.Table:
        """(value, first): each distinct value of ``column`` (as text) and its first time, on the driver."""
        df = self.src.selectExpr(f"CAST({column} AS STRING) AS value", f"{self._time()} AS t")
        return df.groupBy("value").agg({"t": "min"}).withColumnRenamed("min(t)", "first").toArrow()

    def _quantile_flags(self, column: str, quantile: float) -> tuple[pa.Table, float]:
        """(table (value, new), threshold): first time per value after the quantile."""
        firsts = self._firsts(column)
        first = firsts.column("first").to_numpy()
        threshold = float(np.quantile(first.astype(np.float64), quantile))
        return pa.table({"value": firsts.column("value"), "new": pa.array(first > threshold)}), threshold

    def _keys(self) -> tuple[Any, float | None, int]:
        """(DataFrame keys (k, code, new_user, is_val), new-user threshold, number of keys)."""
        cfg, key = self.cfg, self.key
        if cfg.new_user_quantile is not None:
            flags, threshold = self._quantile_flags(q(key), cfg.new_user_quantile)
        else:
            values = self.src.selectExpr(f"CAST({q(key)} AS STRING) AS value").distinct().toArrow()
            flags = pa.table(
                {"value": values.column("value"), "new": pa.array(np.zeros(values.num_rows, bool))}
            )
            threshold = None
        # code-point order = the reference's pd.factorize(sort=True); Arrow sorts UTF-8 bytewise
        flags = flags.take(pc.sort_indices(flags, sort_keys=[("value", "ascending")]))
        values = flags.column("value").to_pylist()
        is_val = np.fromiter(
            (stable_hash(f"{cfg.split_seed}:{v}") / 2**64 < cfg.val_fraction for v in values),
            dtype=bool,
            count=len(values),
        )
        table = pa.table(
            {
                "k": flags.column("value"),
                "code": pa.array(np.arange(len(values), dtype=np.int64)),
                "new_user": flags.column("new"),
                "is_val": pa.array(is_val),
            }
        )
        return self._frame(table), threshold, len(values)

    def _new_item(self) -> tuple[Any, str, str, float | None]:
        """(item flags DataFrame or None, the item column, SQL boolean of the rule, threshold)."""
        rule = self.cfg.new_item_rule
        columns = set(self.src.columns)
        if rule is None:
            return None, "", "false", None
        if "quantile" in rule:
            col = rule.get("column", self.cfg.item_key)
            if col is None or col not in columns:
                raise SchemaError(f"new_item_rule: item column {col!r} is not in the interaction table")
            flags, threshold = self._quantile_flags(q(col), float(rule["quantile"]))
            return self._frame(flags), col, "item_new", threshold
        col = rule["column"]
        if col not in columns:
            raise SchemaError(f"new_item_rule: column {col!r} is not in the interaction table")
        r = first_rows(self.src, ROW, {"bad": f"try_cast({q(col)} AS DOUBLE) IS NULL"})["bad"]
        if r is not None:
            value = value_at(self.src, ROW, r, q(col))
            raise SchemaError(f"new_item_rule: column {col!r} is not numeric at {self._where(r)}: {value!r}")
        return (
            None,
            col,
            f"(try_cast({q(col)} AS DOUBLE) >= {float(rule['min_value'])!r}D)",
            float(rule["min_value"]),
        )

    # -- vocabularies ----------------------------------------------------------------------
    def _distinct_values(self, rows: Any, train: str) -> dict[str, tuple[list[str], list[bool]]]:
        """One pass: column -> (its distinct values, whether each occurs in a training row), for every
        non-hashed sparse column ``f<i>`` (training rows only) and every multi-hot column ``m<i>``."""
        items = [
            f"IF({train}, named_struct('c', 'f{i}', 'v', {q(f'f{i}')}, 't', true), NULL)"
            for i, f in enumerate(self.schema.sparse)
            if f.hash_buckets == 0
        ]
        items += [
            f"named_struct('c', 'm{i}', 'v', {q(f'm{i}')}, 't', {train})"
            for i in range(len(self.schema.multi_hot))
        ]
        out: dict[str, tuple[list[str], list[bool]]] = {}
        if not items:
            return out
        table = (
            rows.selectExpr(f"explode(array({', '.join(items)})) AS x")
            .where("x IS NOT NULL")
            .selectExpr("x.c AS c", "x.v AS v", "x.t AS t")
            .groupBy("c", "v")
            .agg({"t": "max"})
            .toDF("c", "v", "t")
            .toArrow()
        )
        for c in pc.unique(table.column("c")).to_pylist():
            part = table.filter(pc.equal(table.column("c"), c))
            out[c] = (part.column("v").to_pylist(), part.column("t").to_pylist())
        return out

    def _sparse_ids(
        self, i: int, f: FieldSpec, distinct: dict[str, tuple[list[str], list[bool]]], encoded: Any
    ) -> tuple[Any, int, list[str]]:
        """(``encoded`` plus column ``s<i>``, vocab size, vocabulary) of sparse field ``f`` (``f<i>``)."""
        from pyspark.sql import functions as F

        col = f"f{i}"
        if f.hash_buckets > 0:
            bucket = _bucket_udf(f)
            return encoded.withColumn(f"s{i}", bucket(F.col(col))), f.hash_buckets + 1, []
        vocab = fit_vocabulary(distinct.get(col, ([], []))[0])
        ids = self._frame(
            pa.table(
                {
                    col: pa.array(vocab, pa.string()),
                    f"s{i}": pa.array(np.arange(1, len(vocab) + 1, dtype=np.int64)),
                }
            )
        )
        joined = encoded.join(ids, col, "left").fillna(OOV_ID, subset=[f"s{i}"])
        return joined, len(vocab) + 1, vocab

    def _multi_hot_ids(
        self,
        i: int,
        f: FieldSpec,
        width: int,
        rows: Any,
        distinct: dict[str, tuple[list[str], list[bool]]],
        encoded: Any,
    ) -> tuple[Any, int, list[str]]:
        """(``encoded`` plus ``m<i>_<j>``, vocab size, vocabulary): each distinct raw list encoded
        once, on the driver, as the DuckDB plan does (lists are short and repeat)."""
        from pyspark.sql import functions as F

        col = f"m{i}"
        raw, in_train = distinct.get(col, ([], []))
        lists = [parse_tokens(v, f.separator) for v in raw]
        too_long = [v for v, toks in zip(raw, lists, strict=True) if len(toks) > f.max_len]
        if too_long:  # max_len is checked on every row; name the first row holding a too long list
            bad = self._frame(pa.table({col: pa.array(too_long, pa.string())}))
            r = int(rows.join(F.broadcast(bad), col).agg(F.min(ROW)).collect()[0][0])
            v = value_at(rows, ROW, r, q(col))
            n = len(parse_tokens(v, f.separator))
            raise SchemaError(
                f"multi_hot field {f.name!r}: {self._where(r)} has {n} ids, more than max_len={f.max_len}"
            )
        if f.hash_buckets > 0:
            vocab: list[str] = []
            size, index = f.hash_buckets + 1, None
        else:
            vocab = fit_vocabulary(t for toks, tr in zip(lists, in_train, strict=True) if tr for t in toks)
            size, index = len(vocab) + 1, vocab_index(vocab)
        table = token_ids(f, lists, index, width)
        codes = self._frame(
            pa.table({col: pa.array(raw, pa.string()), **{f"m{i}_{j}": table[:, j] for j in range(width)}})
        )
        return encoded.join(codes, col), size, vocab

    # -- the whole plan --------------------------------------------------------------------
    def run(self, out_dir: Path, partitions: int) -> PlanResult:
        from pyspark.sql import functions as F
        from pyspark.sql.window import Window

        s, cfg, key = self.schema, self.cfg, self.key
        self.check_inputs()
        n_rows = self.rows()
        keys, user_threshold, n_keys = self._keys()
        item_flags, item_col, new_item, item_threshold = self._new_item()
        duplicates = self.duplicates()
        label = f"CAST({q(s.label)} AS DOUBLE)"
        threshold = resolved_label_threshold(cfg.label_threshold)
        label_value = (
            f"CAST({label} >= {threshold!r}D AS FLOAT)"
            if threshold is not None
            else f"CAST({label} AS FLOAT)"
        )
        src = self.src.withColumn("_gmeta_k", F.expr(f"CAST({q(key)} AS STRING)"))
        if item_flags is not None:
            flags = item_flags.withColumnRenamed("value", "_gmeta_item").withColumnRenamed("new", "item_new")
            src = src.withColumn("_gmeta_item", F.expr(f"CAST({q(item_col)} AS STRING)")).join(
                F.broadcast(flags), "_gmeta_item"
            )
        joined = src.join(F.broadcast(keys.withColumnRenamed("k", "_gmeta_k")), "_gmeta_k")
        select = [
            q(ROW),
            "code",
            "_gmeta_k AS k",
            "is_val",
            f"(CAST(new_user AS INT) + 2 * CAST({new_item} AS INT)) AS state",
            f"{self._time()} AS t",
            f"{label_value} AS label",
        ]
        select += [f"CAST({q(f.name)} AS STRING) AS {q(f'f{i}')}" for i, f in enumerate(s.sparse)]
        select += [
            f"COALESCE(CAST({q(f.name)} AS STRING), '') AS {q(f'm{i}')}" for i, f in enumerate(s.multi_hot)
        ]
        select += [f"try_cast({q(f.name)} AS FLOAT) AS {q(f'd{i}')}" for i, f in enumerate(s.dense)]
        lo, hi, qs = cfg.min_interactions, cfg.max_interactions, cfg.query_size
        # one window pass: each row's position in its (key, state) history by (time, input row)
        # (pos_all) and the history's size (n_all); then its task, as in the DuckDB plan: the whole
        # history (win = -1) or, under max_interactions_policy=window (train_window: warm histories
        # only), for a history longer than hi, window win of hi rows counted back from the latest
        # (tasks.window_bounds). pos / n: the row's position in its task and the task's size.
        history = Window.partitionBy("code", "state")
        windowed, holds_out = policy_conditions(cfg)
        offset = f"(((n_all + {hi} - 1) div {hi}) * {hi} - n_all)"  # rows the oldest window lacks
        start = f"CASE WHEN win >= 0 THEN greatest(0, win * {hi} - {offset}) ELSE 0 END"
        end = f"CASE WHEN win >= 0 THEN (win + 1) * {hi} - {offset} ELSE n_all END"
        rows = (
            joined.selectExpr(*select)
            .withColumn("pos_all", F.row_number().over(history.orderBy("t", ROW)) - 1)
            .withColumn("n_all", F.count(F.lit(1)).over(history))
            .withColumn(
                "win",
                F.expr(
                    f"CAST(CASE WHEN {windowed} THEN (pos_all + {offset}) div {hi} ELSE -1 END AS BIGINT)"
                ),
            )
            .withColumn("pos", F.expr(f"CAST(pos_all - ({start}) AS BIGINT)"))
            .withColumn("n", F.expr(f"CAST(({end}) - ({start}) AS BIGINT)"))
        )
        rows = self._persist(rows)
        kept = f"n BETWEEN {lo} AND {hi}"
        held = f"(state = 0 AND {holds_out} AND n - {qs} >= {lo} AND pos >= n - {qs})"
        train = f"state = 0 AND {kept} AND NOT {held}"
        reasons = {  # tasks.FILTER_REASONS, as the DuckDB plan counts them
            "too_few_interactions": f"n_all < {lo}",
            "too_many_interactions": f"n_all > {hi} AND win < 0",
            "window_remainder": f"win >= 0 AND n < {lo}",
        }
        # labels per split: train rows, and the whole task of every evaluation task (val / test)
        evaluated = f"{kept} AND (state <> 0 OR ({holds_out} AND n - {qs} >= {lo}))"
        where = {"train": train, "val": f"{evaluated} AND is_val", "test": f"{evaluated} AND NOT is_val"}
        # one pass for the field checks and every count
        checks = self._field_checks()
        aggs = [
            f"min(CASE WHEN {cond} THEN {q(ROW)} END) AS {q('check_' + name)}"
            for name, cond in checks.items()
        ]
        aggs.append("sum(label) AS positives")
        for i, cond in enumerate(reasons.values()):
            aggs += [f"count_if(({cond}) AND pos = 0) AS tasks{i}", f"count_if({cond}) AS rows{i}"]
        for split, cond in where.items():
            aggs += [f"count_if({cond}) AS n_{split}", f"sum(CASE WHEN {cond} THEN label END) AS p_{split}"]
        got = rows.selectExpr(*aggs).collect()[0]
        self._raise_field_errors(rows, {name: got["check_" + name] for name in checks})
        filtered = {
            reason: {"tasks": int(got[f"tasks{i}"]), "interactions": int(got[f"rows{i}"])}
            for i, reason in enumerate(reasons)
        }
        label_counts = {}
        for split in where:
            positive = int(got[f"p_{split}"] or 0)
            label_counts[split] = {"positive": positive, "negative": int(got[f"n_{split}"]) - positive}
        check_label_balance(label_counts, threshold, s.label)
        positives = got["positives"] or 0.0

        sizes: dict[str, int] = {}
        vocabs: dict[str, list[str]] = {}
        encoded = rows.where(kept)
        distinct = self._distinct_values(rows, train)
        for i, f in enumerate(s.sparse):
            encoded, sizes[f.name], vocabs[f.name] = self._sparse_ids(i, f, distinct, encoded)
        width = s.max_multi_hot_len
        for i, f in enumerate(s.multi_hot):
            encoded, sizes[f.name], vocabs[f.name] = self._multi_hot_ids(i, f, width, rows, distinct, encoded)
        parts = max(1, int(partitions))
        columns = plan_columns(s)
        out = encoded.selectExpr(
            f"CAST(code % {parts} AS INT) AS part",
            "code",
            "k",
            "state",
            "win",
            "pos",
            "is_val",
            "label",
            *columns.sparse,
            *(c for names in columns.multi_hot for c in names),
            *columns.dense,
        )
        # all rows of a partition in one Spark task: one Parquet file per partition
        out.repartition("part").write.mode("overwrite").partitionBy("part").parquet(
            out_dir.resolve().as_uri()
        )
        stats: dict[str, Any] = {
            "interactions": n_rows,
            "task_keys": n_keys,
            "filtered": filtered,
            "new_user_first_time_threshold": user_threshold,
            "new_item_threshold": item_threshold,
            "positive_rate": float(positives) / n_rows if n_rows else 0.0,
            "vocab_sizes": {f.name: sizes[f.name] for f in s.id_fields},
            "label_threshold": threshold,
            "label_counts": label_counts,
            "duplicates": duplicates,
            "filter_rules": filter_rules(cfg),
        }
        return PlanResult(
            parts_dir=out_dir,
            partitions=parts,
            encoder=FeatureEncoder(s.with_vocab_sizes(sizes), vocabs, threshold, cfg.item_key, "build"),
            stats=stats,
            columns=columns,
        )


def run_spark(
    source: Source,
    task_config: TaskConfig,
    out: Path,
    scratch: Path,
    seed: int,
    tasks_per_shard: int,
    options: Any,
) -> tuple[PlanResult, list[dict[str, Any]]]:
    """Plan on Spark, then write every partition's shards on the executors; return (plan, results).

    ``results`` are ``write_partition``'s returns in partition order, for ``engine.write_manifest``.
    """
    spark, started = spark_session(options)
    # settings the build changes on the session, restored at the end
    saved = {key: spark.conf.get(key, None) for key in ("spark.sql.session.timeZone", NANOS_AS_LONG)}
    spark.conf.set("spark.sql.session.timeZone", "UTC")  # naive datetime text is UTC, as in the other engines
    try:
        src, schema = source_frame(spark, source, ROW)
        planner = SparkPlanner(spark, src, schema, task_config)
        try:
            partitions = max(1, math.ceil(planner.rows() / max(1, options.rows_per_partition)))
            plan = planner.run(scratch / "parts", partitions)
        finally:
            planner.release()
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
        # one Spark task per partition; collect() keeps partition order
        results = spark.sparkContext.parallelize(jobs, len(jobs)).map(write_partition).collect()
    finally:
        if started:
            spark.stop()
        else:
            for key, value in saved.items():
                if value is None:
                    spark.conf.unset(key)
                else:
                    spark.conf.set(key, value)
    log.info("spark build: %d partitions written", len(results))
    return plan, results
