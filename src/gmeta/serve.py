"""Few-shot adaptation for new users: load a checkpoint, adapt on a handful of interactions, score items.

A new user (any value of the grouping key) brings *support* interactions (rows with the schema's
columns, label included) and a list of *candidate* items (rows without labels). ``FewShotAdapter``
encodes both exactly as the training data was encoded (the training vocabularies; ids never seen in
training map to the OOV row 0 or to their hash bucket), builds one task per user (support = the
user's interactions in time order, query = the candidates in input order), runs the same inner loop
as evaluation (``gmeta.meta.inner.predict(..., adapted=True)``) for many users at once, and returns a
probability per candidate. For the same task it gives the evaluation path's scores.

Where the encoding comes from (first that exists):

1. the checkpoint itself: ``checkpoint[<DataModule class>]["vocab"]`` (a data module's ``state_dict``)
   or ``checkpoint["hyper_parameters"]["vocab"]``, with ``task_config`` next to it;
2. ``data_dir``: a shard folder (``manifest.json`` + its vocabulary file) built for this checkpoint;
3. the run directory the checkpoint sits in (``config_resolved.yaml``: ``data.data_dir``).

Candidate rows are scored by the same model as training rows, so they need every feature column of
the schema (user side and item side). ``fill_candidate_features`` completes them: item columns
joined from an item table (``items``, keyed by the item column), user columns copied from the user's
support rows (``user_columns``; each must hold one value per user there).

Shapes: a batch holds T users, S = the most support rows of one of them, Q = the most candidates.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gmeta.data.batch import TaskBatch, TaskRecord, collate_tasks
from gmeta.data.schema import MULTI_HOT_PAD, OOV_ID, Schema, SchemaError
from gmeta.data.shards import VOCAB, read_manifest
from gmeta.data.tasks import stable_hash
from gmeta.data.vocab import read_vocab
from gmeta.meta.inner import predict
from gmeta.meta.module import MetaDLRMModule

log = logging.getLogger(__name__)


class ServeError(SchemaError):
    """Bad serving input (file, row, column named) or a checkpoint without a usable vocabulary."""


# -- the training encoding -----------------------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    """How raw values became model inputs in training.

    Attributes:
        schema: the encoded schema (vocab sizes set), as the checkpoint holds it.
        vocabs: per non-hashed id field, the raw values of ids 1..V-1 (index i holds id i+1).
        label_threshold: label = (raw label >= threshold); None: labels must already be 0/1.
        item_key: the item column of the task config (names the candidates in outputs), or None.
        origin: where the vocabularies were found (for messages).
    """

    schema: Schema
    vocabs: dict[str, list[str]]
    label_threshold: float | None
    item_key: str | None
    origin: str
    index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in self.schema.id_fields:
            if f.hash_buckets > 0:
                continue
            vocab = self.vocabs.get(f.name)
            if vocab is None:
                raise ServeError(f"{self.origin}: no vocabulary for id field {f.name!r}")
            if len(vocab) + 1 != f.vocab_size:
                raise ServeError(
                    f"{self.origin}: vocabulary of {f.name!r} has {len(vocab)} values, but the checkpoint's "
                    f"table has {f.vocab_size} rows (expected {f.vocab_size - 1} values + the OOV row): "
                    "the vocabulary belongs to another build of the data"
                )
            self.index[f.name] = {str(v): i + 1 for i, v in enumerate(vocab)}


def _task_config_fields(task_config: dict[str, Any] | None) -> tuple[float | None, str | None]:
    tc = task_config or {}
    from gmeta.data.tasks import resolved_label_threshold  # "auto" -> 0.5

    return resolved_label_threshold(tc.get("label_threshold")), tc.get("item_key")


def _find_run_data_dir(ckpt: Path) -> Path | None:
    """``data.data_dir`` of the Hydra run the checkpoint belongs to (``config_resolved.yaml`` above it)."""
    from omegaconf import OmegaConf  # a Hydra dependency; only needed for this fallback

    for parent in list(ckpt.resolve().parents)[:5]:
        cfg_path = parent / "config_resolved.yaml"
        if cfg_path.is_file():
            try:
                data_dir = OmegaConf.select(OmegaConf.load(cfg_path), "data.data_dir")
            except Exception as e:  # noqa: BLE001 - a broken run config only disables this fallback
                log.warning("could not read %s: %s", cfg_path, e)
                return None
            return Path(str(data_dir)) if data_dir else None
    return None


def load_encoding(
    schema: Schema,
    checkpoint: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    ckpt_path: str | Path | None = None,
) -> Encoding:
    """The training encoding of a checkpoint (see the module docstring for the search order).

    Args:
        schema: the checkpoint's encoded schema (``module.schema``); the vocabulary must match it.
        checkpoint: the raw checkpoint dict (searched for a stored vocabulary).
        data_dir: shard folder with ``manifest.json`` and its vocabulary file.
        ckpt_path: the checkpoint file (its run directory's config names the data folder).
    """
    for key, value in (checkpoint or {}).items():
        if isinstance(value, dict) and isinstance(value.get("vocab"), dict) and key != "state_dict":
            threshold, item_key = _task_config_fields(value.get("task_config"))
            return Encoding(schema, value["vocab"], threshold, item_key, f"checkpoint[{key!r}]")
    hp = (checkpoint or {}).get("hyper_parameters") or {}
    if isinstance(hp.get("vocab"), dict):
        threshold, item_key = _task_config_fields(hp.get("task_config"))
        return Encoding(schema, hp["vocab"], threshold, item_key, "checkpoint hyper_parameters")

    tried = ["the checkpoint (no stored vocabulary)"]
    if data_dir is None and ckpt_path is not None:
        run_dir = _find_run_data_dir(Path(ckpt_path))
        if run_dir is not None and (run_dir / "manifest.json").is_file():
            data_dir = run_dir
        elif run_dir is None:
            tried.append(f"a run config (config_resolved.yaml with data.data_dir) above {ckpt_path}: none")
        else:
            tried.append(f"the run config's data dir {run_dir}: no manifest.json there")
    if data_dir is None:
        raise ServeError(
            f"no vocabulary found for checkpoint {ckpt_path}: tried {'; '.join(tried)}. Pass the shard folder "
            "the model was trained on (--data-dir / data_dir=, the folder holding manifest.json and vocab.parquet)"
        )
    manifest = read_manifest(data_dir)
    where = str(manifest.root / "manifest.json")
    if manifest.schema.to_dict() != schema.to_dict():
        raise ServeError(
            f"{where}: schema (fields, vocabulary sizes) differs from the checkpoint's: these shards were not "
            f"the ones the model was trained on.\n  shards:     {manifest.schema.to_dict()}\n"
            f"  checkpoint: {schema.to_dict()}"
        )
    vocab_path = manifest.root / manifest.data.get("vocab", {}).get("path", VOCAB)
    if not vocab_path.is_file():
        raise ServeError(f"{vocab_path} not found: the shard folder {manifest.root} has no vocabulary")
    want = manifest.data.get("vocab", {}).get("sha256")
    if want is not None:
        from gmeta.data.checksums import sha256_file

        if sha256_file(vocab_path) != want:
            raise ServeError(f"{vocab_path}: sha256 differs from {where} (replaced or corrupt)")
    trained = next(  # the vocabulary the checkpoint was trained with (TaskDataModule.state_dict)
        (
            v.get("vocab_sha256")
            for v in (checkpoint or {}).values()
            if isinstance(v, dict) and v.get("vocab_sha256")
        ),
        None,
    )
    if trained and want and trained != want:
        raise ServeError(
            f"{where}: vocabulary sha256 {want[:12]}... is not the one the checkpoint was trained with "
            f"({trained[:12]}...): ids would map to other embedding rows. Pass the shard folder the model "
            "was trained on (--data-dir)"
        )
    threshold, item_key = _task_config_fields(manifest.data.get("task_config"))
    return Encoding(schema, read_vocab(vocab_path), threshold, item_key, str(vocab_path))


# -- reading and checking raw rows ---------------------------------------------------------------
def read_table(path: str | Path, id_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet / JSON (a list of records) / JSON Lines file of interactions.

    Id columns are read as strings (as ``TabularSource`` does), so ``"007"`` stays ``"007"``.
    In JSON, a multi-hot value may be a list of ids instead of one separator-joined string.
    """
    p = Path(path)
    if not p.is_file():
        raise ServeError(f"{p}: file not found")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            return pd.read_csv(p, sep=sep, dtype={c: str for c in id_columns})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ServeError(f"{p}: cannot be read as CSV ({' '.join(str(e).split())})") from None
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa

        try:
            return pd.read_parquet(p)
        except (pa.ArrowException, OSError) as e:
            raise ServeError(f"{p}: cannot be read as Parquet ({' '.join(str(e).split())})") from None
    if suffix in (".json", ".jsonl"):
        text = p.read_text()
        try:
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ServeError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ServeError(f"{p}: expected a JSON list of objects (one per row), or JSON Lines")
        return pd.DataFrame.from_records(records)
    raise ServeError(f"{p}: unsupported file type {suffix!r}; expected .csv, .tsv, .parquet, .json or .jsonl")


def _where(name: str, df: pd.DataFrame, key: str, row: int) -> str:
    value = df[key].iloc[row] if key in df.columns else "?"
    return f"{name}: row {row} ({key}={value!r})"


def _show(value: Any) -> str:
    """A raw cell for messages: ``nan`` / ``'abc'`` / ``3.5`` (numpy scalars as plain Python values)."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _first(mask: np.ndarray) -> int:
    return int(np.asarray(mask).nonzero()[0][0])


def _check_columns(df: pd.DataFrame, needed: Sequence[str], name: str, hint: str = "") -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        extra = [c for c in df.columns if c not in needed]
        raise ServeError(
            f"{name}: missing column(s) {missing}; columns needed: {list(needed)}"
            + (f"; columns present that the model does not use: {extra}" if extra else "")
            + (f". {hint}" if hint else "")
        )


def fill_candidate_features(
    candidates: pd.DataFrame,
    support: pd.DataFrame,
    schema: Schema,
    key: str,
    items: pd.DataFrame | None = None,
    item_key: str | None = None,
    user_columns: Sequence[str] = (),
    names: tuple[str, str, str] = ("candidates", "support", "items"),
) -> pd.DataFrame:
    """Complete candidate rows with item columns from ``items`` and user columns from the support rows.

    Columns the candidates already hold are kept as they are. ``items`` must hold one row per item
    (``item_key``); every candidate item must be in it. Each of ``user_columns`` must hold a single
    value per user in ``support``; users without support rows must then carry the column themselves.
    Returns a new frame in the candidates' row order.
    """
    cand_name, sup_name, items_name = names
    out = candidates.reset_index(drop=True).copy()
    if items is not None:
        if not item_key:
            raise ServeError("an item table was given but no item column is known: pass item_key")
        _check_columns(items, [item_key], items_name)
        _check_columns(out, [item_key], cand_name)
        cols = [c for c in items.columns if c != item_key and c not in out.columns]
        table = items.assign(**{item_key: items[item_key].astype(str)})
        dup = table[item_key].duplicated()
        if dup.any():
            r = _first(dup.to_numpy())
            raise ServeError(f"{items_name}: row {r}: item {table[item_key].iloc[r]!r} appears twice")
        table = table.set_index(item_key)[cols]
        keys = out[item_key].astype(str)
        unknown = ~keys.isin(table.index)
        if unknown.any():
            r = _first(unknown.to_numpy())
            raise ServeError(
                f"{_where(cand_name, out, key, r)}: item {keys.iloc[r]!r} is not in the item table {items_name}"
            )
        joined = table.loc[keys.to_numpy()].reset_index(drop=True)
        for c in cols:
            out[c] = joined[c].to_numpy()
    if user_columns:
        _check_columns(support, [key, *user_columns], sup_name)
        _check_columns(out, [key], cand_name)
        sup_keys = support[key].astype(str)
        for c in user_columns:
            per_user = support[c].groupby(sup_keys.to_numpy(), sort=False)
            n_values = per_user.nunique(dropna=False)
            if (n_values > 1).any():
                user = str(n_values.index[_first((n_values > 1).to_numpy())])
                raise ServeError(
                    f"{sup_name}: user column {c!r} has several values for {key}={user!r} "
                    f"({sorted(map(str, support[c][sup_keys == user].unique()))}); a user column needs one value per user"
                )
            values = per_user.first()
            cand_keys = out[key].astype(str)
            filled = cand_keys.map(values)
            if c in out.columns:
                filled = out[c].where(out[c].notna(), filled)
            if filled.isna().any():
                r = _first(filled.isna().to_numpy())
                raise ServeError(
                    f"{_where(cand_name, out, key, r)}: column {c!r}: no value, and the user has no support "
                    f"rows in {sup_name} to copy it from"
                )
            out[c] = filled.to_numpy()
    return out


# -- encoding ------------------------------------------------------------------------------------
@dataclass
class EncodedRows:
    """Rows of one set, encoded: ``sparse`` (N, Fs), ``multi_hot`` (N, Fm, L), ``dense`` (N, Fd), ``label`` (N,)."""

    sparse: np.ndarray
    multi_hot: np.ndarray
    dense: np.ndarray
    label: np.ndarray


def _bucket(name: str, buckets: int, value: str) -> int:
    # gmeta.data.tasks._bucket, one value at a time
    return 1 + stable_hash(f"{name}\0{value}") % buckets


def encode_rows(
    df: pd.DataFrame,
    enc: Encoding,
    key: str,
    name: str,
    with_label: bool,
) -> EncodedRows:
    """Encode raw rows with the training vocabularies (``gmeta.data.tasks._encode``'s rules).

    Sparse ids: ``str(value)`` looked up in the vocabulary, unseen -> OOV row 0 (or its hash bucket);
    multi-hot: the string split at the field's separator, empty tokens dropped (a JSON list is taken
    as the tokens), NaN = an empty list; dense: float32; label: ``raw >= label_threshold`` (or 0/1).
    Raises ``ServeError`` naming ``name``, the row, the user and the column of the first bad value.
    """
    schema = enc.schema
    n = len(df)
    sparse = np.zeros((n, len(schema.sparse)), np.int64)
    for j, f in enumerate(schema.sparse):
        col = df[f.name]
        if col.isna().any():
            r = _first(col.isna().to_numpy())
            raise ServeError(
                f"{_where(name, df, key, r)}, column {f.name!r}: missing id (NaN); ids must be present"
            )
        values = col.astype(str).to_numpy()
        if f.hash_buckets > 0:
            sparse[:, j] = [_bucket(f.name, f.hash_buckets, v) for v in values]
        else:
            index = enc.index[f.name]
            sparse[:, j] = [index.get(v, OOV_ID) for v in values]
    width = schema.max_multi_hot_len
    multi_hot = np.full((n, len(schema.multi_hot), width), MULTI_HOT_PAD, np.int64)
    for j, f in enumerate(schema.multi_hot):
        for r, v in enumerate(df[f.name].to_numpy()):
            if isinstance(v, (list, tuple, np.ndarray)):
                toks = [str(t) for t in v if str(t)]
            elif v is None or (isinstance(v, float) and math.isnan(v)):
                toks = []
            else:
                toks = [t for t in str(v).split(f.separator) if t]
            if len(toks) > f.max_len:
                raise ServeError(
                    f"{_where(name, df, key, r)}, column {f.name!r}: {len(toks)} ids, more than max_len={f.max_len}"
                )
            if f.hash_buckets > 0:
                ids = [_bucket(f.name, f.hash_buckets, t) for t in toks]
            else:
                ids = [enc.index[f.name].get(t, OOV_ID) for t in toks]
            multi_hot[r, j, : len(ids)] = ids
    dense_names = [f.name for f in schema.dense]
    dense = np.zeros((n, len(dense_names)), np.float32)
    for j, c in enumerate(dense_names):
        values = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            r = _first(~np.isfinite(values))
            raise ServeError(
                f"{_where(name, df, key, r)}, column {c!r}: dense value {_show(df[c].iloc[r])} is missing, "
                "not numeric or not finite"
            )
        dense[:, j] = values  # float64 -> float32: exact for float32 inputs, as training's cast
    label = np.zeros(n, np.float32)
    if with_label:
        c = schema.label
        raw = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(raw).any():
            r = _first(np.isnan(raw))
            raise ServeError(
                f"{_where(name, df, key, r)}, column {c!r}: label {_show(df[c].iloc[r])} is missing or not numeric"
            )
        if enc.label_threshold is not None:
            label = (raw >= enc.label_threshold).astype(np.float32)
        else:
            bad = ~np.isin(raw, (0.0, 1.0))
            if bad.any():
                r = _first(bad)
                raise ServeError(
                    f"{_where(name, df, key, r)}, column {c!r}: label {raw[r]} is not 0/1 (the training data "
                    "had no label threshold; pass label_threshold to binarise raw labels)"
                )
            label = raw.astype(np.float32)
    return EncodedRows(sparse=sparse, multi_hot=multi_hot, dense=dense, label=label)


# -- the adapter ---------------------------------------------------------------------------------
@dataclass
class UserTask:
    """One user's encoded task plus what the output needs (row positions of its candidates)."""

    key: str
    record: TaskRecord
    candidate_rows: np.ndarray
    support_size: int
    user_known: bool | None


class FewShotAdapter:
    """Adapt a trained meta-DLRM to new users on their support interactions and score candidates.

    Args:
        module: a trained ``MetaDLRMModule`` (moved to ``device`` and put in eval mode).
        encoding: the training encoding (``load_encoding``).
        device: where to run (``"cpu"``, ``"cuda"``, ...).
        batch_users: users per inner-loop batch (memory grows with users x support x candidates).
    """

    def __init__(
        self,
        module: MetaDLRMModule,
        encoding: Encoding,
        device: str | torch.device = "cpu",
        batch_users: int = 256,
    ) -> None:
        if batch_users < 1:
            raise ValueError(f"batch_users must be >= 1, got {batch_users}")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.encoding = encoding
        self.schema = encoding.schema
        self.batch_users = batch_users

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | Path,
        data_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_users: int = 256,
        label_threshold: float | None | str = "training",
    ) -> FewShotAdapter:
        """Load a Lightning checkpoint (a file or a sharded directory) and its training encoding.

        ``label_threshold``: ``"training"`` uses the training data's threshold (the manifest's task
        config); a number or None overrides it (None: support labels must be 0/1).
        """
        path = Path(ckpt_path)
        if not path.exists():
            raise ServeError(f"checkpoint not found: {path}")
        from gmeta.parallel.sharded_checkpoint import load_lightning_module

        # a file, or a sharded checkpoint directory read whole (gmeta.parallel.sharded_checkpoint)
        module, checkpoint = load_lightning_module(MetaDLRMModule, path)
        enc = load_encoding(module.schema, checkpoint, data_dir=data_dir, ckpt_path=path)
        if label_threshold != "training":
            enc = Encoding(
                enc.schema,
                enc.vocabs,
                None if label_threshold is None else float(label_threshold),
                enc.item_key,
                enc.origin,
            )
        log.info("loaded %s (vocabulary from %s) on %s", path, enc.origin, device)
        return cls(module, enc, device=device, batch_users=batch_users)

    # -- inputs --------------------------------------------------------------------------------
    def feature_columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    def id_columns(self, key: str | None = None) -> list[str]:
        """Columns read as strings: the key, the id fields and the item column."""
        item = [self.encoding.item_key] if self.encoding.item_key else []
        return list(
            dict.fromkeys([key or self.schema.task_key, *(f.name for f in self.schema.id_fields), *item])
        )

    def read(self, path: str | Path, key: str | None = None) -> pd.DataFrame:
        """``read_table`` with this model's id columns read as strings."""
        return read_table(path, self.id_columns(key))

    def fill_candidates(
        self,
        candidates: pd.DataFrame,
        support: pd.DataFrame,
        items: pd.DataFrame | None = None,
        user_columns: Sequence[str] = (),
        key: str | None = None,
        item_key: str | None = None,
        names: tuple[str, str, str] = ("candidates", "support", "items"),
    ) -> pd.DataFrame:
        """``fill_candidate_features`` with this model's schema, key and item column."""
        return fill_candidate_features(
            candidates,
            support,
            self.schema,
            key or self.schema.task_key,
            items=items,
            item_key=item_key or self.encoding.item_key,
            user_columns=user_columns,
            names=names,
        )

    # -- building tasks ------------------------------------------------------------------------

    def build_tasks(
        self,
        support: pd.DataFrame,
        candidates: pd.DataFrame,
        key: str | None = None,
        names: tuple[str, str] = ("support", "candidates"),
    ) -> list[UserTask]:
        """One task per user in ``candidates`` (first-appearance order), after validating both tables.

        Support rows of a user are sorted by the schema's time column when present (stable: ties keep
        input order, as in training); candidates keep input order. Support users without candidates
        are skipped (logged).
        """
        key = key or self.schema.task_key
        sup_name, cand_name = names
        feats = self.feature_columns()
        _check_columns(support, list(dict.fromkeys([key, *feats, self.schema.label])), sup_name)
        _check_columns(
            candidates,
            list(dict.fromkeys([key, *feats])),
            cand_name,
            hint="Candidate rows need every feature column: fill item columns from an item table (--items) "
            "and user columns from the support rows (--user-columns)",
        )
        support = support.reset_index(drop=True)
        candidates = candidates.reset_index(drop=True)
        for name, df in ((sup_name, support), (cand_name, candidates)):
            if df[key].isna().any():
                r = _first(df[key].isna().to_numpy())
                raise ServeError(f"{name}: row {r}, column {key!r}: missing user key (NaN)")
        if len(candidates) == 0:
            raise ServeError(f"{cand_name}: no candidate rows")
        sup_enc = encode_rows(support, self.encoding, key, sup_name, with_label=True)
        cand_enc = encode_rows(candidates, self.encoding, key, cand_name, with_label=False)

        order = np.arange(len(support))
        time = self.schema.time
        if time and time in support.columns and len(support):
            t = support[time]
            if pd.api.types.is_datetime64_any_dtype(t):
                t = t.astype("int64")
            t = pd.to_numeric(t, errors="coerce")
            if t.isna().any():
                r = _first(t.isna().to_numpy())
                raise ServeError(
                    f"{_where(sup_name, support, key, r)}, column {time!r}: time {_show(support[time].iloc[r])} "
                    "is missing or not numeric (drop the column to keep the file's order)"
                )
            order = np.argsort(t.to_numpy(), kind="stable")
        sup_keys = support[key].astype(str).to_numpy()
        cand_keys = candidates[key].astype(str).to_numpy()
        sup_groups: dict[str, list[int]] = {}
        for i in order:
            sup_groups.setdefault(sup_keys[i], []).append(int(i))
        cand_groups: dict[str, list[int]] = {}
        for i, k in enumerate(cand_keys):
            cand_groups.setdefault(k, []).append(i)
        orphans = [k for k in sup_groups if k not in cand_groups]
        if orphans:
            log.warning(
                "%s: %d user(s) have no candidates and are skipped: %s", sup_name, len(orphans), orphans[:5]
            )

        # "known" = the user id has its own trained row; meaningless for a hashed id (always a bucket)
        task_key_col = next(
            (
                j
                for j, f in enumerate(self.schema.sparse)
                if f.name == self.schema.task_key and f.hash_buckets == 0
            ),
            None,
        )
        tasks = []
        for k, cand_rows in cand_groups.items():
            sup_rows = np.asarray(sup_groups.get(k, []), dtype=np.int64)
            q = np.asarray(cand_rows, dtype=np.int64)
            arrays: dict[str, np.ndarray] = {}
            for which, enc, rows in (("support", sup_enc, sup_rows), ("query", cand_enc, q)):
                arrays[f"{which}.sparse"] = enc.sparse[rows]
                arrays[f"{which}.multi_hot"] = enc.multi_hot[rows]
                arrays[f"{which}.dense"] = enc.dense[rows]
                arrays[f"{which}.label"] = enc.label[rows]
            known = None if task_key_col is None else bool((cand_enc.sparse[q, task_key_col] != OOV_ID).all())
            state = "warm" if known else "user_cold"
            tasks.append(
                UserTask(
                    key=k,
                    record=TaskRecord(task_id=k, state=state, arrays=arrays),
                    candidate_rows=q,
                    support_size=len(sup_rows),
                    user_known=known,
                )
            )
        return tasks

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_batch(self, batch: TaskBatch, plain: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, Q) probabilities after adaptation and, if ``plain``, at the shared (meta-learned) weights.

        Exactly the evaluation path: one ``embedding.lookup`` then ``predict`` per mode.
        """
        m = self.module
        batch = batch.to(self.device)
        lookup = m.embedding.lookup(batch)
        params = m.dense_params()
        adapted = predict(m.dlrm, params, lookup.rows, lookup, batch, m.meta_config, adapted=True)
        shared = (
            predict(m.dlrm, params, lookup.rows, lookup, batch, m.meta_config, adapted=False)
            if plain
            else None
        )
        return torch.sigmoid(adapted).cpu(), (torch.sigmoid(shared).cpu() if shared is not None else None)

    def score_tasks(
        self, tasks: Sequence[UserTask], plain: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per task, (adapted probabilities, plain probabilities) of its candidates, in input order.

        Tasks run in batches of ``batch_users`` (padded to the longest support / candidate list). A
        task with an empty support set gets its plain score as the adapted score.
        """
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for start in range(0, len(tasks), self.batch_users):
            chunk = tasks[start : start + self.batch_users]
            need_plain = plain or any(t.support_size == 0 for t in chunk)
            adapted, shared = self.score_batch(collate_tasks([t.record for t in chunk]), plain=need_plain)
            for i, t in enumerate(chunk):
                nq = len(t.candidate_rows)
                a = adapted[i, :nq].double().numpy()
                s = shared[i, :nq].double().numpy() if shared is not None else None
                if t.support_size == 0:
                    a = s.copy()
                out.append((a, s if plain else None))
        return out

    def score(
        self,
        support: pd.DataFrame,
        candidates: pd.DataFrame,
        key: str | None = None,
        plain: bool = True,
        item_column: str | None = None,
        names: tuple[str, str] = ("support", "candidates"),
    ) -> pd.DataFrame:
        """Adapt to every user in ``candidates`` on their ``support`` rows and score their candidates.

        Args:
            support: labelled interactions (the schema's feature columns, label, optionally time).
            candidates: rows to score, every feature column filled (``fill_candidate_features``).
            key: column grouping rows into users; default the schema's task key.
            plain: also return ``score_plain`` (no adaptation), for comparison.
            item_column: candidates' column copied into the output (default: the training item key).
            names: how to call the two tables in error messages (e.g. their file names).

        Returns:
            One row per candidate, in the candidates' input order: the key, the item column (if any),
            ``score`` (probability after adaptation), ``score_plain``, ``rank`` (1 = best, per user),
            ``support_size``, ``adapted`` (False when the user had no support rows: plain score),
            ``user_known`` (the user id has a trained embedding; None if the task key is not an unhashed sparse field).
        """
        key = key or self.schema.task_key
        candidates = candidates.reset_index(drop=True)
        tasks = self.build_tasks(support, candidates, key=key, names=names)
        scores = self.score_tasks(tasks, plain=plain)
        n = len(candidates)
        result: dict[str, np.ndarray] = {
            "score": np.full(n, np.nan),
            "score_plain": np.full(n, np.nan),
            "support_size": np.zeros(n, np.int64),
            "adapted": np.zeros(n, bool),
            "user_known": np.full(n, None, dtype=object),
        }
        for t, (a, s) in zip(tasks, scores, strict=True):
            rows = t.candidate_rows
            result["score"][rows] = a
            if s is not None:
                result["score_plain"][rows] = s
            result["support_size"][rows] = t.support_size
            result["adapted"][rows] = t.support_size > 0
            result["user_known"][rows] = t.user_known
        empty = [t.key for t in tasks if t.support_size == 0]
        if empty:
            log.warning(
                "%d user(s) have no support rows: their score is the un-adapted one (adapted=False): %s",
                len(empty),
                empty[:5],
            )
        item_column = item_column or self.encoding.item_key
        out = pd.DataFrame({key: candidates[key].astype(str)})
        if item_column and item_column in candidates.columns and item_column != key:
            out[item_column] = candidates[item_column].astype(str)
        out["score"] = result["score"]
        if plain:
            out["score_plain"] = result["score_plain"]
        out["rank"] = (
            out.groupby(key, sort=False)["score"].rank(ascending=False, method="first").astype(np.int64)
        )
        out["support_size"] = result["support_size"]
        out["adapted"] = result["adapted"]
        out["user_known"] = result["user_known"]
        return out
