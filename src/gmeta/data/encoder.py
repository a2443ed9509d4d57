"""The fitted feature encoder: raw interaction rows -> model inputs, the same in the build and in serving.

A ``FeatureEncoder`` is fitted once by the shard build (vocabularies from the training rows), saved
with the shards (``manifest.json``: the encoded schema and the ``encoder`` entry; ``vocab.parquet``:
the vocabularies, referenced by the manifest, never inlined), carried by checkpoints
(``TaskDataModule.state_dict``: ``encoder`` plus the vocabulary when small) and used by serving to
encode a new user's raw rows. Every encoding rule is defined here and nowhere else:

* sparse id: the value as a string; for a hashed field (``hash_buckets`` = B > 0) its bucket
  ``1 + stable_hash(name NUL value) % B`` (``bucket_ids``); otherwise its position in the field's
  sorted vocabulary + 1, and a value never seen in training -> the OOV row 0 (``vocab_ids``). A
  missing id is an error.
* multi-hot: the tokens of the raw value (``parse_tokens``: split at the field's separator, empty
  tokens dropped; a list value is taken as its tokens; a missing value has none); more than
  ``max_len`` tokens is an error; each token is encoded as a sparse id (``token_ids``), the list
  padded with ``MULTI_HOT_PAD`` to the schema's widest multi-hot field.
* dense: float32; a value that is missing, not numeric or not finite after the cast is an error.
* label: ``raw >= label_threshold`` as 0/1, or raw labels that must already be 0/1 (threshold None).

The relational build engines (``gmeta.data.build``) apply these functions per distinct raw value;
only the vocabulary lookup of sparse fields runs there as a SQL join (the same rule: id = position
in the sorted vocabulary + 1, unseen -> 0), and the tests check that both give the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gmeta.data.hashing import stable_hash
from gmeta.data.schema import MULTI_HOT_PAD, OOV_ID, FieldSpec, Schema, SchemaError
from gmeta.data.vocab import VOCAB_FILE, read_vocab, write_vocab

#: ``label_threshold: auto`` is this threshold, for 0/1 labels only
AUTO_LABEL_THRESHOLD = 0.5

#: ``EncodingError.reason`` values
MISSING_ID, TOO_MANY_IDS, BAD_DENSE, BAD_LABEL, LABEL_NOT_BINARY = (
    "missing_id",
    "too_many_ids",
    "bad_dense",
    "bad_label",
    "label_not_binary",
)


class EncodingError(SchemaError):
    """A raw value the encoder cannot encode.

    Attributes:
        row: 0-based position of the row in the encoded frame.
        column: the column holding the value.
        reason: one of ``MISSING_ID``, ``TOO_MANY_IDS``, ``BAD_DENSE``, ``BAD_LABEL``, ``LABEL_NOT_BINARY``.
        value: the raw cell.
        count: ``TOO_MANY_IDS`` only: how many tokens the value holds.
    """

    def __init__(
        self, message: str, *, row: int, column: str, reason: str, value: Any = None, count: int = 0
    ) -> None:
        super().__init__(message)
        self.row, self.column, self.reason, self.value, self.count = row, column, reason, value, count


def resolved_label_threshold(value: float | str | None) -> float | None:
    """The numeric threshold of a config value: ``"auto"`` is 0.5 (a build with ``auto`` succeeds only
    on 0/1 labels, so any shard set built with it used 0.5)."""
    return AUTO_LABEL_THRESHOLD if value == "auto" else (None if value is None else float(value))


# -- the rules, one value (or one distinct value) at a time ---------------------------------------
def bucket_ids(f: FieldSpec, values: Iterable[str]) -> np.ndarray:
    """The hash bucket (1..hash_buckets) of each string value of hashed field ``f``."""
    b = f.hash_buckets
    return np.array([1 + stable_hash(f"{f.name}\0{v}") % b for v in values], dtype=np.int64)


def _is_missing(value: Any) -> bool:
    """None, NaN (any float type), pd.NA or NaT: a scalar pandas counts as missing."""
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def parse_tokens(value: Any, separator: str) -> list[str]:
    """The tokens of one raw multi-hot value: a list/tuple/array is taken as its tokens, a missing
    value has none, anything else is split at ``separator``; empty tokens are dropped."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [s for s in map(str, value) if s]
    if _is_missing(value):
        return []
    return [t for t in str(value).split(separator) if t]


def fit_vocabulary(values: Iterable[str]) -> list[str]:
    """A field's vocabulary from its training values: distinct values in code-point order (id i+1 = entry i)."""
    return sorted(set(values))


