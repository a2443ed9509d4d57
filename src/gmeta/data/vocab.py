"""The vocabulary file of a shard folder: the raw value behind every id of every non-hashed id field.

With the manifest's schema and ``encoder`` entry it makes up the build's fitted
``gmeta.data.encoder.FeatureEncoder``, which serving uses to encode a new user's raw ids exactly as
the build did. At industrial scale it
holds millions of values (128M interactions: ~5M users and items), so it is columnar: one Parquet
file, one row per (field, id), columns ``field`` (dictionary-encoded), ``id`` and ``value``, sorted by
field name then id; the file's metadata lists every field, so a field with no values (every value
hashed away or filtered) still reads back as an empty list. Reading it is one Arrow scan, not a JSON parse of one giant object, and a field
can be read alone (``fields=``).

In memory a vocabulary is ``{field: [raw value of id 1, id 2, ...]}`` (id 0 is the "unseen" row and
has no value), as the build engines produce it. Shard folders written before this file existed hold
``vocab.json`` (the same mapping as one JSON object); ``read_vocab`` reads both, by file name.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gmeta.errors import UserError

#: file name of the vocabulary in a shard folder (the manifest's ``vocab.path`` names it)
VOCAB_FILE = "vocab.parquet"
#: the file name older shard folders used (still read)
LEGACY_VOCAB_FILE = "vocab.json"

#: Parquet key-value metadata: JSON list of every field name (fields with no rows included)
_FIELDS_KEY = b"gmeta.vocab.fields"

_SCHEMA = pa.schema(
    [
        ("field", pa.dictionary(pa.int32(), pa.string())),
        ("id", pa.int64()),
        ("value", pa.string()),
    ]
)


class VocabError(UserError):
    """A vocabulary file that cannot be read or does not have the expected layout."""


def vocab_table(vocabs: dict[str, list[str]]) -> pa.Table:
    """The columnar form of ``vocabs``: one row per (field, id), fields in name order, ids ascending."""
    fields: list[str] = []
    ids: list[int] = []
    values: list[str] = []
    for name in sorted(vocabs):
        raw = vocabs[name]
        fields.extend([name] * len(raw))
        ids.extend(range(1, len(raw) + 1))
        values.extend(str(v) for v in raw)
    return pa.table(
        {
            "field": pa.array(fields, pa.string()).dictionary_encode(),
            "id": pa.array(ids, pa.int64()),
            "value": pa.array(values, pa.string()),
        },
        schema=_SCHEMA.with_metadata({_FIELDS_KEY: json.dumps(sorted(vocabs)).encode()}),
    )


def write_vocab(path: Path, vocabs: dict[str, list[str]]) -> None:
    """Write ``vocabs`` to ``path`` (Parquet, zstd). Same input, same bytes: the manifest hashes it."""
    pq.write_table(vocab_table(vocabs), path, compression="zstd", row_group_size=1 << 20)


def read_vocab(
    source: Path | str | bytes, name: str | None = None, fields: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """The vocabulary in ``source`` (a path, or the file's bytes with its ``name``), optionally only ``fields``.

    Raises ``VocabError`` naming the file when it is not a vocabulary of the expected layout.
    """
    where = str(source) if not isinstance(source, bytes) else (name or "vocabulary bytes")
    file_name = Path(where).name
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise VocabError(f"vocabulary {where}: cannot be read ({e.strerror or e})") from e
    wanted = None if fields is None else set(fields)
    if file_name == LEGACY_VOCAB_FILE or data[:1] == b"{":
        return _read_legacy_json(data, where, wanted)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise VocabError(f"vocabulary {where}: not a readable Parquet file ({e}); rebuild the shards") from e
    missing = {"field", "id", "value"} - set(table.column_names)
    if missing:
        raise VocabError(
            f"vocabulary {where}: columns {table.column_names}, expected field, id, value (missing {sorted(missing)})"
        )
    listed = (table.schema.metadata or {}).get(_FIELDS_KEY)
    vocabs: dict[str, list[str]] = {
        f: [] for f in (json.loads(listed) if listed else []) if wanted is None or f in wanted
    }
    field_col = table.column("field").to_pylist()
    id_col = table.column("id").to_pylist()
    value_col = table.column("value").to_pylist()
    for row, (f, i, v) in enumerate(zip(field_col, id_col, value_col, strict=True)):
        if wanted is not None and f not in wanted:
            continue
        values = vocabs.setdefault(f, [])
        if i != len(values) + 1 or v is None:  # ids 1..V-1 in order, each with a value
            raise VocabError(
                f"vocabulary {where}: row {row} (field {f!r}) has id {i} and value {v!r}; expected id "
                f"{len(values) + 1} with a value (ids must run 1, 2, ... per field)"
            )
        values.append(v)
    return vocabs


def _read_legacy_json(data: bytes, where: str, wanted: set[str] | None) -> dict[str, list[str]]:
    try:
        vocabs = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"vocabulary {where}: not valid JSON ({e}); rebuild the shards") from e
    if not isinstance(vocabs, dict) or not all(isinstance(v, list) for v in vocabs.values()):
        raise VocabError(f"vocabulary {where}: expected an object of lists (field -> raw values)")
    return {f: v for f, v in vocabs.items() if wanted is None or f in wanted}
