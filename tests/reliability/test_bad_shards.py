"""Bad shards: every case is an error naming the file (never a skip); bad serving input too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bad_data import TASKS, DataCase
from bad_shards import SHARD_CASES, ShardCase

from gmeta.data.shards import prepare_shards, read_manifest, read_shard, verify_shards
from gmeta.data.sources.tabular import TabularSource
from gmeta.data.tasks import TaskConfig
from gmeta.errors import UserError, find_user_error


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    path, schema = DataCase("good", "", "").write(folder / "in")
    out = folder / "shards"
    prepare_shards(TabularSource(path, schema), TaskConfig(**TASKS), out, tasks_per_shard=4)
    return out


def read_everything(root: Path) -> None:
    """What a training run's start-up and readers do with a shard folder."""
    m = read_manifest(root)
    verify_shards(m, check_checksums=True)
    for split in ("train", "val", "test"):
        for entry, path in zip(m.shards(split), m.shard_paths(split), strict=True):
            read_shard(path, m.schema, expected_tasks=entry["tasks"])


def test_the_good_shards_read(good_shards: Path) -> None:
    read_everything(good_shards)


@pytest.mark.parametrize("case", SHARD_CASES, ids=[c.id for c in SHARD_CASES])
def test_bad_shards(tmp_path: Path, good_shards: Path, case: ShardCase) -> None:
    root = tmp_path / "shards"
    shutil.copytree(good_shards, root)
    case.change(root)
    with pytest.raises(Exception, match=case.message) as info:
        read_everything(root)
    assert find_user_error(info.value) is not None  # a message and exit status 2, not a traceback


def test_stale_shards_are_refused_and_kept(tmp_path: Path, good_shards: Path) -> None:
    """Shards built from other inputs: an error saying how to rebuild; the folder is not touched."""
    root = tmp_path / "shards"
    shutil.copytree(good_shards, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    path, schema = DataCase("good", "", "").write(tmp_path / "in")
    source = TabularSource(path, schema)
    with pytest.raises(UserError, match=r"was built with a different source, task_config; use force=True"):
        prepare_shards(source, TaskConfig(**{**TASKS, "query_size": 4}), root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


# -- serving input (gmeta adapt --support / --candidates / --items) --------------------------------
SERVING_CASES = [
    ("missing", None, r"nope.csv: file not found"),
    ("clicks.xlsx", b"PK", r"clicks.xlsx: unsupported file type '.xlsx'; expected .csv, .tsv, .parquet"),
    ("bad.json", b'{"user_id": 1', r"bad.json: not valid JSON"),
    (
        "object.json",
        b'{"user_id": 1}',
        r"object.json: expected a JSON list of objects \(one per row\), or JSON Lines",
    ),
    ("bad.jsonl", b'{"user_id": 1}\n{"user_id"\n', r"bad.jsonl: not valid JSON"),
    ("empty.csv", b"", r"empty.csv: cannot be read as CSV \(No columns to parse from file\)"),
    (
        "ragged.csv",
        b"a,b\n1,2\n1,2,3\n",
        r"ragged.csv: cannot be read as CSV \(.*Expected 2 fields in line 3, saw 3",
    ),
    ("corrupt.parquet", b"not parquet", r"corrupt.parquet: cannot be read as Parquet \(.*magic bytes"),
]


@pytest.mark.parametrize(("name", "content", "message"), SERVING_CASES, ids=[c[0] for c in SERVING_CASES])
def test_bad_serving_input(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    from gmeta.serving.inputs import read_table

    path = tmp_path / ("nope.csv" if content is None else name)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_table(path, ["user_id"])


def test_adapt_refuses_a_data_dir_with_another_vocabulary(good_shards: Path) -> None:
    """gmeta adapt --data-dir: shards whose vocabulary is not the checkpoint's are an error."""
    from gmeta.data.encoder import FeatureEncoder
    from gmeta.serving.checkpoint import find_encoder

    m = read_manifest(good_shards)
    own = m.data["vocab"]["sha256"]
    state = {"state_dict": {}, "TaskDataModule": {"data_dir": "x", "vocab_sha256": own}}
    # the same vocabulary: fine
    assert find_encoder(m.schema, state, data_dir=good_shards) == FeatureEncoder.from_manifest(m.root, m.data)
    state["TaskDataModule"]["vocab_sha256"] = "f" * 64
    with pytest.raises(UserError, match=r"is not the one the checkpoint was trained with \(ffffffffffff"):
        find_encoder(m.schema, state, data_dir=good_shards)
