"""Turn an interaction table into meta-learning tasks: cold-start states, support/query, splits, ids.

A task is one value of the task key (a user by default) in one cold-start state (MeLU / MAMO):

* a *new user* first interacts after the ``new_user_quantile`` of all users' first-interaction times;
* a *new item* satisfies ``new_item_rule``: ``{column, min_value}`` (e.g. ML-1M ``release_year >= 1998``)
  or ``{quantile}`` (the item's first appearance is after that quantile of items' first appearances);
* a user's interactions are partitioned into warm / user_cold / item_cold / user_item_cold, one task
  per (user, state) whose interaction count lies in [min_interactions, max_interactions].

Long histories (more than ``max_interactions``) follow ``max_interactions_policy``:

* ``drop`` (the MeLU protocol): the whole (user, state) history is dropped;
* ``window``: the history, in time order, is cut into consecutive windows of ``max_interactions``
  interactions counted back from the latest one, so every window is full except the oldest (the
  remainder, 1..max_interactions long). Each window is one task with the history's cold-start state
  (states are the key's and the interaction's, never the window's), its own support/query cut and
  warm-evaluation hold-out exactly as a whole task; a remainder shorter than ``min_interactions`` is
  dropped (reason ``window_remainder``). Task ids: ``<key>/<state>`` for a whole history,
  ``<key>/<state>/w<i>`` for window ``i`` (0 = the oldest, the remainder) of a long one; windows of
  one key all go to the same evaluation split. See ``window_bounds`` / ``task_id``.
* ``train_window``: long *warm* histories are cut into windows as under ``window``, and every window
  goes to train whole (no warm-evaluation hold-out); long cold histories are dropped as under
  ``drop``. So the evaluation tasks are exactly the MeLU protocol's (``drop``), and training also
  learns the heavy users it drops (on MovieLens-1M, 70% of the ratings): their ids, known at
  evaluation in item_cold tasks, get trained rows instead of the OOV row.

Labels: ``label = raw >= label_threshold``; ``auto`` means 0.5 and requires 0/1 labels (any other
value is an error asking for a threshold); ``None`` keeps raw 0/1 labels. A split whose tasks hold
no positive or no negative label is an error naming the threshold and the counts.

Every dropped row is counted by reason (``FILTER_REASONS``) and reported with its share of the
input in the build log (``format_stats``); exact duplicate rows are counted and reported, not
dropped.

Splits: train holds warm tasks only. A warm task with n interactions (time-ordered) and
``n - query_size >= min_interactions`` also yields a *warm evaluation* task: its last
``query_size`` interactions are the query, the preceding ones the support, and only those preceding
ones go to train (so an evaluation support set re-uses training interactions by design, exactly as a
returning user's history would). Cold tasks and warm-evaluation tasks go to val or test by a seeded
hash of the task key value, so one user's evaluation tasks never straddle val and test.

Encoding: a ``FeatureEncoder`` (``gmeta.data.encoder``, the rules shared with serving) fitted on the
train split only (sorted values -> 1..V-1); values never seen in training map to the OOV row 0, or
to a stable hash bucket 1..B if the field is hashed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from gmeta.data.batch import TaskRecord
from gmeta.data.encoder import (
    BAD_DENSE,
    BAD_LABEL,
    MISSING_ID,
    TOO_MANY_IDS,
    EncodingError,
    FeatureEncoder,
    encode_labels,
    resolved_label_threshold,
)
from gmeta.data.hashing import stable_hash
from gmeta.data.schema import STATES, Schema, SchemaError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: why rows are dropped: a (key, state) history shorter than min_interactions; a longer one than
#: max_interactions under ``drop`` (or a cold one under ``train_window``); the oldest window of a long
#: history under ``window`` / ``train_window`` when it is shorter than min_interactions
FILTER_REASONS: tuple[str, ...] = ("too_few_interactions", "too_many_interactions", "window_remainder")
MAX_INTERACTIONS_POLICIES: tuple[str, ...] = ("drop", "window", "train_window")


def auto_threshold_error(label: str, value: float, where: str) -> SchemaError:
    """``label_threshold: auto`` met a label that is not 0/1 (both engines raise this)."""
    return SchemaError(
        f"label {label!r}: {value} at {where} is not 0/1, so label_threshold 'auto' cannot apply; set "
        "data.task_config.label_threshold to a number (label = raw label >= threshold, e.g. 4.0 for "
        "1..5 ratings)"
    )


def check_label_balance(label_counts: dict[str, dict[str, int]], threshold: float | None, label: str) -> None:
    """Every split with tasks must hold both classes (``label_counts[split] = {positive, negative}``)."""
    for split in SPLITS:
        pos, neg = label_counts[split]["positive"], label_counts[split]["negative"]
        if pos + neg and not (pos and neg):
            rule = (
                "raw 0/1 labels (label_threshold null)"
                if threshold is None
                else f"label_threshold={threshold}"
            )
            summary = ", ".join(
                f"{s} {label_counts[s]['positive']}/{label_counts[s]['negative']}" for s in SPLITS
            )
            raise SchemaError(
                f"split {split!r} has {pos} positive and {neg} negative labels after {rule} on column "
                f"{label!r} (positive/negative per split: {summary}): nothing to learn or evaluate. "
                "Check the label column and data.task_config.label_threshold "
                "(label = raw label >= threshold; 'auto' for 0/1 labels)"
            )


def window_bounds(n: int, max_interactions: int) -> list[tuple[int, int]]:
    """(start, end) positions of the windows of a time-ordered history of ``n > max_interactions``
    interactions: windows of ``max_interactions`` counted back from the latest interaction, so only
    the oldest (window 0) may be shorter. Same as the SQL of the relational engines."""
    m = max_interactions
    count = -(-n // m)
    offset = count * m - n  # the oldest window lacks this many interactions
    return [(max(0, w * m - offset), (w + 1) * m - offset) for w in range(count)]


def task_id(value: str, state: str, window: int = -1) -> str:
    """``<key>/<state>`` for a whole history (``window`` -1), ``<key>/<state>/w<window>`` for a window."""
    return f"{value}/{state}" if window < 0 else f"{value}/{state}/w{window}"


def filter_rules(cfg: TaskConfig) -> dict[str, str]:
    """Each drop reason in words, with the config values (printed in the build log)."""
    return {
        "too_few_interactions": f"(key, state) history shorter than min_interactions={cfg.min_interactions}",
        "too_many_interactions": (
            f"history longer than max_interactions={cfg.max_interactions} "
            f"(max_interactions_policy={cfg.max_interactions_policy}"
            + (", cold states" if cfg.max_interactions_policy == "train_window" else "")
            + ")"
        ),
        "window_remainder": (
            f"oldest window of a history longer than max_interactions={cfg.max_interactions}, shorter than "
            f"min_interactions={cfg.min_interactions} (max_interactions_policy={cfg.max_interactions_policy})"
        ),
    }


@dataclass
class TaskConfig:
    """How interactions become tasks (see the module docstring).

    Attributes:
        label_threshold: label = (raw label >= threshold); ``"auto"``: 0.5, for 0/1 labels only (other
            labels are an error asking for a threshold); None keeps raw labels, which must be 0/1.
        min_interactions / max_interactions: keep a (user, state) task only within this range.
        max_interactions_policy: a longer history is dropped (``drop``), cut into windows of
            ``max_interactions`` (``window``), or cut into training-only windows if warm and dropped
            if cold (``train_window``); see the module docstring.
        query_size: query samples per task; the rest is the support set.
        query_selection: ``last`` (the latest ``query_size`` by time) or ``random`` (seeded).
        task_key: column grouping tasks; None uses the schema's task key.
        item_key: item column (used by the ``quantile`` item rule).
        new_user_quantile: first-interaction-time quantile after which a user is new; None: no user cold.
        new_item_rule: ``{column, min_value}`` or ``{quantile}`` (optionally ``column``); None: no item cold.
        warm_eval: hold out the last ``query_size`` interactions of long warm tasks for evaluation.
        split_seed: seed of the val/test hash split.
        val_fraction: share of evaluation task keys that go to val (the rest to test).
    """

    label_threshold: float | str | None = 4.0
    min_interactions: int = 13
    max_interactions: int = 100
    max_interactions_policy: Literal["drop", "window", "train_window"] = "drop"
    query_size: int = 10
    query_selection: Literal["last", "random"] = "last"
    task_key: str | None = None
    item_key: str | None = "item_id"
    new_user_quantile: float | None = 0.8
    new_item_rule: dict[str, Any] | None = field(
        default_factory=lambda: {"column": "release_year", "min_value": 1998}
    )
    warm_eval: bool = True
    split_seed: int = 0
    val_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.new_item_rule is not None:
            self.new_item_rule = dict(self.new_item_rule)  # Hydra passes a DictConfig
            rule = self.new_item_rule
            if not ({"column", "min_value"} <= set(rule) or "quantile" in rule):
                raise SchemaError(
                    f"TaskConfig.new_item_rule must be {{column, min_value}} or {{quantile}}, got {rule}"
                )
        if self.query_selection not in ("last", "random"):
            raise SchemaError(
                f"TaskConfig.query_selection must be 'last' or 'random', got {self.query_selection!r}"
            )
        if self.query_size < 1:
            raise SchemaError(f"TaskConfig.query_size must be >= 1, got {self.query_size}")
        if self.min_interactions <= self.query_size:
            raise SchemaError(
                f"TaskConfig.min_interactions ({self.min_interactions}) must exceed query_size ({self.query_size}) "
                "so that every task keeps a non-empty support set"
            )
        if self.max_interactions < self.min_interactions:
            raise SchemaError(
                f"TaskConfig.max_interactions ({self.max_interactions}) must be >= min_interactions "
                f"({self.min_interactions})"
            )
        if self.max_interactions_policy not in MAX_INTERACTIONS_POLICIES:
            raise SchemaError(
                f"TaskConfig.max_interactions_policy must be one of {MAX_INTERACTIONS_POLICIES}, "
                f"got {self.max_interactions_policy!r}"
            )
        t = self.label_threshold
        if isinstance(t, str) and t != "auto":
            raise SchemaError(
                f"TaskConfig.label_threshold must be a number, 'auto' (0/1 labels) or null (raw 0/1 labels), "
                f"got {t!r}"
            )
        if t is not None and not isinstance(t, str):
            self.label_threshold = float(t)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def windows(self, state: str) -> bool:
        """Whether a history of ``state`` longer than ``max_interactions`` is cut into windows
        (else it is dropped)."""
        policy = self.max_interactions_policy
        return policy == "window" or (policy == "train_window" and state == "warm")

    def holds_out(self, window: int) -> bool:
        """Whether a long-enough warm task (window ``window``; -1: a whole history) yields a warm
        evaluation task; under ``train_window`` windows are training data only."""
        return self.warm_eval and not (self.max_interactions_policy == "train_window" and window >= 0)


@dataclass
class TaskSplits:
    """Output of ``build_tasks``.

    Attributes:
        train / val / test: tasks of each split, in a deterministic order.
        encoder: the fitted encoder (schema with vocabulary sizes, vocabularies, label rule).
        stats: counts per split and state, filtered counts with reason, thresholds (see ``format_stats``).
        rows: split -> task_id -> (support rows, query rows) as positions in the input table.
    """

    train: list[TaskRecord]
    val: list[TaskRecord]
    test: list[TaskRecord]
    encoder: FeatureEncoder
    stats: dict[str, Any]
    rows: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

    @property
    def schema(self) -> Schema:
        """The input schema with vocabulary sizes set."""
        return self.encoder.schema

    @property
    def vocabs(self) -> dict[str, list[str]]:
        """Per non-hashed id field, the raw value of ids 1..V-1 (index i holds id i+1)."""
        return self.encoder.vocabs

    def split(self, name: str) -> list[TaskRecord]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


# -- cold-start states -------------------------------------------------------------------------
def _where(df: pd.DataFrame, key: str, row: int) -> str:
    return f"row {row} (task {key}={df[key].iloc[row]!r})"


def _new_users(keys: np.ndarray, time: np.ndarray, q: float | None) -> tuple[np.ndarray, float | None]:
    if q is None:
        return np.zeros(len(keys), dtype=bool), None
    first = pd.Series(time).groupby(keys).min()
    threshold = float(np.quantile(first.to_numpy(dtype=np.float64), q))
    return (first > threshold).reindex(keys).to_numpy(), threshold


def _new_items(
    df: pd.DataFrame, cfg: TaskConfig, time: np.ndarray, key: str
) -> tuple[np.ndarray, float | None]:
    rule = cfg.new_item_rule
    if rule is None:
        return np.zeros(len(df), dtype=bool), None
    if "quantile" in rule:
        col = rule.get("column", cfg.item_key)
        if col not in df.columns:
            raise SchemaError(f"new_item_rule: item column {col!r} is not in the interaction table")
        first = pd.Series(time).groupby(df[col].astype(str).to_numpy()).min()
        threshold = float(np.quantile(first.to_numpy(dtype=np.float64), float(rule["quantile"])))
        return (first > threshold).reindex(df[col].astype(str).to_numpy()).to_numpy(), threshold
    col = rule["column"]
    if col not in df.columns:
        raise SchemaError(f"new_item_rule: column {col!r} is not in the interaction table")
    values = pd.to_numeric(df[col], errors="coerce")
    if values.isna().any():
        r = int(values.isna().to_numpy().nonzero()[0][0])
        raise SchemaError(
            f"new_item_rule: column {col!r} is not numeric at {_where(df, key, r)}: {df[col].iloc[r]!r}"
        )
    return (values >= float(rule["min_value"])).to_numpy(), float(rule["min_value"])


# -- encoding (the rules are gmeta.data.encoder's; the words are the build's, shared by every engine)
def _encode(df: pd.DataFrame, encoder: FeatureEncoder, key: str) -> dict[str, np.ndarray]:
    """Every row's feature arrays (``sparse``, ``multi_hot``, ``dense``) by the fitted encoder."""
    try:
        rows = encoder.encode(df, key=key, name="interaction table", with_label=False)
    except EncodingError as e:
        where, f = _where(df, key, e.row), e.column
        if e.reason == MISSING_ID:
            raise SchemaError(f"sparse field {f!r}: missing id (NaN) at {where}") from None
        if e.reason == TOO_MANY_IDS:
            max_len = encoder.schema.field(f).max_len
            raise SchemaError(
                f"multi_hot field {f!r}: {where} has {e.count} ids, more than max_len={max_len}"
            ) from None
        if e.reason == BAD_DENSE:
            value = np.float32(pd.to_numeric(pd.Series([e.value]), errors="coerce").iloc[0])
            raise SchemaError(f"dense field {f!r}: non-finite value {value} at {where}") from None
        raise
    return {"sparse": rows.sparse, "multi_hot": rows.multi_hot, "dense": rows.dense}


