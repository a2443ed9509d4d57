"""Your own interactions: a CSV or Parquet table plus a small YAML/JSON schema file.

Schema file keys::

    task_key: user_id            # column that groups rows into tasks
    label: rating                # numeric target (binarised later by TaskConfig.label_threshold)
    time: timestamp              # optional: numeric or datetime; orders support before query
    sparse: [user_id, item_id]   # one categorical id per row
    multi_hot: [{name: genre, max_len: 6, separator: "|"}]
    dense: [price]               # numeric columns
    hash_buckets: {item_id: 100000}   # optional, per id field
    ignore_columns: [comment]    # optional: columns present in the file but not used

Every problem is reported with the file, the column and (where it applies) the row and task.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from gmeta.data.schema import FieldSpec, Schema, SchemaError

log = logging.getLogger(__name__)

_SCHEMA_KEYS = {"task_key", "label", "time", "sparse", "multi_hot", "dense", "hash_buckets", "ignore_columns"}


def load_schema_file(path: str | Path) -> tuple[Schema, list[str]]:
    """Parse a schema file into a Schema and the list of ignored columns."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found (data.source.schema_path)")
    text = path.read_text()
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        reason = " ".join(str(e).split())
        raise SchemaError(f"{path}: not valid {kind} ({reason})") from None
    if not isinstance(spec, dict):
        raise SchemaError(f"{path}: expected a mapping with keys {sorted(_SCHEMA_KEYS)}")
    unknown = sorted(set(spec) - _SCHEMA_KEYS)
    if unknown:
        raise SchemaError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_SCHEMA_KEYS)}")
    for key in ("task_key", "label"):
        if not spec.get(key):
            raise SchemaError(f"{path}: missing required key {key!r}")
    buckets = spec.get("hash_buckets") or {}
    fields: list[FieldSpec] = []
    for name in spec.get("sparse") or []:
        fields.append(FieldSpec(str(name), "sparse", hash_buckets=int(buckets.get(name, 0))))
    for i, mh in enumerate(spec.get("multi_hot") or []):
        if not isinstance(mh, dict) or "name" not in mh or "max_len" not in mh:
            raise SchemaError(
                f"{path}: multi_hot[{i}] must be a mapping with 'name' and 'max_len' (and 'separator')"
            )
        name = str(mh["name"])
        fields.append(
            FieldSpec(
                name,
                "multi_hot",
                max_len=int(mh["max_len"]),
                separator=str(mh.get("separator", " ")),
                hash_buckets=int(buckets.get(name, 0)),
            )
        )
    for name in spec.get("dense") or []:
        fields.append(FieldSpec(str(name), "dense"))
    unknown_hashed = sorted(set(buckets) - {f.name for f in fields if f.kind != "dense"})
    if unknown_hashed:
        raise SchemaError(
            f"{path}: hash_buckets names {unknown_hashed}, which are not sparse or multi_hot fields"
        )
    try:
        schema = Schema(
            task_key=str(spec["task_key"]),
            label=str(spec["label"]),
            time=spec.get("time"),
            fields=tuple(fields),
        )
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    return schema, [str(c) for c in spec.get("ignore_columns") or []]


#: what a time column may hold (said in the error about a bad time value)
TIME_FORMATS = (
    "expected numbers (any unit: seconds, milliseconds...) or datetimes "
    "(Parquet timestamps of any unit, with or without a time zone, or ISO-8601 text such as "
    "2024-03-01 10:00:00 or 2024-03-01T10:00:00+02:00)"
)


def _floor_seconds(values: np.ndarray) -> np.ndarray:
    """Naive ``datetime64`` values of any unit -> int64 whole seconds since the epoch (floored)."""
    return values.astype("datetime64[s]").astype(np.int64)  # numpy floors towards -inf


