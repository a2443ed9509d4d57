"""Stage 1 of the out-of-core build on DuckDB: relational passes from raw rows to encoded task rows.

Every step of ``gmeta.data.tasks.build_tasks`` becomes an aggregate, window or join over a DuckDB
relation (the engine runs in-process, needs no server, and spills to a temporary folder beyond its
memory limit):

* first interaction per task key -> new-user threshold (``np.quantile`` of the per-key minima, as
  the reference computes it); first appearance per item for the ``quantile`` item rule;
* task keys in sorted string order (``code``) and their val/test side (the reference's seeded
  blake2b hash, computed once per key);
* one window pass: position of every row in its (key, state) task by (time, input row) and the
  task's size;
* vocabularies from the training rows only (warm tasks within the size range, minus the held-out
  warm-evaluation queries), in sorted string order; sparse ids by a join with the vocabulary (the
  encoder's lookup rule in SQL: position + 1, unseen -> 0); hashed fields and multi-hot lists by
  ``gmeta.data.encoder``'s functions, once per distinct raw value;
* the encoded rows of every kept task, written as Parquet, partitioned by ``code % partitions``.

Errors name the row (0-based input position), the task and the column, with the reference's words.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from gmeta.data.build.plan import PlanResult, plan_columns, policy_conditions
from gmeta.data.encoder import (
    FeatureEncoder,
    bucket_ids,
    fit_vocabulary,
    parse_tokens,
    resolved_label_threshold,
    token_ids,
    vocab_index,
)
from gmeta.data.hashing import stable_hash
from gmeta.data.schema import OOV_ID, FieldSpec, Schema, SchemaError
from gmeta.data.tasks import SPLITS, TaskConfig, auto_threshold_error, check_label_balance, filter_rules

log = logging.getLogger(__name__)

#: the input position of a row (0-based), added by the engine; no user column may use this name
ROW = "_gmeta_row"


def q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


class DuckDBPlanner:
    """Runs the relational passes on one DuckDB connection whose view ``src`` holds the raw rows.

    ``src`` has the columns of ``Source.load()`` (ids as strings, multi-hot as separator-joined
    strings, label and dense numeric, time numeric) plus ``ROW``, the 0-based input position.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, schema: Schema, cfg: TaskConfig) -> None:
        self.con, self.schema, self.cfg = con, schema, cfg
        self.key = cfg.task_key or schema.task_key

    # -- helpers ---------------------------------------------------------------------------
    def _one(self, sql: str) -> tuple[Any, ...]:
        """The first row of ``sql``: an aggregate, or a lookup of a row known to exist."""
        rows = self.con.execute(sql).fetchall()  # fetch everything: DuckDB 2 refuses work on an open result
        assert rows, f"no row from {sql}"
        return rows[0]

    def _arrow(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def _where(self, rn: int) -> str:
        rows = self.con.execute(
            f"SELECT CAST({q(self.key)} AS VARCHAR) FROM src WHERE {ROW} = {rn}"
        ).fetchall()
        return f"row {rn} (task {self.key}={rows[0][0] if rows else None!r})"

    def _first_row(self, condition: str, table: str = "src") -> int | None:
        row = self._one(f"SELECT min({ROW}) FROM {table} WHERE {condition}")  # NULL when no row matches
        return None if row[0] is None else int(row[0])

    # -- checks (same order and words as the reference) ------------------------------------
    def check_inputs(self) -> None:
        s, key = self.schema, self.key
        columns = {r[0] for r in self.con.execute("DESCRIBE src").fetchall()}
        needed = list(dict.fromkeys([key, *s.required_columns()]))
        missing = [c for c in needed if c not in columns]
        if missing:
            raise SchemaError(
                f"interaction table lacks column(s) {missing} required by the schema/task config"
            )
        if (self.cfg.new_user_quantile is not None or self.cfg.query_selection == "last") and s.time is None:
            log.warning("schema has no time column: using row order as time")
        if not self.con.execute("SELECT 1 FROM src LIMIT 1").fetchall():
            raise SchemaError("the interaction table has no rows")
        r = self._first_row(f"{q(key)} IS NULL")
        if r is not None:
            raise SchemaError(f"task key {key!r}: missing value (NaN) at row {r}")
        if s.time:
            r = self._first_row(f"{q(s.time)} IS NULL OR isnan(CAST({q(s.time)} AS DOUBLE))")
            if r is not None:
                raise SchemaError(f"time column {s.time!r}: missing value at {self._where(r)}")
        label = f"TRY_CAST({q(s.label)} AS DOUBLE)"
        r = self._first_row(f"{label} IS NULL OR isnan({label})")
        if r is not None:
            raise SchemaError(f"label {s.label!r}: NaN or non-numeric value at {self._where(r)}")
        if self.cfg.label_threshold is None or self.cfg.label_threshold == "auto":
            r = self._first_row(f"{label} NOT IN (0.0, 1.0)")
            if r is not None:
                value = self._one(f"SELECT {label} FROM src WHERE {ROW} = {r}")[0]
                if self.cfg.label_threshold == "auto":
                    raise auto_threshold_error(s.label, value, self._where(r))
                raise SchemaError(
                    f"label {s.label!r}: {value} at {self._where(r)} is not 0/1 and label_threshold is None"
                )

    def duplicates(self) -> dict[str, Any]:
        """The reference's duplicate report: rows equal to an earlier row in every column the build reads.

        A hash per row finds the candidates in one cheap aggregate; rows sharing a hash are then
        compared column by column (a hash collision is never counted as a duplicate).
        """
        cols = ", ".join(q(c) for c in dict.fromkeys([self.key, *self.schema.required_columns()]))
        self.con.execute(
            f"CREATE TEMP TABLE dup_candidates AS SELECT * FROM src WHERE hash({cols}) IN "
            f"(SELECT h FROM (SELECT hash({cols}) AS h FROM src) GROUP BY h HAVING count(*) > 1)"
        )
        # NULLs compare equal in PARTITION BY, as in the reference's groupby(dropna=False)
        rows, r, first = self._one(
            f"SELECT count(*), min({ROW}), arg_min(first, {ROW}) FROM (SELECT {ROW}, "
            f"min({ROW}) OVER (PARTITION BY {cols}) AS first FROM dup_candidates) WHERE {ROW} > first"
        )
        self.con.execute("DROP TABLE dup_candidates")
        if not rows:
            return {"rows": 0, "example": None}
        task = self._one(f"SELECT CAST({q(self.key)} AS VARCHAR) FROM src WHERE {ROW} = {r}")[0]
        return {"rows": int(rows), "example": {"row": int(r), "same_as_row": int(first), "task": task}}

    def _check_fields(self) -> None:
        """The reference's encoding checks, over every row (filtered tasks included)."""
        for f in self.schema.sparse:
            r = self._first_row(f"{q(f.name)} IS NULL")
            if r is not None:
                raise SchemaError(f"sparse field {f.name!r}: missing id (NaN) at {self._where(r)}")
        dense = [f.name for f in self.schema.dense]
        bad = [
            f"(CAST({q(name)} AS FLOAT) IS NULL OR NOT isfinite(CAST({q(name)} AS FLOAT)))" for name in dense
        ]
        r = self._first_row(" OR ".join(bad)) if bad else None
        if r is not None:  # the first bad row, then its first bad column (the reference's row-major order)
            values = self._one(
                f"SELECT {', '.join(f'CAST({q(n)} AS FLOAT)' for n in dense)} FROM src WHERE {ROW} = {r}"
            )
            row = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            c = int(np.flatnonzero(~np.isfinite(row))[0])
            raise SchemaError(f"dense field {dense[c]!r}: non-finite value {row[c]} at {self._where(r)}")

    # -- cold-start states -----------------------------------------------------------------
    def _time(self) -> str:
        return q(self.schema.time) if self.schema.time else ROW

    def _quantile_flags(self, column: str, quantile: float, name: str) -> float:
        """Table ``name`` (value VARCHAR, new BOOLEAN): first time per value after the quantile."""
        firsts = self._arrow(
            f"SELECT CAST({column} AS VARCHAR) AS value, min({self._time()}) AS first FROM src GROUP BY 1"
        )
        first = firsts.column("first").to_numpy()
        threshold = float(np.quantile(first.astype(np.float64), quantile))
        flags = pa.table({"value": firsts.column("value"), "new": pa.array(first > threshold)})
        self.con.register(f"{name}_arrow", flags)
        self.con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
        self.con.unregister(f"{name}_arrow")
        return threshold

    def _keys(self) -> tuple[float | None, int]:
        """Table ``keys`` (k, code, new_user, is_val); returns (new-user threshold, number of keys)."""
        cfg, key = self.cfg, self.key
        if cfg.new_user_quantile is not None:
            threshold = self._quantile_flags(q(key), cfg.new_user_quantile, "user_flags")
        else:
            threshold = None
            self.con.execute(
                f"CREATE TEMP TABLE user_flags AS SELECT DISTINCT CAST({q(key)} AS VARCHAR) AS value, "
                "false AS new FROM src"
            )
        # sorted string order = the reference's pd.factorize(sort=True) (binary collation = code points)
        keys = self._arrow("SELECT value, new FROM user_flags ORDER BY value")
        values = keys.column("value").to_pylist()
        is_val = np.fromiter(
            (stable_hash(f"{cfg.split_seed}:{v}") / 2**64 < cfg.val_fraction for v in values),
            dtype=bool,
            count=len(values),
        )
        table = pa.table(
            {
                "k": keys.column("value"),
                "code": pa.array(np.arange(len(values), dtype=np.int64)),
                "new_user": keys.column("new"),
                "is_val": pa.array(is_val),
            }
        )
        self.con.register("keys_arrow", table)
        self.con.execute("CREATE TEMP TABLE keys AS SELECT * FROM keys_arrow")
        self.con.unregister("keys_arrow")
        return threshold, len(values)

    def _new_item(self) -> tuple[str, str, float | None]:
        """(SQL join clause, SQL boolean expression, threshold) of the new-item rule."""
        rule = self.cfg.new_item_rule
        columns = {r[0] for r in self.con.execute("DESCRIBE src").fetchall()}
        if rule is None:
            return "", "false", None
        if "quantile" in rule:
            col = rule.get("column", self.cfg.item_key)
            if col is None or col not in columns:
                raise SchemaError(f"new_item_rule: item column {col!r} is not in the interaction table")
            threshold = self._quantile_flags(q(col), float(rule["quantile"]), "item_flags")
            join = f"JOIN item_flags ON item_flags.value = CAST(src.{q(col)} AS VARCHAR)"
            return join, "item_flags.new", threshold
        col = rule["column"]
        if col not in columns:
            raise SchemaError(f"new_item_rule: column {col!r} is not in the interaction table")
        r = self._first_row(f"TRY_CAST({q(col)} AS DOUBLE) IS NULL")
        if r is not None:
            value = self._one(f"SELECT {q(col)} FROM src WHERE {ROW} = {r}")[0]
            raise SchemaError(f"new_item_rule: column {col!r} is not numeric at {self._where(r)}: {value!r}")
        return (
            "",
            f"(TRY_CAST(src.{q(col)} AS DOUBLE) >= {float(rule['min_value'])!r})",
            float(rule["min_value"]),
        )

    # -- vocabularies ----------------------------------------------------------------------
    def _table_from_arrow(self, name: str, table: pa.Table) -> None:
        self.con.register(f"{name}_arrow", table)
        self.con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
        self.con.unregister(f"{name}_arrow")

    def _sparse_ids(self, i: int, f: FieldSpec, train: str, kept: str) -> tuple[int, list[str]]:
        """Table ``ids_<i>`` (v, id) for sparse field ``f``; returns (vocab size, vocabulary)."""
        col = q(f"f{i}")
        if f.hash_buckets > 0:
            values = self._arrow(f"SELECT DISTINCT {col} AS v FROM rows WHERE {kept}").column("v")
            ids = bucket_ids(f, values.to_pylist())
            self._table_from_arrow(f"ids_{i}", pa.table({"v": values, "id": pa.array(ids)}))
            return f.hash_buckets + 1, []
        self.con.execute(
            f"CREATE TEMP TABLE ids_{i} AS SELECT v, row_number() OVER (ORDER BY v) AS id "
            f"FROM (SELECT DISTINCT {col} AS v FROM rows WHERE {train})"
        )
        vocab = self._arrow(f"SELECT v FROM ids_{i} ORDER BY id").column("v").to_pylist()
        return len(vocab) + 1, vocab

    def _multi_hot_ids(self, i: int, f: FieldSpec, width: int, train: str) -> tuple[int, list[str]]:
        """Table ``mh_<i>`` (v, c0..c{width-1}): the encoded list of every distinct raw value."""
        col = q(f"m{i}")
        # every distinct raw value (max_len is checked on every row, as the reference does) and
        # whether a training row holds it (its tokens then enter the vocabulary)
        distinct = self._arrow(f"SELECT {col} AS v, bool_or({train}) AS t FROM rows GROUP BY 1")
        raw, in_train = distinct.column("v").to_pylist(), distinct.column("t").to_pylist()
        lists = [parse_tokens(v, f.separator) for v in raw]
        too_long = [v for v, toks in zip(raw, lists, strict=True) if len(toks) > f.max_len]
        if too_long:  # name the first row holding a too long list
            r = self._first_row(f"{col} IN ({', '.join(lit(v) for v in too_long)})", table="rows")
            assert r is not None  # too_long holds values of rows
            n = len(parse_tokens(self._one(f"SELECT {col} FROM rows WHERE {ROW} = {r}")[0], f.separator))
            raise SchemaError(
                f"multi_hot field {f.name!r}: {self._where(r)} has {n} ids, more than max_len={f.max_len}"
            )
        if f.hash_buckets > 0:
            vocab: list[str] = []
            size, index = f.hash_buckets + 1, None
        else:
            vocab = fit_vocabulary(t for toks, tr in zip(lists, in_train, strict=True) if tr for t in toks)
            size, index = len(vocab) + 1, vocab_index(vocab)
        table = token_ids(f, lists, index, width)
        self._table_from_arrow(
            f"mh_{i}",
            pa.table({"v": pa.array(raw, pa.string()), **{f"c{j}": table[:, j] for j in range(width)}}),
        )
        return size, vocab

    # -- the whole plan --------------------------------------------------------------------
    def run(self, out_dir: Path, partitions: int) -> PlanResult:
        s, cfg, key = self.schema, self.cfg, self.key
        self.check_inputs()
        n_rows = int(self._one("SELECT count(*) FROM src")[0])
        user_threshold, n_keys = self._keys()
        item_join, new_item, item_threshold = self._new_item()
        duplicates = self.duplicates()
        label = f"CAST({q(s.label)} AS DOUBLE)"
        threshold = resolved_label_threshold(cfg.label_threshold)
        label_value = (
            f"CAST({label} >= {threshold!r} AS FLOAT)" if threshold is not None else f"CAST({label} AS FLOAT)"
        )
        select = [
            f"src.{ROW} AS {ROW}",
            "keys.code AS code",
            "keys.k AS k",
            "keys.is_val AS is_val",
            f"(CAST(keys.new_user AS INTEGER) + 2 * CAST({new_item} AS INTEGER)) AS state",
            f"src.{self._time()} AS t",
            f"{label_value} AS label",
        ]
        select += [f"CAST(src.{q(f.name)} AS VARCHAR) AS {q(f'f{i}')}" for i, f in enumerate(s.sparse)]
        select += [
            f"COALESCE(CAST(src.{q(f.name)} AS VARCHAR), '') AS {q(f'm{i}')}"
            for i, f in enumerate(s.multi_hot)
        ]
        select += [f"CAST(src.{q(f.name)} AS FLOAT) AS {q(f'd{i}')}" for i, f in enumerate(s.dense)]
        lo, hi, qs = cfg.min_interactions, cfg.max_interactions, cfg.query_size
        # one window pass: each row's position in its (key, state) history by (time, input row)
        # (pos_all) and the history's size (n_all); then its task: the whole history (win = -1), or
        # under max_interactions_policy=window (train_window: warm histories only), for a history
        # longer than hi, window win of hi rows counted back from the latest (tasks.window_bounds:
        # the oldest window, 0, holds the remainder). pos / n: the row's position in its task and
        # the task's size.
        windowed, holds_out = policy_conditions(cfg)
        offset = f"((n_all + {hi} - 1) // {hi}) * {hi} - n_all"  # rows the oldest window lacks
        self.con.execute(
            "CREATE TEMP TABLE rows AS SELECT * EXCLUDE (w_start, w_end), pos_all - w_start AS pos, "
            "w_end - w_start AS n FROM (SELECT *, "
            f"CASE WHEN win >= 0 THEN greatest(0, win * {hi} - ({offset})) ELSE 0 END AS w_start, "
            f"CASE WHEN win >= 0 THEN (win + 1) * {hi} - ({offset}) ELSE n_all END AS w_end "
            f"FROM (SELECT *, CASE WHEN {windowed} THEN (pos_all + {offset}) // {hi} ELSE -1 END AS win "
            "FROM (SELECT *, "
            f"row_number() OVER (PARTITION BY code, state ORDER BY t, {ROW}) - 1 AS pos_all, "
            "count(*) OVER (PARTITION BY code, state) AS n_all "
            f"FROM (SELECT {', '.join(select)} FROM src JOIN keys ON keys.k = CAST(src.{q(key)} AS VARCHAR) "
            f"{item_join}))))"
        )
        self._check_fields()
        kept = f"n BETWEEN {lo} AND {hi}"
        held = f"(state = 0 AND {holds_out} AND n - {qs} >= {lo} AND pos >= n - {qs})"
        train = f"state = 0 AND {kept} AND NOT {held}"

        reasons = {  # tasks.FILTER_REASONS
            "too_few_interactions": f"n_all < {lo}",
            "too_many_interactions": f"n_all > {hi} AND win < 0",
            "window_remainder": f"win >= 0 AND n < {lo}",
        }
        got = self._one(  # one pass: (tasks, rows) per reason
            "SELECT "
            + ", ".join(
                f"count(*) FILTER (WHERE pos = 0 AND {cond}), count(*) FILTER (WHERE {cond})"
                for cond in reasons.values()
            )
            + " FROM rows"
        )
        filtered = {
            reason: {"tasks": int(got[2 * k]), "interactions": int(got[2 * k + 1])}
            for k, reason in enumerate(reasons)
        }

        # labels per split: train rows, and the whole task of every evaluation task (val / test)
        evaluated = f"{kept} AND (state <> 0 OR ({holds_out} AND n - {qs} >= {lo}))"
        where = {"train": train, "val": f"{evaluated} AND is_val", "test": f"{evaluated} AND NOT is_val"}
        got = self._one(  # one pass: (rows, positives) per split
            "SELECT "
            + ", ".join(
                f"count(*) FILTER (WHERE {where[split]}), sum(label) FILTER (WHERE {where[split]})"
                for split in SPLITS
            )
            + " FROM rows"
        )
        label_counts = {}
        for k, split in enumerate(SPLITS):
            rows, positive = int(got[2 * k]), int(got[2 * k + 1] or 0)
            label_counts[split] = {"positive": positive, "negative": rows - positive}
        check_label_balance(label_counts, threshold, s.label)

        sizes: dict[str, int] = {}
        vocabs: dict[str, list[str]] = {}
        joins, encoded = [], []
        for i, f in enumerate(s.sparse):
            sizes[f.name], vocabs[f.name] = self._sparse_ids(i, f, train, kept)
            joins.append(f"LEFT JOIN ids_{i} ON ids_{i}.v = rows.{q(f'f{i}')}")
            encoded.append(f"COALESCE(ids_{i}.id, {OOV_ID}) AS {q(f's{i}')}")
        width = s.max_multi_hot_len
        for i, f in enumerate(s.multi_hot):
            sizes[f.name], vocabs[f.name] = self._multi_hot_ids(i, f, width, train)
            joins.append(f"JOIN mh_{i} ON mh_{i}.v = rows.{q(f'm{i}')}")
            encoded += [f"mh_{i}.c{j} AS {q(f'm{i}_{j}')}" for j in range(width)]
        encoded += [f"rows.{q(f'd{i}')}" for i in range(len(s.dense))]
        parts = max(1, int(partitions))
        out_dir.mkdir(parents=True, exist_ok=True)
        self.con.execute(
            f"COPY (SELECT rows.code % {parts} AS part, rows.code, rows.k, rows.state, rows.win, rows.pos, rows.is_val, "
            f"rows.label, {', '.join(encoded)} FROM rows {' '.join(joins)} WHERE {kept}) "
            f"TO {lit(str(out_dir))} (FORMAT parquet, PARTITION_BY (part), OVERWRITE_OR_IGNORE)"
        )
        positives = self._one("SELECT sum(label) FROM rows")[0] or 0.0
        stats: dict[str, Any] = {
            "interactions": n_rows,
            "task_keys": n_keys,
            "filtered": filtered,
            "new_user_first_time_threshold": user_threshold,
            "new_item_threshold": item_threshold,
            "positive_rate": float(positives) / n_rows if n_rows else 0.0,
            "vocab_sizes": {f.name: sizes[f.name] for f in s.id_fields},
            "label_threshold": threshold,
            "label_counts": label_counts,
            "duplicates": duplicates,
            "filter_rules": filter_rules(cfg),
        }
        return PlanResult(
            parts_dir=out_dir,
            partitions=parts,
            encoder=FeatureEncoder(s.with_vocab_sizes(sizes), vocabs, threshold, cfg.item_key, "build"),
            stats=stats,
            columns=plan_columns(s),
        )
