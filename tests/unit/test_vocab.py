"""The columnar vocabulary file (gmeta.data.vocab): round trip, stable bytes, legacy JSON, bad files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmeta.data.vocab import LEGACY_VOCAB_FILE, VocabError, read_vocab, write_vocab

VOCABS = {"user_id": ["u7", "ü-β", "12"], "item_id": ["Toy Story (1995)"], "genre": []}


def test_round_trip_keeps_every_field_value_and_order(tmp_path) -> None:
    write_vocab(tmp_path / "v.parquet", VOCABS)
    assert read_vocab(tmp_path / "v.parquet") == VOCABS
    # bytes (as fetched from a URL) and one field alone; a field with no values stays an empty list
    data = (tmp_path / "v.parquet").read_bytes()
    assert read_vocab(data, name="http://x/vocab.parquet", fields=["item_id", "genre"]) == {
        "item_id": ["Toy Story (1995)"],
        "genre": [],
    }


def test_same_vocabulary_same_bytes_whatever_the_field_order(tmp_path) -> None:
    # the manifest records the file's sha256 and checkpoints compare it: it must not depend on dict order
    write_vocab(tmp_path / "a.parquet", VOCABS)
    write_vocab(tmp_path / "b.parquet", dict(reversed(list(VOCABS.items()))))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_legacy_json_vocabulary_is_read(tmp_path) -> None:
    (tmp_path / LEGACY_VOCAB_FILE).write_text(json.dumps(VOCABS))
    assert read_vocab(tmp_path / LEGACY_VOCAB_FILE) == VOCABS


@pytest.mark.parametrize(
    "content, match",
    [
        (b"PAR1 not really", r"bad\.parquet: not a readable Parquet file"),
        (b"", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_corrupt_file_is_named(tmp_path, content, match) -> None:
    (tmp_path / "bad.parquet").write_bytes(content)
    with pytest.raises(VocabError, match=match):
        read_vocab(tmp_path / "bad.parquet")


def test_missing_file_and_wrong_layout_are_named(tmp_path) -> None:
    with pytest.raises(VocabError, match=r"nope\.parquet: cannot be read"):
        read_vocab(tmp_path / "nope.parquet")
    pq.write_table(pa.table({"field": ["user_id"], "value": ["u1"]}), tmp_path / "cols.parquet")
    with pytest.raises(VocabError, match=r"cols\.parquet: columns .* \(missing \['id'\]\)"):
        read_vocab(tmp_path / "cols.parquet")
    # ids must run 1, 2, ... per field: a gap would shift every later id onto another row
    pq.write_table(
        pa.table({"field": ["user_id", "user_id"], "id": [1, 3], "value": ["a", "b"]}),
        tmp_path / "gap.parquet",
    )
    with pytest.raises(
        VocabError, match=r"gap\.parquet: row 1 \(field 'user_id'\) has id 3 .* expected id 2"
    ):
        read_vocab(tmp_path / "gap.parquet")