def time_in_seconds(t: pd.Series) -> pd.Series:
    """A time column as numbers; NaN where a value is missing or unreadable.

    The build only orders rows by time and takes quantiles of first-interaction times, so any
    numeric unit works and numbers are kept as they are. Datetimes become whole seconds since the
    epoch in UTC (floored), whatever their unit (``datetime64[s|ms|us|ns]``: pandas 3 reads Parquet
    timestamps as ``[ms]``/``[us]``) or time zone; text that is not a number must be ISO-8601
    (naive values are taken as UTC). Text columns are numeric or datetime as their first present
    value is; a value of the other kind is an error at its row. The DuckDB scan (``TabularSource.scan_duckdb``) implements
    the same rules in SQL.
    """
    if isinstance(t.dtype, pd.DatetimeTZDtype):
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(t):
        values = t.to_numpy()
        missing = np.isnat(values)
        seconds = _floor_seconds(values)
        if missing.any():  # NaN marks the missing values for the caller's check
            return pd.Series(np.where(missing, np.nan, seconds.astype(np.float64)), index=t.index)
        return pd.Series(seconds, index=t.index)
    numbers = pd.to_numeric(t, errors="coerce")
    present = t.dropna()
    if present.empty or not pd.isna(numbers[present.index[0]]):  # the first value decides: numbers
        return numbers
    return time_in_seconds(pd.to_datetime(t, utc=True, format="ISO8601", errors="coerce"))


def _floor_div(x: str, d: int) -> str:
    """SQL: integer ``x`` divided by ``d`` rounded towards -inf, exactly (DuckDB's ``%`` keeps x's sign)."""
    return f"(({x}) - ((({x}) % {d}) + {d}) % {d}) // {d}"


def _duckdb_time_in_seconds(con: Any, t: str, duck_type: str, row_column: str) -> str:
    """SQL of ``time_in_seconds`` for column ``t`` (quoted) of DuckDB type ``duck_type`` in ``src_raw``.

    Timestamps of any unit or zone -> whole seconds since the epoch in UTC, floored; integers stay
    BIGINT (exact, as pandas keeps int64); other numbers DOUBLE; text (every CSV column) is
    numeric if its first present value is a number (BIGINT if all are integers), otherwise ISO-8601
    datetimes read in UTC (the session's TimeZone is set to UTC so naive text means UTC).
    """
    from gmeta.data.build.duckdb_plan import q  # the build imports sources: import late

    kind = duck_type.upper()
    if kind == "TIMESTAMP_NS":
        return _floor_div(f"epoch_ns({t})", 10**9)
    if kind.startswith("TIMESTAMP"):  # _S, _MS, plain (us), WITH TIME ZONE (us, an instant)
        return _floor_div(f"epoch_us({t})", 10**6)
    if kind == "DATE":
        return _floor_div(f"epoch_us(CAST({t} AS TIMESTAMP))", 10**6)
    if kind in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER"):
        return f"CAST({t} AS BIGINT)"
    if kind != "VARCHAR":
        return f"TRY_CAST({t} AS DOUBLE)"
    first = con.execute(
        f"SELECT TRY_CAST({t} AS DOUBLE) IS NOT NULL FROM src_raw WHERE {t} IS NOT NULL "
        f"ORDER BY {q(row_column)} LIMIT 1"
    ).fetchall()
    if not first or first[0][0]:  # the first present value decides: numbers
        not_integer = con.execute(  # TRY_CAST('1.5' AS BIGINT) would round: match integers as text
            f"SELECT count(*) FROM src_raw WHERE {t} IS NOT NULL AND NOT regexp_full_match(trim({t}), '[+-]?[0-9]+')"
        ).fetchall()[0][0]
        return f"TRY_CAST({t} AS {'BIGINT' if not_integer == 0 else 'DOUBLE'})"
    con.execute("SET TimeZone = 'UTC'")
    return _floor_div(f"epoch_us(TRY_CAST({t} AS TIMESTAMPTZ))", 10**6)


def unreadable(path: Path, kind: str, e: BaseException) -> SchemaError:
    """A file that is not the CSV / Parquet it claims to be (truncated, corrupt, ragged rows...)."""
    reason = " ".join(str(e).split())[:300]
    return SchemaError(f"{path}: cannot be read as {kind} ({reason}); check or re-export the file")


