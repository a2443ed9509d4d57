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

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from gmeta.data.schema import FieldSpec, Schema, SchemaError

log = logging.getLogger(__name__)

_SCHEMA_KEYS = {"task_key", "label", "time", "sparse", "multi_hot", "dense", "hash_buckets", "ignore_columns"}


def load_schema_file(path: str | Path) -> tuple[Schema, list[str]]:
    """Parse a schema file into a Schema and the list of ignored columns."""
    path = Path(path)
    text = path.read_text()
    spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
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


def _first_bad(mask: pd.Series) -> int:
    """Position (0-based data row) of the first True in a boolean mask."""
    return int(mask.to_numpy().nonzero()[0][0])


class TabularSource:
    """Read and validate a user's own interaction table (CSV or Parquet)."""

    def __init__(self, path: str | Path, schema_path: str | Path) -> None:
        self.path = Path(path)
        self.schema_path = Path(schema_path)

    def describe(self) -> dict[str, Any]:
        st = self.path.stat()
        return {
            "source": "tabular",
            "path": str(self.path),
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "schema": self.schema_path.read_text(),
        }

    def _read(self, id_columns: list[str]) -> pd.DataFrame:
        suffix = self.path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(self.path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(self.path, sep=sep, dtype={c: str for c in id_columns})
        raise SchemaError(f"{self.path}: unsupported file type {suffix!r}; expected .csv, .tsv or .parquet")

    def load(self) -> tuple[pd.DataFrame, Schema]:
        schema, ignore = load_schema_file(self.schema_path)
        f = self.path
        id_cols = list(dict.fromkeys([schema.task_key, *(x.name for x in schema.id_fields)]))
        df = self._read(id_cols)
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
        for mh in schema.multi_hot:
            df[mh.name] = df[mh.name].fillna("").astype(str)  # an empty list is allowed
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
            t = df[schema.time]
            if pd.api.types.is_datetime64_any_dtype(t):
                t = t.astype("int64") // 10**9
            t = pd.to_numeric(t, errors="coerce")
            if t.isna().any():
                r = _first_bad(t.isna())
                raise SchemaError(
                    f"{f}: time column {schema.time!r} at row {r} (task {task_of(r)}) is missing or not numeric/datetime"
                )
            df[schema.time] = t
        log.info("%s: %d rows, %d tasks", f, len(df), df[key].nunique())
        return df, schema
