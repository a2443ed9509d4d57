"""Reading a user's raw rows for serving: interaction files, column checks, candidate completion.

``read_table`` reads CSV / TSV / Parquet / JSON / JSON Lines with id columns as strings (as the
build's sources do). Candidate rows are scored by the same model as training rows, so they need
every feature column of the schema; ``fill_candidate_features`` completes them: item columns joined
from an item table (keyed by the item column), user columns copied from the user's support rows
(each must hold one value per user there). Errors name the file (or table), row, user and column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gmeta.data.schema import Schema
from gmeta.serving import ServeError


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


def row_where(name: str, df: pd.DataFrame, key: str, row: int) -> str:
    """``<name>: row <row> (<key>=<value>)`` for messages."""
    value = df[key].iloc[row] if key in df.columns else "?"
    return f"{name}: row {row} ({key}={value!r})"


def first_true(mask: np.ndarray) -> int:
    """Position of the first True in ``mask``."""
    return int(np.asarray(mask).nonzero()[0][0])


def check_columns(df: pd.DataFrame, needed: Sequence[str], name: str, hint: str = "") -> None:
    """``ServeError`` naming ``name`` and the missing columns unless ``df`` holds all of ``needed``."""
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
        check_columns(items, [item_key], items_name)
        check_columns(out, [item_key], cand_name)
        cols = [c for c in items.columns if c != item_key and c not in out.columns]
        table = items.assign(**{item_key: items[item_key].astype(str)})
        dup = table[item_key].duplicated()
        if dup.any():
            r = first_true(dup.to_numpy())
            raise ServeError(f"{items_name}: row {r}: item {table[item_key].iloc[r]!r} appears twice")
        table = table.set_index(item_key)[cols]
        keys = out[item_key].astype(str)
        unknown = ~keys.isin(table.index)
        if unknown.any():
            r = first_true(unknown.to_numpy())
            raise ServeError(
                f"{row_where(cand_name, out, key, r)}: item {keys.iloc[r]!r} is not in the item table {items_name}"
            )
        joined = table.loc[keys.to_numpy()].reset_index(drop=True)
        for c in cols:
            out[c] = joined[c].to_numpy()
    if user_columns:
        check_columns(support, [key, *user_columns], sup_name)
        check_columns(out, [key], cand_name)
        sup_keys = support[key].astype(str)
        for c in user_columns:
            per_user = support[c].groupby(sup_keys.to_numpy(), sort=False)
            n_values = per_user.nunique(dropna=False)
            if (n_values > 1).any():
                user = str(n_values.index[first_true((n_values > 1).to_numpy())])
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
                r = first_true(filled.isna().to_numpy())
                raise ServeError(
                    f"{row_where(cand_name, out, key, r)}: column {c!r}: no value, and the user has no support "
                    f"rows in {sup_name} to copy it from"
                )
            out[c] = filled.to_numpy()
    return out
