"""Bad own data: every case stops the build (both engines) with its message, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_data import DATA_CASES, SCHEMA, TASKS, DataCase, good_table

from gmeta.data.shards import prepare_shards
from gmeta.data.sources.tabular import TabularSource
from gmeta.data.tasks import TaskConfig
from gmeta.errors import UserError, find_user_error


def assert_nothing_written(out: Path) -> None:
    """No shard folder and no temporary build folder next to it."""
    assert not out.exists()
    assert not [p.name for p in out.parent.glob(f".{out.name}-*")]


def build(source: TabularSource, tasks: dict, out: Path, engine: str) -> None:
    cfg = TaskConfig(**{**TASKS, **tasks})
    prepare_shards(source, cfg, out, engine=engine, build_options={"workers": 1})


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_own_data(tmp_path: Path, case: DataCase, engine: str) -> None:
    path, schema = case.write(tmp_path / "in")
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=case.message) as info:
        build(TabularSource(path, schema), case.tasks, out, engine)
    assert find_user_error(info.value) is info.value  # reported as a message, exit status 2
    assert_nothing_written(out)


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_missing_data_file_and_schema_file(tmp_path: Path, engine: str) -> None:
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    good_table().to_csv(tmp_path / "inter.csv", index=False)
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=r"nope.csv: no such file or directory \(data.source.path\)"):
        build(TabularSource(tmp_path / "nope.csv", tmp_path / "schema.yaml"), {}, out, engine)
    with pytest.raises(UserError, match=r"nope.yaml: schema file not found \(data.source.schema_path\)"):
        build(TabularSource(tmp_path / "inter.csv", tmp_path / "nope.yaml"), {}, out, engine)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=r"empty_dir: directory holds no .parquet files"):
        build(TabularSource(tmp_path / "empty_dir", tmp_path / "schema.yaml"), {}, out, engine)
    assert_nothing_written(out)


def test_the_good_table_builds_in_both_engines(tmp_path: Path) -> None:
    """The corpus's base table is valid: each case's error comes from its one change."""
    case = DataCase("good", "", "")
    path, schema = case.write(tmp_path / "in")
    for engine in ("pandas", "duckdb"):
        build(TabularSource(path, schema), {}, tmp_path / engine, engine)
        assert (tmp_path / engine / "manifest.json").is_file()


def test_a_failed_rebuild_keeps_the_previous_shards(tmp_path: Path) -> None:
    """force=True on bad data: the error, and the complete previous shard set is still in place."""
    good = DataCase("good", "", "")
    path, schema = good.write(tmp_path / "in")
    out = tmp_path / "shards"
    build(TabularSource(path, schema), {}, out, "duckdb")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = DATA_CASES[[c.id for c in DATA_CASES].index("text-dense")]
    bad.write(tmp_path / "in")  # overwrite the input with a bad value
    with pytest.raises(UserError, match="dense column 'price' must be numeric"):
        prepare_shards(TabularSource(path, schema), TaskConfig(**TASKS), out, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.glob(".shards-*")]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "polars"}, r"data.engine must be 'duckdb', 'pandas' or 'spark', got 'polars'"),
        ({"tasks_per_shard": 0}, r"data.tasks_per_shard must be >= 1, got 0"),
    ],
)
def test_bad_build_options(tmp_path: Path, options: dict, message: str) -> None:
    path, schema = DataCase("good", "", "").write(tmp_path / "in")
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=message):
        prepare_shards(TabularSource(path, schema), TaskConfig(**TASKS), out, **options)
    assert_nothing_written(out)