def csv_header(path: Path, sep: str) -> list[str]:
    """The column names on a CSV file's first line (an empty file is an error)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:  # -sig: drop a BOM
        header = next(csv.reader(fh, delimiter=sep), None)
    if not header:
        raise SchemaError(
            f"{path}: empty file; expected a header line naming the columns, then one row per interaction"
        )
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise SchemaError(f"{path}: the header names column(s) {twice} more than once; rename them")
    return header


def _join_lists(values: pd.Series, separator: str) -> pd.Series:
    """A multi-hot column of lists (Parquet ``list<...>``) as separator-joined text, like the CSV form."""
    return values.map(
        lambda v: (
            separator.join(str(x) for x in v if x is not None)
            if isinstance(v, list | tuple | np.ndarray)
            else v
        )
    )


def _first_bad(mask: pd.Series) -> int:
    """Position (0-based data row) of the first True in a boolean mask."""
    return int(mask.to_numpy().nonzero()[0][0])


class TabularSource:
    """Read and validate a user's own interaction table (CSV or Parquet)."""

    def __init__(self, path: str | Path, schema_path: str | Path) -> None:
        self.path = Path(path)
        self.schema_path = Path(schema_path)

    def describe(self) -> dict[str, Any]:
        if not self.path.exists():
            raise SchemaError(f"{self.path}: no such file or directory (data.source.path)")
        if not self.schema_path.is_file():
            raise SchemaError(f"{self.schema_path}: schema file not found (data.source.schema_path)")
        if self.path.is_dir():
            files = [
                [str(p.relative_to(self.path)), p.stat().st_size, p.stat().st_mtime_ns]
                for p in self._parquet_files()
            ]
            return {
                "source": "tabular",
                "path": str(self.path),
                "files": files,
                "schema": self.schema_path.read_text(),
            }
        st = self.path.stat()
        return {
            "source": "tabular",
            "path": str(self.path),
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "schema": self.schema_path.read_text(),
        }

    def _parquet_files(self) -> list[Path]:
        """The Parquet files of ``path``: the file itself, or a directory's ``*.parquet`` in name order."""
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in (".parquet", ".pq"))
            if not files:
                raise SchemaError(f"{self.path}: directory holds no .parquet files")
            return files
        return [self.path]

    def _read(self, id_columns: list[str]) -> pd.DataFrame:
        suffix = self.path.suffix.lower()
        if not self.path.exists():
            raise SchemaError(f"{self.path}: no such file or directory (data.source.path)")
        if self.path.is_dir() or suffix in (".parquet", ".pq"):
            frames = []
            for p in self._parquet_files():
                try:
                    frames.append(pd.read_parquet(p))
                except (pa.ArrowException, OSError) as e:
                    raise unreadable(p, "Parquet", e) from None
            return pd.concat(frames, ignore_index=True)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            csv_header(self.path, sep)  # an empty file: the same message as the DuckDB scan
            try:
                return pd.read_csv(self.path, sep=sep, dtype={c: str for c in id_columns})
            except (pd.errors.ParserError, UnicodeDecodeError) as e:
                raise unreadable(self.path, "CSV", e) from None
        raise SchemaError(f"{self.path}: unsupported file type {suffix!r}; expected .csv, .tsv or .parquet")

    def load(self) -> tuple[pd.DataFrame, Schema]:
        schema, ignore = load_schema_file(self.schema_path)
        f = self.path
        id_cols = list(dict.fromkeys([schema.task_key, *(x.name for x in schema.id_fields)]))
        df = self._read(id_cols)
        if df.empty:
            raise SchemaError(f"{f}: no rows (a header without interactions?)")
        required = schema.required_columns()
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise SchemaError(
                f"{f}: missing column(s) {missing} required by schema {self.schema_path} "
                f"(file has {list(df.columns)})"
            )
        extra = [c for c in df.columns if c not in required and c not in ignore]
        if extra:
            raise SchemaError(
                f"{f}: column(s) {extra} are not in schema {self.schema_path}; declare them as sparse, "
                "multi_hot or dense fields, or list them under ignore_columns"
            )
        df = df[required].reset_index(drop=True)
        key = schema.task_key

        def task_of(row: int) -> str:
            return f"{key}={df[key].iloc[row]!r}"

        for col in dict.fromkeys([key, *(x.name for x in schema.sparse)]):
            if df[col].isna().any():
                r = _first_bad(df[col].isna())
                where = "" if col == key else f" (task {task_of(r)})"
                raise SchemaError(
                    f"{f}: id column {col!r} has a missing value (NaN) at row {r}{where}; ids must be present"
                )
            df[col] = df[col].astype(str)
        for mh in schema.multi_hot:  # an empty list is allowed; Parquet lists are joined
            df[mh.name] = _join_lists(df[mh.name], mh.separator).fillna("").astype(str)
        numeric = [schema.label] + [x.name for x in schema.dense]
        for col in numeric:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = values.isna() & df[col].notna()
            if bad.any():
                r = _first_bad(bad)
                kind = "label" if col == schema.label else "dense"
                raise SchemaError(
                    f"{f}: {kind} column {col!r} must be numeric; row {r} (task {task_of(r)}) has {df[col].iloc[r]!r}"
                )
            if values.isna().any():
                r = _first_bad(values.isna())
                what = "label" if col == schema.label else "dense value"
                raise SchemaError(
                    f"{f}: {what} {col!r} is NaN at row {r} (task {task_of(r)}); expected a number"
                )
            df[col] = values.astype("float32")
        if schema.time is not None:
            t = time_in_seconds(df[schema.time])
            if t.isna().any():
                r = _first_bad(t.isna())
                raise SchemaError(
                    f"{f}: time column {schema.time!r} at row {r} (task {task_of(r)}) is missing or not "
                    f"numeric/datetime (has {df[schema.time].iloc[r]!r}); {TIME_FORMATS}"
                )
            df[schema.time] = t
        log.info("%s: %d rows, %d tasks", f, len(df), df[key].nunique())
        return df, schema

    # -- out-of-core scan (the DuckDB builder) ---------------------------------------------
    def scan_duckdb(self, con: Any, row_column: str) -> Schema:
        """Create the view ``src`` over the file(s) in DuckDB, with the same checks and types as ``load``.

        Nothing is read into Python: the checks are SQL queries that locate the first bad row.
        ``row_column`` receives each row's 0-based position (files in name order for a directory).
        A file DuckDB cannot parse (corrupt Parquet, a CSV row with too many fields) is a
        ``SchemaError`` naming it; the checks scan every row, so later passes meet no new ones.
        """
        import duckdb

        kind = "Parquet" if self.path.is_dir() or self.path.suffix.lower() in (".parquet", ".pq") else "CSV"
        try:
            return self._scan_duckdb(con, row_column)
        except (duckdb.InvalidInputException, duckdb.IOException, duckdb.ConversionException) as e:
            raise unreadable(self.path, kind, e) from None
        except pa.ArrowException as e:  # the Parquet footers are read with pyarrow
            raise unreadable(self.path, kind, e) from None

    def _scan_duckdb(self, con: Any, row_column: str) -> Schema:
        from gmeta.data.build.duckdb_plan import lit, q

        schema, ignore = load_schema_file(self.schema_path)
        f = self.path
        suffix = f.suffix.lower()
        if f.is_dir() or suffix in (".parquet", ".pq"):
            files = self._parquet_files()
            import pyarrow.parquet as pq

            counts = []
            for p in files:
                try:
                    counts.append(pq.ParquetFile(p).metadata.num_rows)
                except (pa.ArrowException, OSError) as e:
                    raise unreadable(p, "Parquet", e) from None
            offsets = np.cumsum([0] + counts[:-1])
            con.execute("CREATE TEMP TABLE src_files (filename VARCHAR, offset_rows BIGINT)")
            con.executemany(
                "INSERT INTO src_files VALUES (?, ?)",
                [[str(p), int(o)] for p, o in zip(files, offsets, strict=True)],
            )
            listing = ", ".join(lit(str(p)) for p in files)
            con.execute(
                f"CREATE VIEW src_raw AS SELECT r.* EXCLUDE (filename, file_row_number), "
                f"src_files.offset_rows + r.file_row_number AS {q(row_column)} "
                f"FROM read_parquet([{listing}], filename = true, file_row_number = true) r "
                "JOIN src_files USING (filename)"
            )
        elif suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            # the header line names the columns (as pandas reads it), every value is text; no sniffing,
            # so a row with more or fewer fields is an error, not a guess at another header
            column_types = ", ".join(f"{lit(name)}: 'VARCHAR'" for name in csv_header(f, sep))
            con.execute(
                f"CREATE VIEW src_raw AS SELECT *, row_number() OVER () - 1 AS {q(row_column)} "
                f"FROM read_csv({lit(str(f))}, delim = {lit(sep)}, header = true, auto_detect = false, "
                f"quote = '\"', escape = '\"', columns = {{{column_types}}})"
            )
        else:
            raise SchemaError(f"{f}: unsupported file type {suffix!r}; expected .csv, .tsv or .parquet")
        if not con.execute("SELECT 1 FROM src_raw LIMIT 1").fetchall():
            raise SchemaError(f"{f}: no rows (a header without interactions?)")
        types = {r[0]: r[1] for r in con.execute("DESCRIBE src_raw").fetchall()}
        columns = [c for c in types if c != row_column]
        required = schema.required_columns()
        missing = [c for c in required if c not in columns]
        if missing:
            raise SchemaError(
                f"{f}: missing column(s) {missing} required by schema {self.schema_path} (file has {columns})"
            )
        extra = [c for c in columns if c not in required and c not in ignore]
        if extra:
            raise SchemaError(
                f"{f}: column(s) {extra} are not in schema {self.schema_path}; declare them as sparse, "
                "multi_hot or dense fields, or list them under ignore_columns"
            )
        key, row = schema.task_key, q(row_column)

        def first(condition: str) -> tuple[int, Any] | None:
            """(row, task key value) of the first row where ``condition`` holds."""
            hit = con.execute(
                f"SELECT {row}, CAST({q(key)} AS VARCHAR) FROM src_raw WHERE {condition} ORDER BY {row} LIMIT 1"
            ).fetchall()
            return (int(hit[0][0]), hit[0][1]) if hit else None

        def value_at(col: str, r: int) -> Any:
            return con.execute(f"SELECT {q(col)} FROM src_raw WHERE {row} = {r}").fetchall()[0][0]

        for col in dict.fromkeys([key, *(x.name for x in schema.sparse)]):
            hit = first(f"{q(col)} IS NULL")
            if hit:
                where = "" if col == key else f" (task {key}={hit[1]!r})"
                raise SchemaError(
                    f"{f}: id column {col!r} has a missing value (NaN) at row {hit[0]}{where}; ids must be present"
                )
        for col in [schema.label] + [x.name for x in schema.dense]:
            number = f"TRY_CAST({q(col)} AS DOUBLE)"
            hit = first(f"{q(col)} IS NOT NULL AND {number} IS NULL")
            if hit:
                kind = "label" if col == schema.label else "dense"
                raise SchemaError(
                    f"{f}: {kind} column {col!r} must be numeric; row {hit[0]} (task {key}={hit[1]!r}) "
                    f"has {value_at(col, hit[0])!r}"
                )
            hit = first(f"{q(col)} IS NULL OR isnan({number})")
            if hit:
                what = "label" if col == schema.label else "dense value"
                raise SchemaError(
                    f"{f}: {what} {col!r} is NaN at row {hit[0]} (task {key}={hit[1]!r}); expected a number"
                )
        select = [
            row,
            *(
                f"CAST({q(c)} AS VARCHAR) AS {q(c)}"
                for c in dict.fromkeys([key, *(x.name for x in schema.sparse)])
            ),
        ]
        for x in schema.multi_hot:  # Parquet lists: the elements joined by the separator (NULLs skipped)
            text = (
                f"array_to_string({q(x.name)}, {lit(x.separator)})"
                if types[x.name].endswith("[]")
                else f"CAST({q(x.name)} AS VARCHAR)"
            )
            select.append(f"COALESCE({text}, '') AS {q(x.name)}")
        select += [
            f"CAST(CAST({q(c)} AS DOUBLE) AS FLOAT) AS {q(c)}"
            for c in [schema.label] + [x.name for x in schema.dense]
        ]
        if schema.time is not None:
            t = q(schema.time)
            seconds = _duckdb_time_in_seconds(con, t, types[schema.time], row_column)
            hit = first(f"({seconds}) IS NULL OR isnan(CAST({seconds} AS DOUBLE))")
            if hit:
                raise SchemaError(
                    f"{f}: time column {schema.time!r} at row {hit[0]} (task {key}={hit[1]!r}) is missing or not "
                    f"numeric/datetime (has {value_at(schema.time, hit[0])!r}); {TIME_FORMATS}"
                )
            select.append(f"{seconds} AS {t}")
        con.execute(f"CREATE VIEW src AS SELECT {', '.join(dict.fromkeys(select))} FROM src_raw")
        n = con.execute("SELECT count(*) FROM src").fetchall()[0][0]
        log.info("%s: %d rows", f, n)
        return schema