def vocab_ids(index: pd.Index, values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids of string ``values`` in a vocabulary ``index`` (``vocab_index``): position + 1, unseen -> OOV 0."""
    pos = index.get_indexer(np.asarray(values, dtype=object))
    return np.where(pos >= 0, pos + 1, OOV_ID).astype(np.int64)


def vocab_index(vocab: Sequence[str], where: str = "vocabulary") -> pd.Index:
    """The lookup index of a vocabulary (its values must be distinct)."""
    index = pd.Index(np.asarray(vocab, dtype=object), dtype=object)
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise SchemaError(f"{where}: value {dup!r} appears twice; a vocabulary holds each value once")
    return index


def token_ids(
    f: FieldSpec, token_lists: Sequence[Sequence[str]], index: pd.Index | None, width: int
) -> np.ndarray:
    """(len(token_lists), width) ids of multi-hot field ``f``: each list's tokens encoded (hashed when
    ``f`` is, else looked up in ``index``), padded with ``MULTI_HOT_PAD``. Lists must fit ``width``."""
    tokens = sorted({t for toks in token_lists for t in toks})
    if f.hash_buckets > 0:
        ids = bucket_ids(f, tokens)
    elif index is not None:
        ids = vocab_ids(index, tokens)
    else:
        raise ValueError(f"multi_hot field {f.name!r} is not hashed: its vocabulary index is needed")
    lookup = dict(zip(tokens, ids.tolist(), strict=True))
    table = np.full((len(token_lists), width), MULTI_HOT_PAD, dtype=np.int64)
    for u, toks in enumerate(token_lists):
        table[u, : len(toks)] = [lookup[t] for t in toks]
    return table


def encode_labels(
    raw_labels: pd.Series,
    threshold: float | None,
    fail: Callable[[int, str, str], Exception] | None = None,
) -> np.ndarray:
    """0/1 float32 labels of a raw label column: ``raw >= threshold``, or (threshold None) raw labels
    that must be 0/1. A missing or non-numeric label, or a non-0/1 one without threshold, raises
    ``fail(row, reason, what)`` (default: an ``EncodingError`` naming the column and row)."""

    def error(r: int, reason: str, what: str) -> Exception:
        if fail is not None:
            return fail(r, reason, what)
        c = str(raw_labels.name)
        return EncodingError(
            f"column {c!r}, row {r}: {what}", row=r, column=c, reason=reason, value=raw_labels.iloc[r]
        )

    raw = pd.to_numeric(raw_labels, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(raw).any():
        r = _first(np.isnan(raw))
        raise error(r, BAD_LABEL, f"label {show_value(raw_labels.iloc[r])} is missing or not numeric")
    if threshold is not None:
        return (raw >= threshold).astype(np.float32)
    bad = ~np.isin(raw, (0.0, 1.0))
    if bad.any():
        r = _first(bad)
        raise error(
            r,
            LABEL_NOT_BINARY,
            f"label {raw[r]} is not 0/1 (the training data had no label threshold; pass label_threshold "
            "to binarise raw labels)",
        )
    return raw.astype(np.float32)


def _factorize_cells(col: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """(codes, distinct cells) of a multi-hot column; list cells become tuples (hashable), missing ones ``""``."""
    cells = col.astype(object)
    is_list = cells.map(lambda v: isinstance(v, (list, tuple, np.ndarray)))
    if is_list.any():
        cells = cells.where(~is_list, cells[is_list].map(lambda v: tuple(map(str, v))))
    cells = cells.where(is_list | cells.notna(), "")
    codes, uniques = pd.factorize(cells.to_numpy(dtype=object))
    return codes, list(uniques)


@dataclass(frozen=True)
class EncodedRows:
    """Encoded rows: ``sparse`` (N, Fs) int64, ``multi_hot`` (N, Fm, L) int64 (``MULTI_HOT_PAD``-padded),
    ``dense`` (N, Fd) float32, ``label`` (N,) float32 (zeros when labels were not encoded)."""

    sparse: np.ndarray
    multi_hot: np.ndarray
    dense: np.ndarray
    label: np.ndarray


# -- the fitted encoder ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureEncoder:
    """How raw values become model inputs: the encoded schema, vocabularies and label rule.

    Attributes:
        schema: the encoded schema (vocabulary sizes set): field kinds, separators, max_len, hash buckets.
        vocabs: per non-hashed id field, the raw values of ids 1..V-1 (entry i holds id i+1).
        label_threshold: label = (raw label >= threshold); None: raw labels must be 0/1.
        item_key: the item column of the task config (names candidates in serving outputs), or None.
        origin: where the encoder was read from (for messages).
    """

    schema: Schema
    vocabs: dict[str, list[str]]
    label_threshold: float | None
    item_key: str | None = None
    origin: str = field(default="encoder", compare=False)
    _index: dict[str, pd.Index] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in self.schema.id_fields:
            if f.hash_buckets > 0:
                if f.vocab_size != f.hash_buckets + 1:
                    raise SchemaError(
                        f"{self.origin}: hashed field {f.name!r} has vocab_size {f.vocab_size}, expected "
                        f"hash_buckets + 1 = {f.hash_buckets + 1}"
                    )
                continue
            vocab = self.vocabs.get(f.name)
            if vocab is None:
                raise SchemaError(f"{self.origin}: no vocabulary for id field {f.name!r}")
            if len(vocab) + 1 != f.vocab_size:
                raise SchemaError(
                    f"{self.origin}: vocabulary of {f.name!r} has {len(vocab)} values, but the schema's table "
                    f"has {f.vocab_size} rows (expected {f.vocab_size - 1} values + the OOV row): the "
                    "vocabulary belongs to another build of the data"
                )

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        df: pd.DataFrame,
        schema: Schema,
        train_rows: np.ndarray,
        label_threshold: float | None,
        item_key: str | None = None,
    ) -> FeatureEncoder:
        """Vocabularies of every non-hashed id field from the rows ``train_rows`` of ``df`` (the
        reference build's fit; the relational engines fit the same vocabularies in their plans)."""
        vocabs: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for f in schema.id_fields:
            if f.hash_buckets > 0:  # listed, empty: the vocabulary file names every id field
                vocabs[f.name], sizes[f.name] = [], f.hash_buckets + 1
                continue
            col = df[f.name].iloc[train_rows]
            if f.kind == "sparse":
                vocabs[f.name] = fit_vocabulary(col.dropna().astype(str).unique())
            else:
                _, cells = _factorize_cells(col)
                vocabs[f.name] = fit_vocabulary(t for c in cells for t in parse_tokens(c, f.separator))
            sizes[f.name] = len(vocabs[f.name]) + 1
        return cls(schema.with_vocab_sizes(sizes), vocabs, label_threshold, item_key, "fitted")

    # -- encoding ------------------------------------------------------------------------------
    def index(self, name: str) -> pd.Index:
        """The lookup index of a non-hashed id field's vocabulary (built on first use)."""
        if name not in self._index:
            self._index[name] = vocab_index(self.vocabs[name], f"{self.origin}: vocabulary of {name!r}")
        return self._index[name]

    def ids(self, f: FieldSpec, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """Sparse ids of string ``values`` of id field ``f``."""
        return bucket_ids(f, values) if f.hash_buckets > 0 else vocab_ids(self.index(f.name), values)

    def encode(self, df: pd.DataFrame, key: str, name: str = "rows", with_label: bool = True) -> EncodedRows:
        """Encode every row of ``df`` (the schema's feature columns; the label too if ``with_label``).

        Each column is encoded once per distinct value. Raises ``EncodingError`` for the first bad
        value (sparse fields, then multi-hot, then dense row by row, then labels), its message naming
        ``name`` (e.g. the file), the row, its ``key`` value and the column.
        """
        s, n = self.schema, len(df)

        def fail(r: int, c: str, reason: str, what: str, count: int = 0) -> EncodingError:
            value = df[key].iloc[r] if key in df.columns else "?"
            cell = df[c].iloc[r]
            return EncodingError(
                f"{name}: row {r} ({key}={value!r}), column {c!r}: {what}",
                row=r,
                column=c,
                reason=reason,
                value=cell,
                count=count,
            )

        sparse = np.zeros((n, len(s.sparse)), np.int64)
        for j, f in enumerate(s.sparse):
            col = df[f.name]
            missing = col.isna().to_numpy()
            if missing.any():
                raise fail(_first(missing), f.name, MISSING_ID, "missing id (NaN); ids must be present")
            codes, uniques = pd.factorize(col.astype(str))
            sparse[:, j] = self.ids(f, np.asarray(uniques, dtype=object))[codes]
        width = s.max_multi_hot_len
        multi_hot = np.full((n, len(s.multi_hot), width), MULTI_HOT_PAD, np.int64)
        for j, f in enumerate(s.multi_hot):
            codes, cells = _factorize_cells(df[f.name])
            lists = [parse_tokens(c, f.separator) for c in cells]
            for u, toks in enumerate(lists):  # distinct values in order of first appearance
                if len(toks) > f.max_len:
                    what = f"{len(toks)} ids, more than max_len={f.max_len}"
                    raise fail(_first(codes == u), f.name, TOO_MANY_IDS, what, count=len(toks))
            index = None if f.hash_buckets > 0 else self.index(f.name)
            multi_hot[:, j] = token_ids(f, lists, index, width)[codes]
        dense = np.zeros((n, len(s.dense)), np.float32)
        for j, f in enumerate(s.dense):
            with np.errstate(over="ignore"):  # beyond float32's range -> inf, reported just below
                dense[:, j] = pd.to_numeric(df[f.name], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(dense)  # after the float32 cast: a float64 beyond float32's range is inf
        if bad.any():
            r, c = (int(x[0]) for x in np.nonzero(bad))  # row-major: the first bad row, its first bad column
            col = s.dense[c].name
            raise fail(
                r,
                col,
                BAD_DENSE,
                f"dense value {show_value(df[col].iloc[r])} is missing, not numeric or not finite",
            )
        label = np.zeros(n, np.float32)
        if with_label:
            label = encode_labels(
                df[s.label], self.label_threshold, lambda r, reason, what: fail(r, s.label, reason, what)
            )
        return EncodedRows(sparse=sparse, multi_hot=multi_hot, dense=dense, label=label)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything but the vocabularies (which live in ``vocab.parquet``, or next to this in a checkpoint)."""
        return {
            "schema": self.schema.to_dict(),
            "label_threshold": self.label_threshold,
            "item_key": self.item_key,
        }

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], vocabs: dict[str, list[str]], origin: str = "encoder"
    ) -> FeatureEncoder:
        """The encoder of ``to_dict`` output plus its vocabularies (validated against the schema)."""
        try:
            schema = Schema.from_dict(d["schema"], where=origin)
            threshold = d["label_threshold"]
        except KeyError as e:
            raise SchemaError(f"{origin}: the encoder entry has no {e.args[0]!r}") from None
        return cls(schema, vocabs, None if threshold is None else float(threshold), d.get("item_key"), origin)

    def save(self, directory: Path) -> dict[str, Any]:
        """Write ``vocab.parquet`` into the shard folder ``directory``; return the manifest entries that
        make up the encoder with it (``schema``, ``encoder``, ``vocab``: file name and sha256)."""
        from gmeta.data.checksums import sha256_file

        write_vocab(directory / VOCAB_FILE, self.vocabs)
        settings = self.to_dict()
        return {
            "schema": settings.pop("schema"),
            "encoder": settings,
            "vocab": {"path": VOCAB_FILE, "sha256": sha256_file(directory / VOCAB_FILE)},
        }

    @classmethod
    def from_manifest(cls, root: Path, manifest: dict[str, Any]) -> FeatureEncoder:
        """The encoder of the shard folder ``root`` (its ``manifest.json`` as ``manifest``): reads the
        vocabulary file the manifest names and checks it against the manifest's sha256."""
        from gmeta.data.checksums import sha256_file

        where = str(root / "manifest.json")
        info = manifest.get("vocab") or {}
        path = root / info.get("path", VOCAB_FILE)
        if not path.is_file():
            raise SchemaError(f"{path} not found: the shard folder {root} has no vocabulary")
        want = info.get("sha256")
        if want is not None and sha256_file(path) != want:
            raise SchemaError(f"{path}: sha256 differs from {where} (replaced or corrupt)")
        return cls.from_dict(encoder_settings(manifest, where), read_vocab(path), str(path))


def encoder_settings(manifest: dict[str, Any], where: str = "manifest.json") -> dict[str, Any]:
    """``FeatureEncoder.to_dict`` of a manifest without reading its vocabulary; manifests written
    before the ``encoder`` entry existed give the label rule and item key of their task config."""
    if "schema" not in manifest:
        raise SchemaError(f"{where}: missing key 'schema'")
    entry = manifest.get("encoder")
    if entry is None:
        tc = manifest.get("task_config") or {}
        entry = {
            "label_threshold": resolved_label_threshold(tc.get("label_threshold")),
            "item_key": tc.get("item_key"),
        }
    return {"schema": manifest["schema"], **entry}


def _first(mask: np.ndarray) -> int:
    return int(np.asarray(mask).nonzero()[0][0])


def show_value(value: Any) -> str:
    """A raw cell for messages: ``nan`` / ``'abc'`` / ``3.5`` (numpy scalars as plain Python values)."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)