# -- task construction -------------------------------------------------------------------------
def _labels(df: pd.DataFrame, schema: Schema, cfg: TaskConfig, key: str) -> tuple[np.ndarray, float | None]:
    """(0/1 labels, the threshold used: None for raw 0/1 labels)."""
    threshold = resolved_label_threshold(cfg.label_threshold)
    auto = cfg.label_threshold == "auto"  # 0.5 on labels that must be 0/1: the raw-label rule
    label = schema.label

    def fail(r: int, reason: str, what: str) -> SchemaError:
        where = _where(df, key, r)
        if reason == BAD_LABEL:
            return SchemaError(f"label {label!r}: NaN or non-numeric value at {where}")
        value = float(pd.to_numeric(pd.Series([df[label].iloc[r]])).iloc[0])
        if auto:
            return auto_threshold_error(label, value, where)
        return SchemaError(f"label {label!r}: {value} at {where} is not 0/1 and label_threshold is None")

    return encode_labels(df[label], None if auto else threshold, fail), threshold


def _duplicates(df: pd.DataFrame, columns: list[str], key: str) -> dict[str, Any]:
    """Rows equal to an earlier row in every column the build reads: count and the first example."""
    group = df.groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    repeat = pd.Series(group).duplicated().to_numpy()
    if not repeat.any():
        return {"rows": 0, "example": None}
    r = int(repeat.nonzero()[0][0])
    first = int((group == group[r]).nonzero()[0][0])
    return {
        "rows": int(repeat.sum()),
        "example": {"row": r, "same_as_row": first, "task": str(df[key].iloc[r])},
    }


