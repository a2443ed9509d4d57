"""The fitted FeatureEncoder: the build (pandas reference and DuckDB engine) and serving give the same ids.

The raw table below has a hashed sparse field, unhashed sparse fields with values that only new
users hold (OOV in every evaluation task of theirs), an unhashed multi-hot field with unseen, empty
and repeated-separator tokens, a hashed multi-hot field and dense values that float32 rounds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gmeta.data.build import BuildOptions, build_shards
from gmeta.data.datamodule import TaskDataModule
from gmeta.data.encoder import (
    BAD_DENSE,
    MISSING_ID,
    TOO_MANY_IDS,
    EncodingError,
    FeatureEncoder,
    bucket_ids,
    encoder_settings,
    parse_tokens,
)
from gmeta.data.hashing import stable_hash
from gmeta.data.schema import MULTI_HOT_PAD, OOV_ID, FieldSpec, Schema, SchemaError
from gmeta.data.shards import iter_shard, read_manifest, write_shards
from gmeta.data.tasks import TaskConfig, TaskSplits, build_tasks
from gmeta.serving.checkpoint import find_encoder
from gmeta.serving.user_tasks import build_user_tasks

SPLITS = ("train", "val", "test")
SCHEMA = Schema(
    task_key="user_id",
    label="rating",
    time="ts",
    fields=(
        FieldSpec("user_id", "sparse"),
        FieldSpec("item_id", "sparse", hash_buckets=7),
        FieldSpec("city", "sparse"),
        FieldSpec("tags", "multi_hot", max_len=3, separator="|"),
        FieldSpec("topics", "multi_hot", max_len=2, separator=" ", hash_buckets=5),
        FieldSpec("price", "dense"),
        FieldSpec("score", "dense"),
    ),
)
CFG = TaskConfig(
    label_threshold=3.0,
    min_interactions=10,
    max_interactions=40,
    query_size=4,
    new_user_quantile=0.75,
    new_item_rule=None,
    item_key="item_id",
)
N_USERS, PER_USER = 16, 15


def _raw_table() -> pd.DataFrame:
    """Users 12..15 start last (new users): their user id, city and the tag ``fresh`` are never in training."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(N_USERS):
        new = u >= 12
        for j in range(PER_USER):
            tags = rng.choice(["a", "b", "c", "d"], size=rng.integers(0, 4), replace=False).tolist()
            if new and j % 3 == 0:
                tags = ["fresh", *tags[:2]]
            tag_text = (
                "|".join(tags) if j % 5 else ("|" + "||".join(tags) if tags else None)
            )  # empty tokens, NaN
            rows.append(
                {
                    "user_id": f"u{u:02d}",
                    "item_id": f"i{int(rng.integers(0, 30))}",
                    "city": f"new-city-{u}" if new else ["paris", "oslo", "lima"][u % 3],
                    "tags": tag_text,
                    "topics": " ".join(rng.choice(["x", "y", "z", "w"], size=rng.integers(0, 3)).tolist()),
                    "price": float(rng.normal()) / 3.0,  # not a float32: the cast rounds it
                    "score": float(rng.integers(0, 100)),
                    "rating": float(rng.integers(1, 6)),
                    "ts": u * 1000 + j,
                }
            )
    return pd.DataFrame(rows)


