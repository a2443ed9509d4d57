"""data.engine=spark (Spark local mode) builds the same tasks as the DuckDB engine, byte for byte.

One Spark session (``local[2]``) serves the whole module; the build reuses an active session.
With the same ``rows_per_partition`` both engines cut the same partitions, so their shards are
byte-identical: the comparison is on every shard's sha256 plus the decoded tasks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_build_engine import (
    CLICK_CFG,
    SCHEMA,
    SPLITS,
    _assert_same_tasks,
    _clicks,
    _tasks,
    _time_variant,
    _write,
)

from gmeta.data.build import BuildOptions, build_shards
from gmeta.data.schema import SchemaError
from gmeta.data.shards import prepare_shards, read_manifest
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.sources.tabular import TabularSource
from gmeta.data.tasks import TaskConfig

# Every test here starts or shares a local Spark session (10-25 s on 2 cores): the whole module is
# slow (make test's 5-minute budget); make test-slow runs it, and the DuckDB plan it mirrors is
# checked in the fast suite (test_build_engine.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("gmeta-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.driver.memory", "1g")
        # tiny inputs: compiling query code and optimising the JVM cost more than running it
        .config("spark.sql.codegen.wholeStage", "false")
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .getOrCreate()
    )
    yield session
    session.stop()


def _both(source, cfg: TaskConfig, tmp: Path, seed: int = 0, rows_per_partition: int = 2_000_000) -> None:
    """Build with both engines (same partitions) and assert same tasks and byte-identical shards."""
    out = {}
    for engine in ("duckdb", "spark"):
        out[engine] = tmp / engine
        manifest = build_shards(
            source,
            cfg,
            out[engine],
            seed=seed,
            tasks_per_shard=32,
            options=BuildOptions(workers=1, rows_per_partition=rows_per_partition),
            engine=engine,
        )
        assert manifest["build"]["engine"] == engine
        assert not (out[engine] / "_build").exists()  # scratch removed
    _assert_same_tasks(out["duckdb"], out["spark"])
    a, b = read_manifest(out["duckdb"]).data, read_manifest(out["spark"]).data
    assert a["build"]["partitions"] == b["build"]["partitions"]
    assert {s: a["splits"][s]["shards"] for s in SPLITS} == {s: b["splits"][s]["shards"] for s in SPLITS}
    assert a["stats"] == b["stats"]  # thresholds, positive rate, vocab sizes, ...


@pytest.mark.parametrize(
    ("cfg", "rows_per_partition"),
    [
        # > 3 partitions; slow: a Spark session starts (~20-26 s, make test's 5-minute budget)
        pytest.param(
            dict(min_interactions=8, max_interactions=40, query_size=4), 700, marks=pytest.mark.slow
        ),
        pytest.param(
            dict(
                min_interactions=8,
                max_interactions=30,
                query_size=4,
                query_selection="random",
                val_fraction=0.3,
                new_item_rule={"quantile": 0.7},
                warm_eval=False,
            ),
            2_000_000,  # one partition: also byte-identical to the pandas reference (test_build_engine)
            marks=pytest.mark.slow,
        ),
    ],
)
def test_spark_builds_the_duckdb_tasks_on_synthetic_data(
    spark, tmp_path, ml_synthetic_source, cfg, rows_per_partition
):
    _both(ml_synthetic_source, TaskConfig(**cfg), tmp_path, seed=5, rows_per_partition=rows_per_partition)
    if rows_per_partition < 1000:
        assert read_manifest(tmp_path / "spark").data["build"]["partitions"] > 3


@pytest.mark.slow  # ~7 s
def test_spark_hashed_fields_and_no_cold_start(spark, tmp_path):
    source = SyntheticSource(schema="criteo", num_users=40, seed=1, hash_buckets=1000)
    cfg = TaskConfig(label_threshold=None, new_user_quantile=None, new_item_rule=None, min_interactions=12)
    _both(source, cfg, tmp_path)
    assert read_manifest(tmp_path / "spark").schema.field("C1").vocab_size == 1001


@pytest.mark.slow  # ~8 s per format
@pytest.mark.parametrize("fmt", [pytest.param("csv", marks=pytest.mark.slow), "parquet_dir"])
def test_spark_scans_tabular_files_like_duckdb(spark, tmp_path, ml_table, fmt):
    df = ml_table[0][
        ["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp", "release_year"]
    ]
    (tmp_path / "schema.yaml").write_text(SCHEMA + "ignore_columns: [release_year]\n")
    if fmt == "csv":
        path = tmp_path / "inter.csv"
        df.to_csv(path, index=False)
    else:  # three files: the input order runs across files in name order (not Spark's size order)
        path = tmp_path / "parts"
        path.mkdir()
        for i, n in enumerate((300, 2000, len(df) - 2300)):
            start = (0, 300, 2300)[i]
            df.iloc[start : start + n].to_parquet(path / f"part-{i}.parquet")
    source = TabularSource(path, tmp_path / "schema.yaml")
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    _both(source, cfg, tmp_path)


@pytest.mark.slow
def test_spark_parquet_datetime_and_csv_split_across_read_partitions(spark, tmp_path, ml_table):
    """A datetime time column, and a CSV read as several Spark partitions (input order rebuilt)."""
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]].copy()
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s")
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    df.to_parquet(tmp_path / "inter.parquet")
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    _both(TabularSource(tmp_path / "inter.parquet", tmp_path / "schema.yaml"), cfg, tmp_path / "pq")
    df["timestamp"] = df["timestamp"].astype("int64") // 10**9 // 100  # many ties: order by input row
    df.to_csv(tmp_path / "inter.csv", index=False)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "16k")
    try:
        assert spark.read.csv(str(tmp_path / "inter.csv"), header=True).rdd.getNumPartitions() > 3
        _both(TabularSource(tmp_path / "inter.csv", tmp_path / "schema.yaml"), cfg, tmp_path / "csv")
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")


@pytest.mark.slow  # ~3 s per case; the in-memory bad-values test covers the messages
@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (
            "price",
            "cheap",
            r"inter.csv: dense column 'price' must be numeric; row 2 \(task uid='b'\) has 'cheap'",
        ),
        pytest.param(
            "y", None, r"inter.csv: label 'y' is NaN at row 2 \(task uid='b'\)", marks=pytest.mark.slow
        ),
        pytest.param(
            "item",
            None,
            r"inter.csv: id column 'item' has a missing value \(NaN\) at row 2 \(task uid='b'\)",
            marks=pytest.mark.slow,
        ),
        ("ts", "soon", r"inter.csv: time column 'ts' at row 2 \(task uid='b'\) is missing or not numeric"),
    ],
)
def test_spark_names_bad_rows_like_duckdb(spark, tmp_path, column, value, message):
    df = pd.DataFrame(
        {
            "uid": ["a", "a", "b"],
            "y": [1, 0, 1],
            "ts": [1, 2, 3],
            "item": ["i", "j", "i"],
            "price": [1.0, 2.0, 3.0],
        }
    )
    df = df.astype({column: object})
    df.loc[2, column] = value
    source = _write(tmp_path, df)
    for engine in ("duckdb", "spark"):
        with pytest.raises(SchemaError, match=message):
            prepare_shards(source, TaskConfig(), tmp_path / f"out_{engine}", engine=engine)
        assert not (tmp_path / f"out_{engine}").exists()  # nothing half-written


class _Frame:
    """A source over a given DataFrame (to plant bad values in a synthetic table)."""

    def __init__(self, frame: pd.DataFrame, schema) -> None:
        self.frame, self.schema = frame, schema

    def load(self):
        return self.frame, self.schema

    def describe(self):
        return {"source": "frame", "rows": len(self.frame)}


def test_spark_names_in_memory_bad_values_like_the_reference(spark, tmp_path, ml_table):
    """Checks of the plan itself (not the file scan): dense values, multi-hot length, 0/1 labels."""
    df, schema = ml_table
    cases = []
    bad = df.copy()
    bad.loc[7, "year_norm"] = np.inf
    cases.append(
        (bad, schema, TaskConfig(), r"dense field 'year_norm': non-finite value inf at row 7 \(task user_id=")
    )
    bad = df.copy()
    bad["genre"] = bad["genre"].astype(object)
    bad.loc[[9, 11], "genre"] = ["a b c d e f g", "a b c d e f g h"]
    cases.append(
        (
            bad,
            schema,
            TaskConfig(),
            r"multi_hot field 'genre': row 9 \(task user_id=.*\) has 7 ids, more than max_len=6",
        )
    )
    clicks, click_schema = SyntheticSource(schema="criteo", num_users=10, seed=2).load()
    clicks = clicks.astype({"label": np.float64})
    clicks.loc[5, "label"] = 3.0
    cases.append(
        (
            clicks,
            click_schema,
            TaskConfig(label_threshold=None, new_item_rule=None),
            r"label 'label': 3.0 at row 5 \(task task=.*\) is not 0/1 and label_threshold is None",
        )
    )
    for i, (frame, sch, cfg, message) in enumerate(cases):
        for engine in ("pandas", "spark"):
            with pytest.raises(SchemaError, match=message):
                prepare_shards(_Frame(frame, sch), cfg, tmp_path / f"out{i}_{engine}", engine=engine)


@pytest.mark.parametrize("policy", ["window", "train_window"])
def test_spark_windows_duplicates_and_auto_labels_like_duckdb(spark, tmp_path, policy):
    """max_interactions_policy=window / train_window, the duplicate report and label_threshold=auto."""
    sizes = [3, 5, 16, 16, 30, 45, 95]  # too few (3, 5); 45 and 95 cut into windows of 40
    df = _clicks(n_users=1, per_user=sum(sizes))
    df["uid"] = np.repeat([f"u{i}" for i in range(len(sizes))], sizes)
    df = pd.concat([df.iloc[:40], df.iloc[[7, 7, 30]], df.iloc[40:]], ignore_index=True)  # rows 40, 41, 42
    source = _write(tmp_path, df)
    cfg = TaskConfig(label_threshold="auto", max_interactions_policy=policy, **CLICK_CFG)
    for engine in ("duckdb", "spark"):
        prepare_shards(source, cfg, tmp_path / engine, engine=engine, build_options={"workers": 1})
    _assert_same_tasks(tmp_path / "duckdb", tmp_path / "spark")
    stats = read_manifest(tmp_path / "spark").data["stats"]
    assert stats["duplicates"] == {"rows": 3, "example": {"row": 40, "same_as_row": 7, "task": "u1"}}
    assert stats == read_manifest(tmp_path / "duckdb").data["stats"]
    assert read_manifest(tmp_path / "spark").data["filtered"]["window_remainder"]["tasks"] == 1
    ids = {r for _, r in _tasks(tmp_path / "spark")}
    assert {"u6/warm/w0", "u6/warm/w2", "u5/warm/w1"} <= ids


@pytest.mark.slow
def test_spark_label_errors_like_duckdb(spark, tmp_path):
    ratings = _write(tmp_path, _clicks(label=lambda n: (np.arange(n) % 5) + 1))
    (tmp_path / "clicks").mkdir()
    clicks = _write(tmp_path / "clicks", _clicks())  # 0/1 clicks: all negative under threshold 4.0
    cases = [
        (
            ratings,
            TaskConfig(label_threshold="auto", **CLICK_CFG),
            r"label 'y': 2.0 at row 1 \(task uid='u00'\) is not 0/1, so label_threshold 'auto' cannot apply",
        ),
        (
            clicks,
            TaskConfig(label_threshold=4.0, **CLICK_CFG),
            r"split 'train' has 0 positive and \d+ negative labels after label_threshold=4.0 on column 'y'",
        ),
    ]
    for i, (source, cfg, message) in enumerate(cases):
        for engine in ("duckdb", "spark"):
            with pytest.raises(SchemaError, match=message):
                prepare_shards(source, cfg, tmp_path / f"out{i}_{engine}", engine=engine)
            assert not (tmp_path / f"out{i}_{engine}").exists()


@pytest.mark.slow
# "us" would take the "ms" path (a timestamp cast); "ns" is the one integer unit read differently
@pytest.mark.parametrize("kind", ["ms", "ns", "tz", "float", "iso_text"])
def test_spark_reads_time_columns_like_duckdb(spark, tmp_path, ml_table, kind):
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]]
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    if kind == "iso_text":
        utc = pd.to_datetime(df["timestamp"], unit="s", utc=True)
        text = utc.dt.tz_convert("Asia/Kolkata").map(lambda t: t.isoformat())
        text.iloc[::2] = utc.iloc[::2].dt.strftime("%Y-%m-%d %H:%M:%S")  # naive text means UTC
        path = tmp_path / "inter.csv"
        df.assign(timestamp=text).to_csv(path, index=False)
    else:
        path = tmp_path / "inter.parquet"
        _time_variant(df, kind).to_parquet(path)
    _both(TabularSource(path, tmp_path / "schema.yaml"), cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["parquet_lists", "csv_with_bom"])
def test_spark_list_multi_hot_and_a_bom_like_duckdb(spark, tmp_path, ml_table, variant):
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]]
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    if variant == "parquet_lists":
        path = tmp_path / "inter.parquet"
        df.assign(genre=df["genre"].str.split(" ")).to_parquet(path)
    else:
        path = tmp_path / "inter.csv"
        path.write_bytes(b"\xef\xbb\xbf" + df.to_csv(index=False).encode())
    _both(TabularSource(path, tmp_path / "schema.yaml"), cfg, tmp_path)