def _split_query(rows: np.ndarray, cfg: TaskConfig, seed: int, task_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(support, query) rows of a time-ordered task; both keep time order."""
    q = cfg.query_size
    if cfg.query_selection == "last":
        return rows[:-q], rows[-q:]
    rng = np.random.default_rng([seed, stable_hash(task_id) % (1 << 32)])
    is_query = np.zeros(len(rows), dtype=bool)
    is_query[rng.choice(len(rows), size=q, replace=False)] = True
    return rows[~is_query], rows[is_query]


def build_tasks(df: pd.DataFrame, schema: Schema, cfg: TaskConfig, seed: int = 0) -> TaskSplits:
    """Group, filter, split and encode interactions into train/val/test tasks (module docstring)."""
    key = cfg.task_key or schema.task_key
    needed = list(dict.fromkeys([key, *schema.required_columns()]))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise SchemaError(f"interaction table lacks column(s) {missing} required by the schema/task config")
    if (cfg.new_user_quantile is not None or cfg.query_selection == "last") and schema.time is None:
        log.warning("schema has no time column: using row order as time")
    df = df.reset_index(drop=True)
    n = len(df)
    if n == 0:
        raise SchemaError("the interaction table has no rows")
    if df[key].isna().any():
        r = int(df[key].isna().to_numpy().nonzero()[0][0])
        raise SchemaError(f"task key {key!r}: missing value (NaN) at row {r}")
    keys = df[key].astype(str).to_numpy()
    time = df[schema.time].to_numpy() if schema.time else np.arange(n)
    if schema.time and pd.isna(time).any():
        r = int(pd.isna(time).nonzero()[0][0])
        raise SchemaError(f"time column {schema.time!r}: missing value at {_where(df, key, r)}")
    labels, threshold = _labels(df, schema, cfg, key)
    duplicates = _duplicates(df, needed, key)
    new_user, user_threshold = _new_users(keys, time, cfg.new_user_quantile)
    new_item, item_threshold = _new_items(df, cfg, time, key)
    state = new_user.astype(np.int64) + 2 * new_item.astype(np.int64)  # == index into STATES
    assert STATES == ("warm", "user_cold", "item_cold", "user_item_cold")

    key_codes, key_values = pd.factorize(keys, sort=True)
    order = np.lexsort((np.arange(n), time, state, key_codes))  # key, state, time, then input order
    group = key_codes[order] * len(STATES) + state[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], n]

    q = cfg.query_size
    plan: dict[str, list[tuple[str, str, np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
    filtered = {r: {"tasks": 0, "interactions": 0} for r in FILTER_REASONS}
    held_out = 0

    def drop(reason: str, size: int) -> None:
        filtered[reason]["tasks"] += 1
        filtered[reason]["interactions"] += int(size)

    for s, e in zip(starts, ends, strict=True):
        history = order[s:e]
        size = e - s
        if size < cfg.min_interactions:
            drop("too_few_interactions", size)
            continue
        pieces = [(-1, history)]  # (window index, rows): the whole history is one task
        st = STATES[state[history[0]]]
        if size > cfg.max_interactions:
            if not cfg.windows(st):
                drop("too_many_interactions", size)
                continue
            pieces = [(w, history[a:b]) for w, (a, b) in enumerate(window_bounds(size, cfg.max_interactions))]
        value = str(key_values[key_codes[history[0]]])
        eval_split = "val" if stable_hash(f"{cfg.split_seed}:{value}") / 2**64 < cfg.val_fraction else "test"
        for window, rows in pieces:
            if len(rows) < cfg.min_interactions:  # only the oldest window can be this short
                drop("window_remainder", len(rows))
                continue
            tid = task_id(value, st, window)
            if st == "warm":
                if cfg.holds_out(window) and len(rows) - q >= cfg.min_interactions:
                    plan[eval_split].append((tid, st, rows[:-q], rows[-q:]))
                    rows = rows[:-q]
                    held_out += 1
                plan["train"].append((tid, st, *_split_query(rows, cfg, seed, tid)))
            else:
                plan[eval_split].append((tid, st, *_split_query(rows, cfg, seed, tid)))

    label_counts = {}
    for split in SPLITS:
        idx = np.concatenate([np.r_[a, b] for _, _, a, b in plan[split]] or [np.zeros(0, np.int64)])
        positive = int(labels[idx].sum())
        label_counts[split] = {"positive": positive, "negative": len(idx) - positive}
    check_label_balance(label_counts, threshold, schema.label)

    train_rows = np.unique(
        np.concatenate([np.r_[a, b] for _, _, a, b in plan["train"]] or [np.zeros(0, np.int64)])
    )
    encoder = FeatureEncoder.fit(df, schema, train_rows, threshold, cfg.item_key)
    arrays = _encode(df, encoder, key)
    enc_schema = encoder.schema

    def record(task_id: str, st: str, sup: np.ndarray, qry: np.ndarray) -> TaskRecord:
        out: dict[str, np.ndarray] = {}
        for which, idx in (("support", sup), ("query", qry)):
            for name, arr in arrays.items():
                out[f"{which}.{name}"] = np.ascontiguousarray(arr[idx])
            out[f"{which}.label"] = labels[idx]
        return TaskRecord(task_id=task_id, state=st, arrays=out)

    splits = {s: [record(*t) for t in plan[s]] for s in SPLITS}
    rows_out = {s: {t[0]: (t[2], t[3]) for t in plan[s]} for s in SPLITS}
    counts = {
        s: {st: {"tasks": 0, "interactions": 0, "support": 0, "query": 0} for st in STATES} for s in SPLITS
    }
    for split in SPLITS:
        for _task_id, st, sup, qry in plan[split]:
            c = counts[split][st]
            c["tasks"] += 1
            c["support"] += len(sup)
            c["query"] += len(qry)
            c["interactions"] += len(sup) + len(qry)
    stats = {
        "interactions": n,
        "task_keys": len(key_values),
        "counts": counts,
        "filtered": filtered,
        "warm_eval_held_out": held_out,
        "new_user_first_time_threshold": user_threshold,
        "new_item_threshold": item_threshold,
        "positive_rate": float(labels.mean()) if n else 0.0,
        "vocab_sizes": {f.name: f.vocab_size for f in enc_schema.id_fields},
        "label_threshold": threshold,
        "label_counts": label_counts,
        "duplicates": duplicates,
        "filter_rules": filter_rules(cfg),
    }
    log.info("tasks built:\n%s", format_stats(stats))
    return TaskSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        encoder=encoder,
        stats=stats,
        rows=rows_out,
    )


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of tasks / interactions per split and state plus the filter counts."""
    lines = [f"{'split':<6} {'state':<15} {'tasks':>7} {'support':>9} {'query':>8} {'interactions':>13}"]
    for s, by_state in stats["counts"].items():
        for st, c in by_state.items():
            if c["tasks"]:
                lines.append(
                    f"{s:<6} {st:<15} {c['tasks']:>7} {c['support']:>9} {c['query']:>8} {c['interactions']:>13}"
                )
    total = stats["interactions"]

    def share(rows: int) -> str:
        return f"{100.0 * rows / total:.2f}%" if total else "0%"

    rules = stats.get("filter_rules", {})
    dropped = 0
    for reason, c in stats["filtered"].items():
        dropped += c["interactions"]
        why = f" ({rules[reason]})" if reason in rules else ""
        lines.append(
            f"dropped {reason}: {c['tasks']} tasks, {c['interactions']} rows = {share(c['interactions'])} "
            f"of {total}{why}"
        )
    lines.append(f"dropped in all: {dropped} rows = {share(dropped)}; kept {total - dropped} rows in tasks")
    lines.append(f"warm tasks with a held-out warm-eval task: {stats['warm_eval_held_out']}")
    dup = stats.get("duplicates")
    if dup and dup["rows"]:
        ex = dup["example"]
        lines.append(
            f"duplicated rows (kept): {dup['rows']} = {share(dup['rows'])}, rows equal to an earlier row in every "
            f"column the build reads; e.g. row {ex['row']} repeats row {ex['same_as_row']} (task {ex['task']!r}). "
            "Deduplicate the input if these are not real repeated interactions"
        )
    return "\n".join(lines)