class FrameSource:
    """A ``Source`` over an in-memory frame (the DuckDB engine registers it as its ``src`` view)."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df

    def load(self) -> tuple[pd.DataFrame, Schema]:
        return self.df.copy(), SCHEMA

    def describe(self) -> dict[str, Any]:
        return {"name": "frame", "rows": len(self.df)}


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return _raw_table()


@pytest.fixture(scope="module")
def splits(raw) -> TaskSplits:
    return build_tasks(raw, SCHEMA, CFG)


@pytest.fixture(scope="module")
def built(tmp_path_factory, raw, splits) -> dict[str, Path]:
    """Shard folders of the same rows from the pandas reference and the DuckDB engine."""
    tmp = tmp_path_factory.mktemp("encoder")
    write_shards(splits, tmp / "pandas", CFG, tasks_per_shard=8)
    build_shards(FrameSource(raw), CFG, tmp / "duckdb", tasks_per_shard=8, options=BuildOptions(workers=1))
    return {"pandas": tmp / "pandas", "duckdb": tmp / "duckdb"}


def _records(root: Path) -> dict[tuple[str, str], Any]:
    m = read_manifest(root)
    return {(s, r.task_id): r for s in SPLITS for p in m.shard_paths(s) for r in iter_shard(p, m.schema)}


# -- build and serving: the same ids ------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_serving_encodes_raw_rows_as_the_build_did(built, raw, splits, engine) -> None:
    root = built[engine]
    encoder = FeatureEncoder.from_manifest(root, read_manifest(root).data)  # what serving loads
    rows = encoder.encode(raw, key="user_id", name="raw", with_label=True)
    records = _records(root)
    assert len(records) == sum(len(splits.rows[s]) for s in SPLITS) > 20
    seen = {"oov_user": 0, "oov_city": 0, "oov_tag": 0, "empty_tags": 0}
    for (split, task_id), record in records.items():
        sup, qry = splits.rows[split][task_id]
        for which, idx in (("support", sup), ("query", qry)):
            for name in ("sparse", "multi_hot", "dense", "label"):
                np.testing.assert_array_equal(
                    getattr(rows, name)[idx],
                    record.arrays[f"{which}.{name}"],
                    err_msg=f"{task_id} {which}.{name}",
                )
            sparse, multi = record.arrays[f"{which}.sparse"], record.arrays[f"{which}.multi_hot"]
            seen["oov_user"] += int((sparse[:, 0] == OOV_ID).sum())
            seen["oov_city"] += int((sparse[:, 2] == OOV_ID).sum())
            seen["oov_tag"] += int((multi[:, 0] == OOV_ID).sum())
            seen["empty_tags"] += int((multi[:, 0] == MULTI_HOT_PAD).all(axis=1).sum())
    # the comparison covered unseen values and empty lists, and hashed fields really hash
    assert all(v > 0 for v in seen.values()), seen
    assert rows.sparse[:, 1].min() >= 1 and rows.sparse[:, 1].max() <= 7
    want = [1 + stable_hash(f"item_id\0{v}") % 7 for v in raw["item_id"]]
    np.testing.assert_array_equal(rows.sparse[:, 1], want)
    assert rows.dense.dtype == np.float32 and not np.array_equal(rows.dense[:, 0], raw["price"].to_numpy())


def test_serving_tasks_of_raw_rows_equal_the_build_records(built, raw, splits) -> None:
    """``build_user_tasks`` (what ``FewShotAdapter`` scores) on the raw rows of each evaluation task."""
    root = built["duckdb"]
    encoder = FeatureEncoder.from_manifest(root, read_manifest(root).data)
    records = _records(root)
    sup, cand = [], []
    for split in ("val", "test"):
        for task_id, (s, q) in splits.rows[split].items():
            sup.append(raw.iloc[s].assign(task=task_id))
            cand.append(raw.iloc[q].drop(columns=["rating"]).assign(task=task_id))
    support = pd.concat(sup, ignore_index=True).sample(frac=1.0, random_state=0)  # serving sorts by time
    tasks = build_user_tasks(support, pd.concat(cand, ignore_index=True), encoder, key="task")
    assert len(tasks) == sum(len(splits.rows[s]) for s in ("val", "test"))
    split_of = {t: s for s in ("val", "test") for t in splits.rows[s]}
    for t in tasks:
        want = records[(split_of[t.key], t.key)].arrays
        for name, arr in t.record.arrays.items():
            if name != "query.label":  # candidates carry no label
                np.testing.assert_array_equal(arr, want[name], err_msg=f"{t.key} {name}")


# -- serialisation -------------------------------------------------------------------------------------
def test_encoder_round_trips_through_manifest_and_checkpoint_state(built, splits) -> None:
    encoder = splits.encoder
    for engine, root in built.items():
        manifest = read_manifest(root).data
        assert manifest["encoder"] == {"label_threshold": 3.0, "item_key": "item_id"}, engine
        assert FeatureEncoder.from_manifest(root, manifest) == encoder, engine
    assert "fresh" not in encoder.vocabs["tags"] and encoder.vocabs["item_id"] == []  # hashed: no vocabulary
    assert FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())), encoder.vocabs) == encoder

    dm = TaskDataModule(built["pandas"])
    dm.setup("fit")
    state = dm.state_dict()
    assert state["encoder"] == encoder.to_dict() and state["vocab"] == encoder.vocabs
    checkpoint = {"state_dict": {}, "TaskDataModule": state}
    got = find_encoder(encoder.schema, checkpoint)
    assert got == encoder and got.origin == "checkpoint['TaskDataModule']"
    # a checkpoint written before the encoder entry: vocabulary and task config only
    old = {k: v for k, v in state.items() if k != "encoder"}
    assert find_encoder(encoder.schema, {"TaskDataModule": old}) == encoder
    # a checkpoint whose vocabulary was too large to carry: read from the shard folder
    bare = {k: v for k, v in state.items() if k != "vocab"}
    assert find_encoder(encoder.schema, {"TaskDataModule": bare}, data_dir=built["duckdb"]) == encoder


def test_manifest_without_encoder_entry_uses_its_task_config() -> None:
    manifest = {"schema": SCHEMA.to_dict(), "task_config": {"label_threshold": "auto", "item_key": "item"}}
    assert encoder_settings(manifest) == {
        "schema": SCHEMA.to_dict(),
        "label_threshold": 0.5,
        "item_key": "item",
    }
    with pytest.raises(SchemaError, match=r"m\.json: missing key 'schema'"):
        encoder_settings({"task_config": {}}, "m.json")


def test_constructor_checks_vocabularies_against_the_schema(splits) -> None:
    enc = splits.encoder
    with pytest.raises(SchemaError, match=r"ckpt: no vocabulary for id field 'city'"):
        FeatureEncoder(enc.schema, {k: v for k, v in enc.vocabs.items() if k != "city"}, 3.0, origin="ckpt")
    with pytest.raises(
        SchemaError, match=r"vocabulary of 'city' has 2 values, but the schema's table has 4 rows"
    ):
        FeatureEncoder(enc.schema, {**enc.vocabs, "city": ["lima", "oslo"]}, 3.0)
    dup = FeatureEncoder(enc.schema, {**enc.vocabs, "city": ["lima", "lima", "oslo"]}, 3.0, origin="ckpt")
    with pytest.raises(SchemaError, match=r"ckpt: vocabulary of 'city': value 'lima' appears twice"):
        dup.encode(_raw_table().head(3), key="user_id")


# -- the rules -----------------------------------------------------------------------------------------
def test_token_parsing() -> None:
    assert parse_tokens("a|b||c|", "|") == ["a", "b", "c"]
    assert parse_tokens(["a", "", 7], "|") == ["a", "7"]  # a list is taken as its tokens
    assert parse_tokens(np.array(["x", "y"]), " ") == ["x", "y"]
    assert parse_tokens(float("nan"), "|") == parse_tokens(None, "|") == parse_tokens(pd.NA, "|") == []
    assert parse_tokens("", "|") == []
    f = FieldSpec("g", "multi_hot", hash_buckets=3)
    np.testing.assert_array_equal(bucket_ids(f, ["a", "b"]), [1 + stable_hash(f"g\0{v}") % 3 for v in "ab"])


def test_list_values_encode_like_joined_strings(splits, raw) -> None:
    rows = raw.head(40)
    as_lists = rows.assign(tags=[parse_tokens(v, "|") for v in rows["tags"]])
    a = splits.encoder.encode(rows, key="user_id")
    b = splits.encoder.encode(as_lists, key="user_id")
    np.testing.assert_array_equal(a.multi_hot, b.multi_hot)


@pytest.mark.parametrize(
    ("column", "value", "reason", "message"),
    [
        ("city", None, MISSING_ID, r"set\.csv: row 5 \(user_id='u00'\), column 'city': missing id \(NaN\)"),
        ("tags", "a|b|c|d", TOO_MANY_IDS, r"set\.csv: row 5 .*column 'tags': 4 ids, more than max_len=3"),
        (
            "price",
            1e300,
            BAD_DENSE,
            r"row 5 .*column 'price': dense value 1e\+300 is missing, not numeric or not finite",
        ),
        ("score", "cheap", BAD_DENSE, r"row 5 .*column 'score': dense value 'cheap'"),
    ],
)
def test_bad_values_name_set_row_user_and_column(splits, raw, column, value, reason, message) -> None:
    bad = raw.head(10).astype({column: object})
    bad.loc[5, column] = value
    with pytest.raises(EncodingError, match=message) as e:
        splits.encoder.encode(bad, key="user_id", name="set.csv")
    assert (e.value.row, e.value.column, e.value.reason) == (5, column, reason)


def test_labels_by_the_threshold_or_raw_0_1(splits, raw) -> None:
    rows = raw.head(10)
    got = splits.encoder.encode(rows, key="user_id").label
    np.testing.assert_array_equal(got, (rows["rating"] >= 3.0).astype(np.float32))
    raw_labels = dataclasses.replace(splits.encoder, label_threshold=None)
    with pytest.raises(
        EncodingError, match=r"row 0 \(user_id='u00'\), column 'rating': label \d\.0 is not 0/1"
    ):
        raw_labels.encode(rows.assign(rating=rows["rating"] + 1), key="user_id")
    np.testing.assert_array_equal(raw_labels.encode(rows.assign(rating=got), key="user_id").label, got)
