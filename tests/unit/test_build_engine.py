"""The out-of-core (DuckDB) builder produces the same tasks as the pandas reference builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmeta.data.build import BuildOptions, build_shards
from gmeta.data.schema import SchemaError
from gmeta.data.shards import iter_shard, prepare_shards, read_manifest, verify_shards, write_shards
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.sources.tabular import TabularSource
from gmeta.data.tasks import TaskConfig, build_tasks
from gmeta.data.vocab import read_vocab

SPLITS = ("train", "val", "test")


def _tasks(root: Path) -> dict[tuple[str, str], object]:
    m = read_manifest(root)
    verify_shards(m)
    return {(s, r.task_id): r for s in SPLITS for p in m.shard_paths(s) for r in iter_shard(p, m.schema)}


def _assert_same_tasks(ref: Path, new: Path) -> None:
    a, b = _tasks(ref), _tasks(new)
    assert a.keys() == b.keys() and a
    for k, ra in a.items():
        rb = b[k]
        assert ra.state == rb.state, k
        for name, arr in ra.arrays.items():
            assert arr.dtype == rb.arrays[name].dtype and np.array_equal(arr, rb.arrays[name]), (k, name)
    ma, mb = read_manifest(ref).data, read_manifest(new).data
    for key in ("counts", "filtered", "schema", "task_config", "seed"):
        assert ma[key] == mb[key], key
    assert read_vocab(ref / "vocab.parquet") == read_vocab(new / "vocab.parquet")
    for key in (
        "interactions",
        "task_keys",
        "warm_eval_held_out",
        "vocab_sizes",
        "label_threshold",
        "label_counts",
        "duplicates",
        "filter_rules",
    ):
        assert ma["stats"][key] == mb["stats"][key], key


def _reference(source, cfg: TaskConfig, out: Path, seed: int = 0, tasks_per_shard: int = 32) -> Path:
    df, schema = source.load()
    write_shards(
        build_tasks(df, schema, cfg, seed=seed), out, cfg, seed=seed, tasks_per_shard=tasks_per_shard
    )
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        dict(min_interactions=8, max_interactions=40, query_size=4),
        dict(
            min_interactions=8, max_interactions=40, query_size=4, query_selection="random", val_fraction=0.3
        ),
        dict(
            min_interactions=8,
            max_interactions=30,
            query_size=4,
            new_item_rule={"quantile": 0.7},
            warm_eval=False,
        ),
        dict(min_interactions=8, max_interactions=15, query_size=4, max_interactions_policy="window"),
        dict(
            min_interactions=6,
            max_interactions=13,
            query_size=3,
            max_interactions_policy="window",
            query_selection="random",
        ),
        dict(min_interactions=8, max_interactions=15, query_size=4, max_interactions_policy="train_window"),
    ],
)
def test_one_partition_is_byte_identical_to_the_reference(tmp_path, ml_synthetic_source, cfg):
    cfg = TaskConfig(**cfg)
    ref = _reference(ml_synthetic_source, cfg, tmp_path / "ref", seed=5)
    build_shards(
        ml_synthetic_source,
        cfg,
        tmp_path / "new",
        seed=5,
        tasks_per_shard=32,
        options=BuildOptions(workers=1),
    )
    _assert_same_tasks(ref, tmp_path / "new")
    digests = {s: [x["sha256"] for x in read_manifest(ref).shards(s)] for s in SPLITS}
    assert digests == {s: [x["sha256"] for x in read_manifest(tmp_path / "new").shards(s)] for s in SPLITS}


@pytest.mark.parametrize("policy", ["drop", "window", "train_window"])
def test_many_partitions_and_a_process_pool_give_the_same_tasks(
    tmp_path, ml_synthetic_source, small_task_config, policy
):
    cfg = TaskConfig(
        **{**small_task_config.to_dict(), "max_interactions_policy": policy, "max_interactions": 20}
    )
    ref = _reference(ml_synthetic_source, cfg, tmp_path / "ref")
    if policy != "drop":
        assert read_manifest(ref).data["filtered"]["window_remainder"]["tasks"] > 0
        assert any("/w" in r for s in SPLITS for r in [x[1] for x in _tasks(ref) if x[0] == s])
    manifest = build_shards(
        ml_synthetic_source,
        cfg,
        tmp_path / "new",
        tasks_per_shard=32,
        options=BuildOptions(rows_per_partition=700, workers=2 if policy == "drop" else 1),  # the pool once
    )
    assert manifest["build"]["partitions"] > 3
    _assert_same_tasks(ref, tmp_path / "new")
    assert not (tmp_path / "new" / "_build").exists()  # scratch removed


def test_hashed_fields_and_no_cold_start(tmp_path):
    source = SyntheticSource(schema="criteo", num_users=60, seed=1)
    cfg = TaskConfig(label_threshold=None, new_user_quantile=None, new_item_rule=None, min_interactions=12)
    ref = _reference(source, cfg, tmp_path / "ref")
    build_shards(source, cfg, tmp_path / "new", tasks_per_shard=32, options=BuildOptions(workers=1))
    _assert_same_tasks(ref, tmp_path / "new")


SCHEMA = "task_key: user_id\nlabel: rating\ntime: timestamp\nsparse: [user_id, item_id, gender]\nmulti_hot: [{name: genre, max_len: 6, separator: ' '}]\ndense: [year_norm]\n"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "parquet_dir"])
def test_tabular_files_scanned_out_of_core_equal_the_reference(tmp_path, ml_table, fmt):
    df = ml_table[0][
        ["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp", "release_year"]
    ]
    (tmp_path / "schema.yaml").write_text(SCHEMA + "ignore_columns: [release_year]\n")
    if fmt == "csv":
        path = tmp_path / "inter.csv"
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        path = tmp_path / "inter.parquet"
        df.to_parquet(path)
    else:  # three files: the input order runs across files in name order
        path = tmp_path / "parts"
        path.mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
            df.iloc[part].to_parquet(path / f"part-{i}.parquet")
    source = TabularSource(path, tmp_path / "schema.yaml")
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    ref = _reference(source, cfg, tmp_path / "ref")
    prepare_shards(
        source, cfg, tmp_path / "new", tasks_per_shard=32, engine="duckdb", build_options={"workers": 1}
    )
    _assert_same_tasks(ref, tmp_path / "new")


def _write(tmp_path: Path, df: pd.DataFrame) -> TabularSource:
    df.to_csv(tmp_path / "inter.csv", index=False)
    (tmp_path / "schema.yaml").write_text(
        "task_key: uid\nlabel: y\ntime: ts\nsparse: [uid, item]\ndense: [price]\n"
    )
    return TabularSource(tmp_path / "inter.csv", tmp_path / "schema.yaml")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (
            "price",
            "cheap",
            r"inter.csv: dense column 'price' must be numeric; row 2 \(task uid='b'\) has 'cheap'",
        ),
        ("y", None, r"inter.csv: label 'y' is NaN at row 2 \(task uid='b'\)"),
        ("item", None, r"inter.csv: id column 'item' has a missing value \(NaN\) at row 2 \(task uid='b'\)"),
        ("ts", "soon", r"inter.csv: time column 'ts' at row 2 \(task uid='b'\) is missing or not numeric"),
    ],
)
def test_bad_rows_are_named_by_both_engines(tmp_path, column, value, message):
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
    for engine in ("duckdb", "pandas"):
        with pytest.raises(SchemaError, match=message):
            prepare_shards(source, TaskConfig(), tmp_path / f"out_{engine}", engine=engine)
        assert not (tmp_path / f"out_{engine}").exists()  # nothing half-written


def test_zero_tasks_after_filtering_is_an_error(tmp_path):
    df = pd.DataFrame(
        {
            "uid": ["a", "a", "b"],
            "y": [1, 0, 1],
            "ts": [1, 2, 3],
            "item": ["i", "j", "i"],
            "price": [1.0, 2.0, 3.0],
        }
    )
    with pytest.raises(SchemaError, match=r"no task left after filtering \(3 interactions"):
        prepare_shards(_write(tmp_path, df), TaskConfig(new_item_rule=None), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# slow (22 s on 2 cores): the synthetic MovieLens-shaped tests above cover the same equivalence in make test
@pytest.mark.slow
@pytest.mark.movielens
def test_movielens_same_tasks_as_the_reference(tmp_path):
    from gmeta.data.sources.movielens import MovieLensSource

    root = Path(__file__).resolve().parents[2] / ".cache" / "movielens"
    if not (root / "ml-1m").is_dir():
        pytest.skip("MovieLens-1M cache missing (make data)")
    source = MovieLensSource(root, fetch=False)
    cfg = TaskConfig()
    ref = _reference(source, cfg, tmp_path / "ref", tasks_per_shard=256)
    build_shards(source, cfg, tmp_path / "new", tasks_per_shard=256, options=BuildOptions(workers=1))
    _assert_same_tasks(ref, tmp_path / "new")


# -- time columns: any datetime unit or zone, or numbers, gives the tasks of numeric seconds -----
def _time_variant(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    seconds = df["timestamp"].to_numpy()
    if kind in ("s", "ms", "us", "ns"):
        # the column holds the same instants at this resolution (+ a sub-second part that must be floored)
        stamps = seconds.astype("datetime64[s]").astype(f"datetime64[{kind}]")
        if kind != "s":
            stamps = stamps + np.timedelta64(1, kind)
        return df.assign(timestamp=pd.Series(stamps, index=df.index))
    if kind == "tz":  # a zone-aware column: the same instants, written as New York wall-clock times
        utc = pd.to_datetime(seconds, unit="s", utc=True).as_unit("ms")
        return df.assign(timestamp=pd.Series(utc, index=df.index).dt.tz_convert("America/New_York"))
    if kind == "float":
        return df.assign(timestamp=seconds.astype(np.float64))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["s", "ms", "us", "ns", "tz", "float"])
def test_parquet_time_of_any_unit_or_zone_gives_the_tasks_of_numeric_seconds(tmp_path, ml_table, kind):
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]]
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    df.to_parquet(tmp_path / "seconds.parquet")
    ref = _reference(
        TabularSource(tmp_path / "seconds.parquet", tmp_path / "schema.yaml"), cfg, tmp_path / "ref"
    )
    variant = _time_variant(df, kind)
    variant.to_parquet(tmp_path / "inter.parquet")
    stored = pd.read_parquet(tmp_path / "inter.parquet")["timestamp"].dtype
    if kind in ("s", "ms", "us", "ns"):  # the unit really reaches the reader (Parquet has no [s]: [ms])
        assert stored == np.dtype(f"datetime64[{'ms' if kind == 's' else kind}]")
    source = TabularSource(tmp_path / "inter.parquet", tmp_path / "schema.yaml")
    loaded, _ = source.load()
    assert np.array_equal(loaded["timestamp"].to_numpy(), df["timestamp"].to_numpy())
    for engine in ("pandas", "duckdb"):
        prepare_shards(
            source, cfg, tmp_path / engine, tasks_per_shard=32, engine=engine, build_options={"workers": 1}
        )
        _assert_same_tasks(ref, tmp_path / engine)


def test_csv_iso_datetime_text_is_read_in_utc_by_both_engines(tmp_path, ml_table):
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]]
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    df.to_csv(tmp_path / "seconds.csv", index=False)
    ref = _reference(TabularSource(tmp_path / "seconds.csv", tmp_path / "schema.yaml"), cfg, tmp_path / "ref")
    utc = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    text = utc.dt.tz_convert("Asia/Kolkata").map(lambda t: t.isoformat())  # e.g. 1970-01-05T03:30:00+05:30
    text.iloc[::2] = utc.iloc[::2].dt.strftime("%Y-%m-%d %H:%M:%S")  # naive text means UTC
    df.assign(timestamp=text).to_csv(tmp_path / "inter.csv", index=False)
    source = TabularSource(tmp_path / "inter.csv", tmp_path / "schema.yaml")
    for engine in ("pandas", "duckdb"):
        prepare_shards(
            source, cfg, tmp_path / engine, tasks_per_shard=32, engine=engine, build_options={"workers": 1}
        )
        _assert_same_tasks(ref, tmp_path / engine)


def test_time_in_seconds_floors_every_unit_and_keeps_numbers():
    from gmeta.data.sources.tabular import time_in_seconds

    for unit in ("s", "ms", "us", "ns"):
        t = pd.Series(
            np.array(["1969-12-31T23:59:59.5", "2024-03-01T10:00:00"], "datetime64[ns]").astype(
                f"datetime64[{unit}]"
            )
        )
        assert time_in_seconds(t).tolist() == [-1, 1709287200], unit  # floored, not truncated
    aware = pd.Series(pd.to_datetime(["2024-03-01T12:00:00+02:00"], utc=True)).dt.tz_convert("Europe/Berlin")
    assert time_in_seconds(aware).tolist() == [1709287200]
    assert time_in_seconds(pd.Series([1.5, 3.0])).tolist() == [1.5, 3.0]  # any numeric unit, unchanged
    bad = time_in_seconds(pd.Series(["2024-03-01", "soon", None]))
    assert bad.iloc[0] == 1709251200 and bad.iloc[1:].isna().all()


# -- labels, duplicates and the build log (both engines) -----------------------------------------
def _clicks(n_users: int = 12, per_user: int = 16, label=None) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = n_users * per_user
    return pd.DataFrame(
        {
            "uid": np.repeat([f"u{i:02d}" for i in range(n_users)], per_user),
            "y": rng.integers(0, 2, n) if label is None else label(n),
            "ts": np.arange(n),
            "item": [f"i{k}" for k in rng.integers(0, 20, n)],
            "price": rng.random(n),
        }
    )


CLICK_CFG = dict(
    min_interactions=6, max_interactions=40, query_size=3, new_user_quantile=None, new_item_rule=None
)


def test_label_threshold_auto_is_half_for_0_1_labels_in_both_engines(tmp_path):
    source = _write(tmp_path, _clicks())
    for engine in ("pandas", "duckdb"):
        prepare_shards(
            source, TaskConfig(label_threshold="auto", **CLICK_CFG), tmp_path / engine, engine=engine
        )
    _assert_same_tasks(tmp_path / "pandas", tmp_path / "duckdb")
    stats = read_manifest(tmp_path / "duckdb").data["stats"]
    assert stats["label_threshold"] == 0.5
    assert sum(c["positive"] + c["negative"] for c in stats["label_counts"].values()) > 0


def test_label_threshold_auto_on_ratings_asks_for_a_threshold(tmp_path):
    source = _write(tmp_path, _clicks(label=lambda n: (np.arange(n) % 5) + 1))
    for engine in ("pandas", "duckdb"):
        with pytest.raises(
            SchemaError,
            match=r"label 'y': 2.0 at row 1 \(task uid='u00'\) is not 0/1, so label_threshold 'auto' cannot apply; "
            r"set data.task_config.label_threshold to a number",
        ):
            prepare_shards(
                source, TaskConfig(label_threshold="auto", **CLICK_CFG), tmp_path / engine, engine=engine
            )
        assert not (tmp_path / engine).exists()


def test_a_split_without_positives_names_the_threshold_and_the_counts(tmp_path):
    source = _write(tmp_path, _clicks())  # 0/1 clicks under the MovieLens threshold 4.0: all negative
    for engine in ("pandas", "duckdb"):
        with pytest.raises(
            SchemaError,
            match=r"split 'train' has 0 positive and \d+ negative labels after label_threshold=4.0 on column 'y' "
            r"\(positive/negative per split: train 0/\d+, val 0/\d+, test 0/\d+\)",
        ):
            prepare_shards(
                source, TaskConfig(label_threshold=4.0, **CLICK_CFG), tmp_path / engine, engine=engine
            )
        assert not (tmp_path / engine).exists()


def test_duplicated_rows_are_reported_by_both_engines(tmp_path, caplog):
    df = _clicks()
    df = pd.concat([df.iloc[:40], df.iloc[[7, 7, 30]], df.iloc[40:]], ignore_index=True)  # rows 40, 41, 42
    source = _write(tmp_path, df)
    for engine in ("pandas", "duckdb"):
        with caplog.at_level("INFO"):
            prepare_shards(
                source, TaskConfig(label_threshold="auto", **CLICK_CFG), tmp_path / engine, engine=engine
            )
        dup = read_manifest(tmp_path / engine).data["stats"]["duplicates"]
        assert dup == {"rows": 3, "example": {"row": 40, "same_as_row": 7, "task": "u00"}}, engine
        assert "duplicated rows (kept): 3 = 1.54%" in caplog.text and "row 40 repeats row 7" in caplog.text
        caplog.clear()
    _assert_same_tasks(tmp_path / "pandas", tmp_path / "duckdb")


def test_build_log_says_what_was_dropped_and_why_in_rows_and_percent(tmp_path, caplog):
    sizes = [3, 5, 16, 16, 30, 45]  # too few (3, 5); 45 > max 40; with windows of 40: a remainder of 5
    df = _clicks(n_users=1, per_user=sum(sizes))
    df["uid"] = np.repeat([f"u{i}" for i in range(len(sizes))], sizes)
    source = _write(tmp_path, df)
    for policy in ("drop", "window"):
        cfg = TaskConfig(label_threshold="auto", max_interactions_policy=policy, **CLICK_CFG)
        for engine in ("pandas", "duckdb"):
            with caplog.at_level("INFO"):
                prepare_shards(source, cfg, tmp_path / policy / engine, engine=engine)
            text = caplog.text
            caplog.clear()
            assert (
                "dropped too_few_interactions: 2 tasks, 8 rows = 6.96% of 115 ((key, state) history shorter than "
                "min_interactions=6)" in text
            ), engine
            if policy == "drop":
                assert "dropped too_many_interactions: 1 tasks, 45 rows = 39.13% of 115" in text
                assert "dropped in all: 53 rows = 46.09%; kept 62 rows in tasks" in text
            else:
                assert "dropped window_remainder: 1 tasks, 5 rows = 4.35% of 115" in text
                assert "dropped in all: 13 rows = 11.30%; kept 102 rows in tasks" in text
        _assert_same_tasks(tmp_path / policy / "pandas", tmp_path / policy / "duckdb")
    ids = {r for _, r in _tasks(tmp_path / "window" / "duckdb")}
    assert {"u5/warm/w1"} <= ids and not any(i.startswith("u5/warm/w0") for i in ids)


@pytest.mark.parametrize("variant", ["parquet_lists", "csv_with_bom"])
def test_list_multi_hot_and_a_bom_give_the_tasks_of_the_plain_csv(tmp_path, ml_table, variant):
    """A multi-hot Parquet list column is the separator-joined text; a UTF-8 BOM is not part of a name."""
    df = ml_table[0][["user_id", "item_id", "gender", "genre", "year_norm", "rating", "timestamp"]]
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, new_item_rule={"quantile": 0.8})
    df.to_csv(tmp_path / "plain.csv", index=False)
    ref = _reference(TabularSource(tmp_path / "plain.csv", tmp_path / "schema.yaml"), cfg, tmp_path / "ref")
    if variant == "parquet_lists":
        path = tmp_path / "inter.parquet"
        df.assign(genre=df["genre"].str.split(" ")).to_parquet(path)
    else:
        path = tmp_path / "inter.csv"
        path.write_bytes(b"\xef\xbb\xbf" + df.to_csv(index=False).encode())
    source = TabularSource(path, tmp_path / "schema.yaml")
    for engine in ("pandas", "duckdb"):
        prepare_shards(
            source, cfg, tmp_path / engine, tasks_per_shard=32, engine=engine, build_options={"workers": 1}
        )
        _assert_same_tasks(ref, tmp_path / engine)
