"""Sources as Spark DataFrames for ``data.engine=spark``: the rows, typed as ``Source.load()`` types
them, plus ``ROW``, each row's 0-based input position.

* Tabular CSV/TSV/Parquet (a file or a directory of Parquet files): read by Spark, in parallel and
  out of core, with the same checks and the same error words as ``TabularSource.load`` /
  ``TabularSource.scan_duckdb`` (file, column, row, task). The checks run as one aggregation that
  finds the first bad row of every check at once.
* Every other source (MovieLens, synthetic: small) is loaded in pandas on the driver and handed to
  Spark as an Arrow table.

The input position must be exact: it breaks ties in time order (and is the time when there is no
time column), and errors name it. Spark keeps no row order, so it is rebuilt: for a Parquet file,
the reader's per-file ``_metadata.row_index`` plus the rows of the files before it (name order, as
the DuckDB scan); for a CSV file, the position inside Spark's read partition
(``monotonically_increasing_id``: partition index << 33 | row in partition) plus the rows of the
partitions before it. The splits of one file are read in file order (Spark sorts splits by size,
stably, and all splits but the last have the same size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa

from gmeta.data.schema import Schema, SchemaError
from gmeta.data.sources.base import Source

log = logging.getLogger(__name__)


def q(name: str) -> str:
    """A quoted Spark SQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def lit(text: str) -> str:
    """A quoted Spark SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def first_rows(df: Any, row: str, conditions: dict[str, str]) -> dict[str, int | None]:
    """The first ``row`` (smallest) where each SQL condition holds, all in one pass over ``df``."""
    if not conditions:
        return {}
    exprs = [f"min(CASE WHEN {cond} THEN {q(row)} END) AS {q(name)}" for name, cond in conditions.items()]
    hit = df.selectExpr(*exprs).collect()[0]
    return {name: None if hit[name] is None else int(hit[name]) for name in conditions}


def value_at(df: Any, row_column: str, r: int, expr: str) -> Any:
    """The value of the SQL expression ``expr`` at input row ``r``."""
    return df.where(f"{q(row_column)} = {int(r)}").selectExpr(f"{expr} AS v").collect()[0]["v"]


def _local_path(uri: str) -> Path:
    """A Spark file URI (``file:/a/b%20c.parquet``) as a local path."""
    return Path(unquote(urlparse(uri).path))


def _parquet_with_rows(spark: Any, files: list[Path], row_column: str) -> Any:
    """All Parquet ``files`` (in this order) as one DataFrame plus the 0-based input position."""
    from pyspark.sql import functions as F

    raw = spark.read.parquet(*[p.resolve().as_uri() for p in files])
    meta = raw.select(
        "*",
        F.col("_metadata.file_path").alias("_gmeta_file"),
        F.col("_metadata.row_index").alias("_gmeta_index"),
    )
    # rows per file as Spark names the files (reads only the row counts), then offsets in name order
    counts = {r["_gmeta_file"]: int(r["count"]) for r in meta.groupBy("_gmeta_file").count().collect()}
    order = {p.resolve(): i for i, p in enumerate(files)}
    named = sorted(counts, key=lambda uri: order[_local_path(uri).resolve()])
    offsets = np.cumsum([0] + [counts[u] for u in named[:-1]]).tolist()
    table = spark.createDataFrame(
        [(u, int(o)) for u, o in zip(named, offsets, strict=True)], "_gmeta_file string, _gmeta_offset long"
    )
    joined = meta.join(F.broadcast(table), "_gmeta_file")
    return joined.withColumn(row_column, F.col("_gmeta_offset") + F.col("_gmeta_index")).drop(
        "_gmeta_file", "_gmeta_index", "_gmeta_offset"
    )


def _csv_with_rows(spark: Any, path: Path, sep: str, row_column: str) -> Any:
    """One CSV/TSV file (every column as text) plus the 0-based input position."""
    from pyspark.sql import functions as F

    from gmeta.data.sources.tabular import csv_header

    names = csv_header(path, sep)  # as the other engines name the columns (no BOM; a name twice is an error)
    # FAILFAST: a malformed line is an error, never a row silently filled with nulls
    raw = spark.read.csv(path.resolve().as_uri(), header=True, sep=sep, escape='"', mode="FAILFAST")
    if len(names) == len(raw.columns):
        raw = raw.toDF(*names)
    with_id = raw.withColumn("_gmeta_id", F.monotonically_increasing_id())
    part = F.shiftright(F.col("_gmeta_id"), 33)
    counts = {int(r["p"]): int(r["count"]) for r in with_id.groupBy(part.alias("p")).count().collect()}
    parts = sorted(counts)
    offsets = np.cumsum([0] + [counts[p] for p in parts[:-1]]).tolist()
    table = spark.createDataFrame(
        [(p, int(o)) for p, o in zip(parts, offsets, strict=True)], "_gmeta_part long, _gmeta_offset long"
    )
    joined = with_id.withColumn("_gmeta_part", part).join(F.broadcast(table), "_gmeta_part")
    in_part = F.col("_gmeta_id").bitwiseAND(F.lit((1 << 33) - 1))
    return joined.withColumn(row_column, F.col("_gmeta_offset") + in_part).drop(
        "_gmeta_id", "_gmeta_part", "_gmeta_offset"
    )


#: Spark refuses Parquet TIMESTAMP(NANOS) columns unless told to read them as integer nanoseconds
NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"


def _nanosecond_time(spark: Any, first_file: Path, time: str | None) -> bool:
    """Whether the time column is a Parquet TIMESTAMP(NANOS) (pandas' default ``datetime64[ns]``);
    if so, Spark reads it as integer nanoseconds (``run_spark`` restores the setting afterwards)."""
    import pyarrow.parquet as pq

    if time is None:
        return False
    names = pq.read_schema(first_file)
    if time not in names.names:
        return False
    kind = names.field(time).type
    nanos = pa.types.is_timestamp(kind) and kind.unit == "ns"
    if nanos:
        spark.conf.set(NANOS_AS_LONG, "true")
    return nanos


def _floor_div(x: str, d: int) -> str:
    """Spark SQL: integer ``x`` divided by ``d`` rounded towards -inf, exactly."""
    return f"((({x}) - pmod({x}, {d})) div {d})"


def _time_in_seconds(raw: Any, t: str, kind: Any, row_column: str, nanos: bool = False) -> str:
    """Spark SQL of ``tabular.time_in_seconds`` (and of the DuckDB scan) for column ``t`` (quoted).

    Timestamps -> whole seconds since the epoch in UTC, floored; integers stay BIGINT; other
    numbers DOUBLE; text (every CSV column) is numeric if its first present value is a number
    (BIGINT if all are integers), otherwise ISO-8601 datetimes (naive text is UTC: the build runs
    with the session time zone set to UTC).
    """
    from pyspark.sql import types as T

    if nanos:  # a Parquet TIMESTAMP(NANOS), read as its integer nanoseconds since the epoch (UTC)
        return _floor_div(f"CAST({t} AS BIGINT)", 10**9)
    if isinstance(kind, T.TimestampNTZType):  # wall-clock time, taken as UTC
        micros = f"timestampdiff(MICROSECOND, TIMESTAMP_NTZ'1970-01-01 00:00:00', {t})"
        return _floor_div(micros, 10**6)
    if isinstance(kind, T.TimestampType):  # an instant
        return _floor_div(f"unix_micros({t})", 10**6)
    if isinstance(kind, T.DateType):
        return f"CAST(unix_date({t}) AS BIGINT) * 86400"
    if isinstance(kind, T.IntegralType):
        return f"CAST({t} AS BIGINT)"
    if not isinstance(kind, T.StringType):
        return f"try_cast({t} AS DOUBLE)"
    first = (
        raw.where(f"{t} IS NOT NULL")
        .orderBy(row_column)
        .limit(1)
        .selectExpr(f"try_cast({t} AS DOUBLE) IS NOT NULL AS number")
        .collect()
    )
    if not first or first[0]["number"]:  # the first present value decides: numbers
        not_integer = raw.where(f"{t} IS NOT NULL AND NOT trim({t}) RLIKE '^[+-]?[0-9]+$'").limit(1).count()
        return f"try_cast({t} AS {'BIGINT' if not_integer == 0 else 'DOUBLE'})"
    return _floor_div(f"unix_micros(try_cast({t} AS TIMESTAMP))", 10**6)


def scan_tabular(spark: Any, source: Any, row_column: str) -> tuple[Any, Schema]:
    """The tabular source's rows as a typed DataFrame, with the checks of ``TabularSource.scan_duckdb``.

    A file Spark cannot read (corrupt Parquet, a CSV row with more or fewer fields) is the same
    ``SchemaError`` naming the file as in the other engines.
    """
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    from gmeta.data.sources.tabular import unreadable

    f = Path(source.path)
    kind = "Parquet" if f.is_dir() or f.suffix.lower() in (".parquet", ".pq") else "CSV"
    try:
        return _scan_tabular(spark, source, row_column)
    except (PySparkException, Py4JJavaError) as e:
        raise unreadable(f, kind, e) from None


def _scan_tabular(spark: Any, source: Any, row_column: str) -> tuple[Any, Schema]:
    from pyspark.sql import types as T

    from gmeta.data.sources.tabular import TIME_FORMATS, load_schema_file

    schema, ignore = load_schema_file(source.schema_path)
    f = Path(source.path)
    nanos = False
    if not f.exists():
        raise SchemaError(f"{f}: no such file or directory (data.source.path)")
    suffix = f.suffix.lower()
    if f.is_dir() or suffix in (".parquet", ".pq"):
        files = (
            sorted(p for p in f.rglob("*") if p.suffix.lower() in (".parquet", ".pq")) if f.is_dir() else [f]
        )
        if not files:
            raise SchemaError(f"{f}: directory holds no .parquet files")
        nanos = _nanosecond_time(spark, files[0], schema.time)
        raw = _parquet_with_rows(spark, files, row_column)
    elif suffix in (".csv", ".tsv", ".txt"):
        raw = _csv_with_rows(spark, f, "\t" if suffix == ".tsv" else ",", row_column)
    else:
        raise SchemaError(f"{f}: unsupported file type {suffix!r}; expected .csv, .tsv or .parquet")
    if not raw.limit(1).count():
        raise SchemaError(f"{f}: no rows (a header without interactions?)")
    types = {x.name: x.dataType for x in raw.schema.fields}
    columns = [c for c in raw.columns if c != row_column]
    required = schema.required_columns()
    missing = [c for c in required if c not in columns]
    if missing:
        raise SchemaError(
            f"{f}: missing column(s) {missing} required by schema {source.schema_path} (file has {columns})"
        )
    extra = [c for c in columns if c not in required and c not in ignore]
    if extra:
        raise SchemaError(
            f"{f}: column(s) {extra} are not in schema {source.schema_path}; declare them as sparse, "
            "multi_hot or dense fields, or list them under ignore_columns"
        )
    key = schema.task_key
    ids = list(dict.fromkeys([key, *(x.name for x in schema.sparse)]))
    numeric = [schema.label] + [x.name for x in schema.dense]
    seconds = None
    if schema.time is not None:
        seconds = _time_in_seconds(raw, q(schema.time), types[schema.time], row_column, nanos)
    # every check of scan_duckdb, in its order; one pass finds the first bad row of each
    checks: dict[str, str] = {}
    for i, col in enumerate(ids):
        checks[f"id{i}"] = f"{q(col)} IS NULL"
    for i, col in enumerate(numeric):
        number = f"try_cast({q(col)} AS DOUBLE)"
        checks[f"text{i}"] = f"{q(col)} IS NOT NULL AND {number} IS NULL"
        checks[f"nan{i}"] = f"{q(col)} IS NULL OR isnan({number})"
    if seconds is not None:
        checks["time"] = f"({seconds}) IS NULL OR isnan(CAST({seconds} AS DOUBLE))"
    hits = first_rows(raw, row_column, checks)

    def task_at(r: int) -> str:
        return value_at(raw, row_column, r, f"CAST({q(key)} AS STRING)")

    for i, col in enumerate(ids):
        r = hits[f"id{i}"]
        if r is not None:
            where = "" if col == key else f" (task {key}={task_at(r)!r})"
            raise SchemaError(
                f"{f}: id column {col!r} has a missing value (NaN) at row {r}{where}; ids must be present"
            )
    for i, col in enumerate(numeric):
        r = hits[f"text{i}"]
        if r is not None:
            kind = "label" if col == schema.label else "dense"
            raise SchemaError(
                f"{f}: {kind} column {col!r} must be numeric; row {r} (task {key}={task_at(r)!r}) "
                f"has {value_at(raw, row_column, r, q(col))!r}"
            )
        r = hits[f"nan{i}"]
        if r is not None:
            what = "label" if col == schema.label else "dense value"
            raise SchemaError(
                f"{f}: {what} {col!r} is NaN at row {r} (task {key}={task_at(r)!r}); expected a number"
            )
    r = hits.get("time")
    if r is not None:
        assert schema.time is not None  # the time check exists only for a time column
        raise SchemaError(
            f"{f}: time column {schema.time!r} at row {r} (task {key}={task_at(r)!r}) is missing or not "
            f"numeric/datetime (has {value_at(raw, row_column, r, q(schema.time))!r}); {TIME_FORMATS}"
        )
    select = [q(row_column), *(f"CAST({q(c)} AS STRING) AS {q(c)}" for c in ids)]
    for x in schema.multi_hot:  # Parquet lists: the elements joined by the separator (NULLs skipped)
        text = (
            f"array_join(CAST({q(x.name)} AS ARRAY<STRING>), {lit(x.separator)})"
            if isinstance(types[x.name], T.ArrayType)
            else f"CAST({q(x.name)} AS STRING)"
        )
        select.append(f"COALESCE({text}, '') AS {q(x.name)}")
    select += [f"CAST(try_cast({q(c)} AS DOUBLE) AS FLOAT) AS {q(c)}" for c in numeric]
    if seconds is not None:
        assert schema.time is not None  # seconds is computed only for a time column
        select.append(f"{seconds} AS {q(schema.time)}")
    log.info("%s: scanned by Spark", f)
    return raw.selectExpr(*dict.fromkeys(select)), schema


def source_frame(spark: Any, source: Source, row_column: str) -> tuple[Any, Schema]:
    """(DataFrame of the source's rows plus ``row_column``, schema) for any source."""
    from gmeta.data.sources.tabular import TabularSource

    if isinstance(source, TabularSource):
        return scan_tabular(spark, source, row_column)
    df, schema = source.load()
    if row_column in df.columns:
        raise SchemaError(f"column name {row_column!r} is reserved for the builder")
    frame = df.reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column(row_column, pa.array(np.arange(len(frame), dtype=np.int64)))
    return spark.createDataFrame(table), schema
