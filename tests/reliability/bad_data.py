"""The own-data part of the bad-input corpus: each case is a small table, schema file and task config
in a temporary folder that a build must refuse with a message naming what, where and how to fix it.

Shared by the tests (``test_bad_data.py``) and the table in ``docs/reliability.md``
(``python tests/reliability/table.py`` prints it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SCHEMA = (
    "task_key: uid\nlabel: y\ntime: ts\nsparse: [uid, item]\n"
    "multi_hot: [{name: tags, max_len: 3, separator: ' '}]\ndense: [price]\n"
)
#: a task config that keeps every task of the good table (12 users x 16 rows, 0/1 clicks)
TASKS = dict(
    label_threshold="auto",
    min_interactions=6,
    max_interactions=40,
    query_size=3,
    new_user_quantile=None,
    new_item_rule=None,
    item_key="item",
)


def good_table(users: int = 12, per_user: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = users * per_user
    return pd.DataFrame(
        {
            "uid": np.repeat([f"u{i:02d}" for i in range(users)], per_user),
            "y": np.tile([0, 1], n // 2),
            "ts": np.arange(n) * 60,
            "item": [f"i{k}" for k in rng.integers(0, 20, n)],
            "tags": [" ".join(f"t{k}" for k in range(1 + i % 3)) for i in range(n)],
            "price": rng.random(n).round(3),
        }
    )


def _set(column: str, row: int, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({column: object})
        df.loc[row, column] = value
        return df

    return change


@dataclass(frozen=True)
class DataCase:
    """A bad own-data input and the error it must give (a regex; ``{file}`` is the data file's name)."""

    id: str
    what: str
    message: str
    table: Callable[[pd.DataFrame], pd.DataFrame] = lambda df: df
    schema: str = SCHEMA
    tasks: dict[str, Any] = field(default_factory=dict)
    fmt: str = "csv"  # csv | parquet | raw (the file's bytes are ``raw``)
    raw: bytes = b""
    engines: tuple[str, ...] = ("pandas", "duckdb")

    def write(self, folder: Path) -> tuple[Path, Path]:
        """(data path, schema path) of this case under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        schema = folder / "schema.yaml"
        schema.write_text(self.schema)
        if self.fmt == "raw":
            path = folder / self.id.split(":")[-1]
            path.write_bytes(self.raw)
            return path, schema
        df = self.table(good_table())
        path = folder / f"inter.{self.fmt}"
        if self.fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path)
        return path, schema


def _ratings(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(y=(np.arange(len(df)) % 5) + 1)


def _zone_mix(df: pd.DataFrame) -> pd.DataFrame:
    df = df.astype({"ts": object})
    df.loc[9, "ts"] = "2024-03-01T10:00:00"
    return df


DATA_CASES: list[DataCase] = [
    # -- the table against its schema ----------------------------------------------------------
    DataCase(
        "missing-column",
        "a column the schema names is absent",
        r"inter.csv: missing column\(s\) \['price'\] required by schema .*schema.yaml \(file has",
        table=lambda df: df.drop(columns="price"),
    ),
    DataCase(
        "extra-column",
        "a column the schema does not name",
        r"inter.csv: column\(s\) \['comment'\] are not in schema .*declare them .* or list them under ignore_columns",
        table=lambda df: df.assign(comment="x"),
    ),
    DataCase(
        "nan-id",
        "an empty id",
        r"inter.csv: id column 'item' has a missing value \(NaN\) at row 5 \(task uid='u00'\); ids must be present",
        table=_set("item", 5, None),
    ),
    DataCase(
        "nan-task-key",
        "an empty task key",
        r"inter.csv: id column 'uid' has a missing value \(NaN\) at row 20; ids must be present",
        table=_set("uid", 20, None),
    ),
    DataCase(
        "nan-label",
        "an empty label",
        r"inter.csv: label 'y' is NaN at row 7 \(task uid='u00'\); expected a number",
        table=_set("y", 7, None),
    ),
    DataCase(
        "text-label",
        "a label that is not a number",
        r"inter.csv: label column 'y' must be numeric; row 33 \(task uid='u02'\) has 'yes'",
        table=_set("y", 33, "yes"),
    ),
    DataCase(
        "text-dense",
        "a dense value that is not a number",
        r"inter.csv: dense column 'price' must be numeric; row 40 \(task uid='u02'\) has 'cheap'",
        table=_set("price", 40, "cheap"),
    ),
    DataCase(
        "inf-dense",
        "an infinite dense value",
        r"dense field 'price': non-finite value inf at row 41 \(task uid='u02'\)",
        table=_set("price", 41, np.inf),
    ),
    DataCase(
        "nan-time",
        "an empty time",
        r"inter.csv: time column 'ts' at row 50 \(task uid='u03'\) is missing or not numeric/datetime",
        table=_set("ts", 50, None),
    ),
    DataCase(
        "text-time",
        "a time that is neither a number nor a datetime",
        r"inter.csv: time column 'ts' at row 51 \(task uid='u03'\) is missing or not numeric/datetime "
        r"\(has 'soon'\); expected numbers .* or datetimes",
        table=_set("ts", 51, "soon"),
    ),
    DataCase(
        "mixed-time",
        "a datetime among numeric times",
        r"inter.csv: time column 'ts' at row 9 \(task uid='u00'\) is missing or not numeric/datetime "
        r"\(has '2024-03-01T10:00:00'\)",
        table=_zone_mix,
    ),
    DataCase(
        "long-multi-hot",
        "a multi-hot list longer than max_len",
        r"multi_hot field 'tags': row 12 \(task uid='u00'\) has 4 ids, more than max_len=3",
        table=_set("tags", 12, "a b c d"),
    ),
    DataCase(
        "parquet-text-label",
        "a Parquet label column of text",
        r"inter.parquet: label column 'y' must be numeric; row 3 \(task uid='u00'\) has 'no'",
        table=lambda df: df.assign(y=df["y"].astype(str).where(df.index != 3, "no")),
        fmt="parquet",
    ),
    DataCase(
        "parquet-nan-time",
        "a Parquet timestamp that is NaT",
        r"inter.parquet: time column 'ts' at row 4 \(task uid='u00'\) is missing or not numeric/datetime",
        table=lambda df: df.assign(
            ts=pd.Series(pd.to_datetime(df["ts"], unit="s")).where(df.index != 4).astype("datetime64[ms]")
        ),
        fmt="parquet",
    ),
    # -- labels and tasks ----------------------------------------------------------------------
    DataCase(
        "auto-threshold-ratings",
        "1..5 ratings under label_threshold auto",
        r"label 'y': 2.0 at row 1 \(task uid='u00'\) is not 0/1, so label_threshold 'auto' cannot apply; set "
        r"data.task_config.label_threshold to a number",
        table=_ratings,
    ),
    DataCase(
        "clicks-under-rating-threshold",
        "0/1 clicks under label_threshold 4.0: no positives",
        r"split 'train' has 0 positive and \d+ negative labels after label_threshold=4.0 on column 'y'",
        tasks={"label_threshold": 4.0},
    ),
    DataCase(
        "all-positive",
        "every label is 1",
        r"split 'train' has \d+ positive and 0 negative labels after label_threshold=0.5",
        table=lambda df: df.assign(y=1),
    ),
    DataCase(
        "raw-labels-not-binary",
        "ratings with label_threshold null (raw labels)",
        r"label 'y': 2.0 at row 1 \(task uid='u00'\) is not 0/1 and label_threshold is None",
        table=_ratings,
        tasks={"label_threshold": None},
    ),
    DataCase(
        "zero-tasks",
        "min_interactions above every history",
        r"no task left after filtering \(192 interactions, filtered: .*too_few_interactions.*\): check "
        r"min_interactions / max_interactions and the task key",
        tasks={"min_interactions": 30},
    ),
    DataCase(
        "task-key-column-missing",
        "task_key names a column that is not in the table",
        r"interaction table lacks column\(s\) \['session'\] required by the schema/task config",
        tasks={"task_key": "session"},
    ),
    DataCase(
        "item-rule-column-missing",
        "new_item_rule names a column that is not in the table",
        r"new_item_rule: item column 'product' is not in the interaction table",
        tasks={"new_item_rule": {"quantile": 0.8, "column": "product"}},
    ),
    # -- the schema file -----------------------------------------------------------------------
    DataCase(
        "schema-not-mapping",
        "a schema file holding a list",
        r"schema.yaml: expected a mapping with keys",
        schema="- uid\n- y\n",
    ),
    DataCase(
        "schema-bad-yaml",
        "a schema file that is not valid YAML",
        r"schema.yaml: not valid YAML \(while parsing a flow sequence",
        schema="task_key: [uid\n",
    ),
    DataCase(
        "schema-unknown-key",
        "a misspelt schema key",
        r"schema.yaml: unknown key\(s\) \['sprase'\]; allowed:",
        schema=SCHEMA.replace("sparse:", "sprase:"),
    ),
    DataCase(
        "schema-no-task-key",
        "a schema without task_key",
        r"schema.yaml: missing required key 'task_key'",
        schema=SCHEMA.replace("task_key: uid\n", ""),
    ),
    DataCase(
        "schema-multi-hot-no-max-len",
        "a multi-hot field without max_len",
        r"schema.yaml: multi_hot\[0\] must be a mapping with 'name' and 'max_len'",
        schema=SCHEMA.replace("max_len: 3, ", ""),
    ),
    DataCase(
        "schema-hash-dense",
        "hash_buckets on a dense field",
        r"schema.yaml: hash_buckets names \['price'\], which are not sparse or multi_hot fields",
        schema=SCHEMA + "hash_buckets: {price: 10}\n",
    ),
    DataCase(
        "schema-field-twice",
        "a field listed twice",
        r"schema.yaml: schema lists field\(s\) twice: \['item'\]",
        schema=SCHEMA.replace("sparse: [uid, item]", "sparse: [uid, item, item]"),
    ),
    DataCase(
        "schema-label-is-feature",
        "the label also listed as a feature",
        r"schema.yaml: label column 'y' must not also be a feature field",
        schema=SCHEMA.replace("dense: [price]", "dense: [price, y]"),
    ),
    # -- the file itself -----------------------------------------------------------------------
    DataCase(
        "raw:clicks.xlsx",
        "an unsupported file type",
        r"clicks.xlsx: unsupported file type '.xlsx'; expected .csv, .tsv or .parquet",
        fmt="raw",
        raw=b"PK\x03\x04",
    ),
    DataCase(
        "raw:corrupt.parquet",
        "a file that is not Parquet",
        r"corrupt.parquet: cannot be read as Parquet \(.*magic bytes.*\); check or re-export the file",
        fmt="raw",
        raw=b"this is not a parquet file",
    ),
    DataCase(
        "raw:empty.csv",
        "an empty CSV file",
        r"empty.csv: empty file; expected a header line naming the columns",
        fmt="raw",
        raw=b"",
    ),
    DataCase(
        "raw:header-only.csv",
        "a CSV with a header and no rows",
        r"header-only.csv: no rows \(a header without interactions\?\)",
        fmt="raw",
        raw=b"uid,y,ts,item,tags,price\n",
    ),
    DataCase(
        "raw:same-name-twice.csv",
        "a CSV header naming a column twice",
        r"same-name-twice.csv: the header names column\(s\) \['tags'\] more than once; rename them",
        fmt="raw",
        raw=b"uid,y,ts,item,tags,tags\nu1,1,1,i1,t1,t2\n",
    ),
    DataCase(
        "raw:ragged.csv",
        "a CSV row with one field too many",
        r"ragged.csv: cannot be read as CSV \(.*(Expected 6 fields in line 3, saw 7|Line: 3).*\)",
        fmt="raw",
        raw=b"uid,y,ts,item,tags,price\nu1,1,1,i1,t1,1.0\nu1,0,2,i2,t2,2.0,oops\n",
    ),
]
