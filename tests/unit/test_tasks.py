"""Task construction: states, filters, support/query, splits, encoding, accounting of every row."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from gmeta.data.schema import MULTI_HOT_PAD, STATES
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import SPLITS, TaskConfig, build_tasks, stable_hash


def _reference_groups(df: pd.DataFrame, cfg: TaskConfig) -> pd.Series:
    """Independent pandas reference: size of every (user, state) group."""
    first = df.groupby("user_id")["timestamp"].min()
    new_user = df["user_id"].map(first > first.quantile(cfg.new_user_quantile))
    new_item = df["release_year"].astype(int) >= 1998
    state = (new_user.astype(int) + 2 * new_item.astype(int)).map(dict(enumerate(STATES)))
    return df.assign(state=state).groupby(["user_id", "state"]).size()


def test_counts_states_and_filter_reasons_match_reference(ml_table, small_splits, small_task_config):
    df, _ = ml_table
    cfg = small_task_config
    sizes = _reference_groups(df, cfg)
    too_few, too_many = sizes[sizes < cfg.min_interactions], sizes[sizes > cfg.max_interactions]
    kept = sizes[(sizes >= cfg.min_interactions) & (sizes <= cfg.max_interactions)]
    f = small_splits.stats["filtered"]
    assert f["too_few_interactions"] == {"tasks": len(too_few), "interactions": int(too_few.sum())}
    assert f["too_many_interactions"] == {"tasks": len(too_many), "interactions": int(too_many.sum())}
    assert len(too_few) > 0 and len(too_many) > 0
    warm = kept[kept.index.get_level_values("state") == "warm"]
    assert len(small_splits.train) == len(warm)  # every kept warm task trains
    held = int((warm - cfg.query_size >= cfg.min_interactions).sum())
    assert small_splits.stats["warm_eval_held_out"] == held
    eval_ids = {r.task_id for s in ("val", "test") for r in small_splits.split(s)}
    expected_eval = {f"{u}/{st}" for u, st in kept.index if st != "warm"}
    expected_eval |= {f"{u}/warm" for (u, _), n in warm.items() if n - cfg.query_size >= cfg.min_interactions}
    assert eval_ids == expected_eval
    for st in STATES[1:]:  # every cold state is present in this data
        assert sum(small_splits.stats["counts"][s][st]["tasks"] for s in ("val", "test")) > 0
    assert all(r.state == "warm" for r in small_splits.train)
    for s in SPLITS:
        for st in STATES:
            recs = [r for r in small_splits.split(s) if r.state == st]
            c = small_splits.stats["counts"][s][st]
            assert c["tasks"] == len(recs)
            assert c["interactions"] == sum(r.num("support") + r.num("query") for r in recs)


def test_every_row_used_once_except_warm_eval_support(ml_table, small_splits, small_task_config):
    df, _ = ml_table
    cfg = small_task_config
    use = Counter()
    for s in SPLITS:
        for task_id, (sup, qry) in small_splits.rows[s].items():
            if s != "train" and task_id.endswith("/warm"):
                train_sup, train_qry = small_splits.rows["train"][task_id]
                assert np.array_equal(sup, np.r_[train_sup, train_qry])  # documented reuse, same order
                use.update(qry.tolist())
            else:
                use.update(sup.tolist())
                use.update(qry.tolist())
    assert max(use.values()) == 1
    filtered = sum(v["interactions"] for v in small_splits.stats["filtered"].values())
    assert len(use) + filtered == len(df)
    sizes = _reference_groups(df, cfg)
    assert filtered == int(sizes[(sizes < cfg.min_interactions) | (sizes > cfg.max_interactions)].sum())


def test_query_is_last_by_time_and_rows_match_task(ml_table, small_splits, small_task_config):
    df, _ = ml_table
    t = df["timestamp"].to_numpy()
    for s in SPLITS:
        for rec in small_splits.split(s):
            sup, qry = small_splits.rows[s][rec.task_id]
            assert len(qry) == small_task_config.query_size == rec.num("query")
            assert len(sup) == rec.num("support") >= 1
            assert t[sup].max() <= t[qry].min()
            assert np.all(np.diff(t[np.r_[sup, qry]]) >= 0)  # time-ordered
            user, state = rec.task_id.rsplit("/", 1)
            assert set(df["user_id"].iloc[np.r_[sup, qry]]) == {user} and state == rec.state
            labels = (df["rating"].to_numpy()[qry] >= 4.0).astype(np.float32)
            assert np.array_equal(rec.arrays["query.label"], labels)


def test_val_test_split_by_user_hash(small_splits):
    users = {s: {r.task_id.rsplit("/", 1)[0] for r in small_splits.split(s)} for s in ("val", "test")}
    assert not users["val"] & users["test"]
    for u in users["val"]:
        assert stable_hash(f"0:{u}") / 2**64 < 0.5
    assert 0.3 < len(users["val"]) / (len(users["val"]) + len(users["test"])) < 0.7


def test_vocab_from_train_only_and_oov(ml_table, small_splits):
    df, _ = ml_table
    schema = small_splits.schema
    train_rows = np.concatenate([np.r_[a, b] for a, b in small_splits.rows["train"].values()])
    train_users = sorted(set(df["user_id"].iloc[train_rows]))
    assert small_splits.vocabs["user_id"] == train_users
    assert schema.field("user_id").vocab_size == len(train_users) + 1
    uid_col = [f.name for f in schema.sparse].index("user_id")
    iid_col = [f.name for f in schema.sparse].index("item_id")
    train_items = set(df["item_id"].iloc[train_rows])
    for s in SPLITS:
        for rec in small_splits.split(s):
            sup, qry = small_splits.rows[s][rec.task_id]
            for which, rows in (("support", sup), ("query", qry)):
                ids = rec.arrays[f"{which}.sparse"]
                for k, row in enumerate(rows):
                    user, item = df["user_id"].iloc[row], df["item_id"].iloc[row]
                    want_u = train_users.index(user) + 1 if user in train_users else 0
                    assert ids[k, uid_col] == want_u
                    assert (ids[k, iid_col] == 0) == (item not in train_items)
    new_user_ids = [
        r.arrays["query.sparse"][:, uid_col]
        for r in small_splits.test
        if "cold" in r.state and "user" in r.state
    ]
    assert new_user_ids and all((a == 0).all() for a in new_user_ids)  # new users are OOV


def test_arrays_shapes_dtypes_and_multi_hot_padding(small_splits):
    rec = small_splits.train[0]
    n = rec.num("support")
    assert rec.arrays["support.sparse"].shape == (n, 7) and rec.arrays["support.sparse"].dtype == np.int64
    assert (
        rec.arrays["support.multi_hot"].shape == (n, 1, 6)
        and rec.arrays["support.multi_hot"].dtype == np.int64
    )
    assert rec.arrays["support.dense"].shape == (n, 1) and rec.arrays["support.dense"].dtype == np.float32
    assert rec.arrays["support.label"].dtype == np.float32
    mh = rec.arrays["support.multi_hot"][:, 0]
    assert ((mh >= 1) | (mh == MULTI_HOT_PAD)).all()
    # padding only after the real ids
    for row in mh:
        k = int((row != MULTI_HOT_PAD).sum())
        assert 1 <= k <= 3 and (row[k:] == MULTI_HOT_PAD).all()


def test_deterministic_and_random_query_selection(ml_table):
    df, schema = ml_table
    cfg = TaskConfig(min_interactions=8, max_interactions=40, query_size=4, query_selection="random")
    a, b = build_tasks(df, schema, cfg, seed=1), build_tasks(df, schema, cfg, seed=1)
    c = build_tasks(df, schema, cfg, seed=2)
    assert [r.task_id for r in a.train] == [r.task_id for r in b.train]
    for ra, rb in zip(a.train, b.train, strict=True):
        for k in ra.arrays:
            assert ra.arrays[k].tobytes() == rb.arrays[k].tobytes()
    assert any(not np.array_equal(a.rows["train"][t][1], c.rows["train"][t][1]) for t in a.rows["train"])
    last = build_tasks(df, schema, TaskConfig(min_interactions=8, max_interactions=40, query_size=4), seed=1)
    for t, (sup, qry) in a.rows["train"].items():
        assert len(qry) == 4 and sorted(np.r_[sup, qry].tolist()) == sorted(
            np.concatenate(last.rows["train"][t]).tolist()
        )


def test_hash_buckets_map_unseen_values_to_stable_buckets(ml_table):
    df, schema = ml_table
    fields = tuple(replace(f, hash_buckets=50) if f.name == "item_id" else f for f in schema.fields)
    hashed = replace(schema, fields=fields)
    sp = build_tasks(df, hashed, TaskConfig(min_interactions=8, max_interactions=40, query_size=4))
    assert sp.schema.field("item_id").vocab_size == 51 and sp.vocabs["item_id"] == []
    col = [f.name for f in schema.sparse].index("item_id")
    sup, _ = sp.rows["test"][sp.test[0].task_id]
    item = df["item_id"].iloc[sup[0]]
    assert sp.test[0].arrays["support.sparse"][0, col] == 1 + stable_hash(f"item_id\0{item}") % 50


def test_criteo_like_tasks_without_cold_start():
    df, schema = SyntheticSource(
        num_users=30, schema="criteo", min_interactions=15, max_interactions=40, seed=2
    ).load()
    cfg = TaskConfig(label_threshold=0.5, new_user_quantile=None, new_item_rule=None, item_key=None)
    sp = build_tasks(df, schema, cfg)
    assert {r.state for s in SPLITS for r in sp.split(s)} == {"warm"}
    rec = sp.train[0]
    assert rec.arrays["support.multi_hot"].shape == (rec.num("support"), 0, 0)
    assert rec.arrays["support.sparse"].shape[1] == 26 and rec.arrays["support.dense"].shape[1] == 13


def test_task_config_validation():
    with pytest.raises(ValueError, match="min_interactions .* must exceed query_size"):
        TaskConfig(min_interactions=5, query_size=5)
    with pytest.raises(ValueError, match="new_item_rule"):
        TaskConfig(new_item_rule={"column": "x"})


def test_window_policy_cuts_long_histories_into_consecutive_windows(ml_table):
    """Independent reference: each (user, state) history in time order, chunked back from its end."""
    df, schema = ml_table
    cfg = TaskConfig(min_interactions=8, max_interactions=15, query_size=4, max_interactions_policy="window")
    sp = build_tasks(df, schema, cfg)
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy()))
    by_task = {}
    for s in SPLITS:
        for tid, (sup, qry) in sp.rows[s].items():
            by_task.setdefault(tid, set()).update(np.r_[sup, qry].tolist())
    sizes = _reference_groups(df, cfg)
    first = df.groupby("user_id")["timestamp"].min()
    new_user = df["user_id"].map(first > first.quantile(cfg.new_user_quantile))
    state = (new_user.astype(int) + 2 * (df["release_year"].astype(int) >= 1998).astype(int)).map(
        dict(enumerate(STATES))
    )
    histories: dict[tuple[str, str], list[int]] = {}
    users, states = df["user_id"].to_numpy(), state.to_numpy()
    for r in order:  # time order, ties by input row
        histories.setdefault((users[r], states[r]), []).append(int(r))
    expected, remainder = {}, {"tasks": 0, "interactions": 0}
    for (user, st), n in sizes.items():
        if n < cfg.min_interactions:
            continue
        hist = histories[(user, st)]
        if n <= cfg.max_interactions:
            expected[f"{user}/{st}"] = set(hist)
            continue
        chunks = [hist[max(0, e - 15) : e] for e in range(n, 0, -15)][::-1]  # oldest first
        for w, chunk in enumerate(chunks):
            if len(chunk) < cfg.min_interactions:
                remainder["tasks"] += 1
                remainder["interactions"] += len(chunk)
            else:
                expected[f"{user}/{st}/w{w}"] = set(chunk)
    assert any("/w" in t for t in expected) and remainder["tasks"] > 0
    assert by_task == expected
    assert sp.stats["filtered"]["window_remainder"] == remainder
    assert sp.stats["filtered"]["too_many_interactions"] == {"tasks": 0, "interactions": 0}
    for s in SPLITS:  # the support/query cut per window: the last query_size rows by time are the query
        for rec in sp.split(s):
            sup, qry = sp.rows[s][rec.task_id]
            t = df["timestamp"].to_numpy()
            assert len(qry) == 4 and t[sup].max() <= t[qry].min()
    users = {s: {r.task_id.split("/", 1)[0] for r in sp.split(s)} for s in ("val", "test")}
    assert not users["val"] & users["test"]  # all windows of a user on one side


def test_train_window_policy_keeps_the_drop_protocols_evaluation_and_trains_long_warm_histories(ml_table):
    """train_window == drop on val and test (same tasks, same rows); train == drop's train plus the
    windows of every long warm history, whole (no hold-out); long cold histories dropped."""
    df, schema = ml_table
    common = dict(min_interactions=8, max_interactions=15, query_size=4)
    drop = build_tasks(df, schema, TaskConfig(**common, max_interactions_policy="drop"))
    window = build_tasks(df, schema, TaskConfig(**common, max_interactions_policy="window"))
    train_window = build_tasks(df, schema, TaskConfig(**common, max_interactions_policy="train_window"))

    def is_window(tid):  # <key>/<state>/w<i>
        return tid.count("/") == 2

    def rows(sp, split, windows):
        return {
            tid: np.r_[sup, qry].tolist()
            for tid, (sup, qry) in sp.rows[split].items()
            if is_window(tid) == windows
        }

    for split in ("val", "test"):
        assert train_window.rows[split].keys() == drop.rows[split].keys()
        for tid, (sup, qry) in drop.rows[split].items():
            got_sup, got_qry = train_window.rows[split][tid]
            assert got_sup.tolist() == sup.tolist() and got_qry.tolist() == qry.tolist()
    assert rows(train_window, "train", False) == rows(drop, "train", False)
    long_warm = {tid for tid in window.rows["train"] if is_window(tid)}
    assert long_warm and {tid for tid in train_window.rows["train"] if is_window(tid)} == long_warm
    # a window trains on every row of its window: nothing held out for warm evaluation (under window,
    # an evaluation task's support rows train too, its query rows do not)
    expected = {tid: set(r) for tid, r in rows(window, "train", True).items()}
    for split in ("val", "test"):
        for tid, r in rows(window, split, True).items():
            if tid.split("/")[1] == "warm":
                expected[tid] |= set(r)
    got = rows(train_window, "train", True)
    assert {tid: set(r) for tid, r in got.items()} == expected
    assert all(len(r) == len(set(r)) for r in got.values())
    assert all(tid.split("/")[1] == "warm" for tid in long_warm)
    cold_long = drop.stats["filtered"]["too_many_interactions"]["tasks"] - len(
        {tid.rsplit("/", 1)[0] for tid in long_warm}
    )
    assert cold_long > 0  # the fixture has long cold histories, and train_window drops them
    assert train_window.stats["filtered"]["too_many_interactions"]["tasks"] == cold_long
    assert train_window.stats["warm_eval_held_out"] == drop.stats["warm_eval_held_out"]


def test_window_bounds_and_task_ids():
    from gmeta.data.tasks import task_id, window_bounds

    assert window_bounds(35, 15) == [(0, 5), (5, 20), (20, 35)]
    assert window_bounds(30, 15) == [(0, 15), (15, 30)]
    assert task_id("u1", "warm") == "u1/warm" and task_id("u1", "warm", 2) == "u1/warm/w2"


def test_task_config_rejects_bad_policy_and_threshold():
    with pytest.raises(
        ValueError,
        match=r"max_interactions_policy must be one of \('drop', 'window', 'train_window'\), got 'cut'",
    ):
        TaskConfig(max_interactions_policy="cut")
    with pytest.raises(ValueError, match="label_threshold must be a number, 'auto'"):
        TaskConfig(label_threshold="high")
    assert TaskConfig(label_threshold="auto").label_threshold == "auto"
