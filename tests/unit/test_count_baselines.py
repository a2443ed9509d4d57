"""Counting baselines (``gmeta.count_baselines``) against a pandas reference on the raw table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gmeta.count_baselines import PREDICTORS, score_split

PRIOR = 5.0


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: P(score of a positive > score of a negative), ties half."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _log_odds(p, g):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)) - np.log(g / (1 - g))


@pytest.fixture(scope="module")
def reference(ml_table, small_splits):
    """Per test query sample: state, label, and the three predictors computed from raw values."""
    df, _ = ml_table
    label = (df["rating"] >= 4.0).to_numpy(float)
    train_rows = np.unique(np.concatenate([np.r_[s, q] for s, q in small_splits.rows["train"].values()]))
    train = df.iloc[train_rows].assign(label=label[train_rows])
    g = train["label"].mean()

    def rate(column: pd.Series, key: pd.Series):
        stats = train.groupby(column)["label"].agg(["sum", "count"])
        pos = key.map(stats["sum"]).fillna(0.0).to_numpy()
        n = key.map(stats["count"]).fillna(0.0).to_numpy()
        return _log_odds((pos + PRIOR * g) / (n + PRIOR), g)

    genre_rows = train.assign(token=train["genre"].str.split(" ")).explode("token")
    genre_stats = genre_rows.groupby("token")["label"].agg(["sum", "count"])
    states, labels, user, item_or_genre, support = [], [], [], [], []
    for rec in small_splits.test:
        sup, qry = small_splits.rows["test"][rec.task_id]
        q = df.iloc[qry]
        states += [rec.state] * len(qry)
        labels.append(label[qry])
        user.append(rate(train["user_id"], q["user_id"]))
        seen_item = q["item_id"].isin(set(train["item_id"])).to_numpy()
        genre_part = []
        for tokens in q["genre"].str.split(" "):
            pos = np.array([genre_stats["sum"].get(t, 0.0) for t in tokens])
            n = np.array([genre_stats["count"].get(t, 0.0) for t in tokens])
            genre_part.append(_log_odds((pos + PRIOR * g) / (n + PRIOR), g).mean())
        item_or_genre.append(np.where(seen_item, rate(train["item_id"], q["item_id"]), genre_part))
        s_rate = (label[sup].sum() + PRIOR * g) / (len(sup) + PRIOR)
        support.append(np.full(len(qry), _log_odds(s_rate, g)))
    return {
        "state": np.array(states),
        "label": np.concatenate(labels),
        "user": np.concatenate(user),
        "item_or_genre": np.concatenate(item_or_genre),
        "support": np.concatenate(support),
    }


def test_counting_baselines_match_a_pandas_reference(shard_dir, reference):
    got = score_split(shard_dir, "test", prior=PRIOR)
    ref = reference
    combos = {
        "user+item_or_genre": ref["user"] + ref["item_or_genre"],
        "support+item_or_genre": ref["support"] + ref["item_or_genre"],
    }
    assert set(got) == set(np.unique(ref["state"]))
    for state, r in got.items():
        rows = ref["state"] == state
        assert r["query_samples"] == rows.sum()
        for name in ("user", "item_or_genre", "support", *combos):
            scores = combos[name] if name in combos else ref[name]
            assert r[name] == pytest.approx(_pairwise_auc(scores[rows], ref["label"][rows]), abs=1e-9), (
                state,
                name,
            )
        assert set(PREDICTORS) <= set(r)
    # new users are unknown to training: the user predictor is a constant there (AUC 0.5)
    assert got["user_cold"]["known_user_share"] == 0.0 and got["user_cold"]["user"] == 0.5
    assert got["warm"]["known_user_share"] == 1.0


def test_counting_baselines_name_a_missing_field(tmp_path, shard_dir):
    from gmeta.data.shards import read_manifest

    schema = read_manifest(shard_dir).schema
    assert "genre" in [f.name for f in schema.multi_hot]
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    manifest = (bad / "manifest.json").read_text().replace('"genre"', '"genres"')
    (bad / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=r"need the field 'genre'"):
        score_split(bad, "test")


def test_a_models_predictions_are_scored_alone_and_with_the_counts(shard_dir, reference):
    """``predictions``: the model's k = 0 logits (here random) and their sum with the counted
    log-odds, on the same samples; predictions of other samples are refused."""
    from gmeta.compare import Predictions
    from gmeta.count_baselines import MODEL_PREDICTORS, _query_samples
    from gmeta.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    sparse = [f.name for f in manifest.schema.sparse]
    u, i = sparse.index("user_id"), sparse.index("item_id")
    g = [f.name for f in manifest.schema.multi_hot].index("genre")
    q = _query_samples(manifest.schema, manifest.shard_paths("test"), u, i, g)
    logits = np.random.default_rng(0).normal(size=len(q.label))
    preds = Predictions(q.task_id, q.state, q.label, {0: logits, -1: logits + 1.0})
    got = score_split(shard_dir, "test", prior=PRIOR, predictions=preds)
    ref = reference
    combined = logits + ref["user"] + ref["item_or_genre"]
    for state, r in got.items():
        rows = ref["state"] == state
        assert set(MODEL_PREDICTORS) <= set(r)
        assert r["model"] == pytest.approx(_pairwise_auc(logits[rows], ref["label"][rows]), abs=1e-9)
        assert r["model+user+item_or_genre"] == pytest.approx(
            _pairwise_auc(combined[rows], ref["label"][rows]), abs=1e-9
        )
    order = np.random.default_rng(1).permutation(len(q.label))
    shuffled = Predictions(q.task_id[order], q.state[order], q.label[order], {0: logits[order]})
    with pytest.raises(ValueError, match="cover other query samples"):
        score_split(shard_dir, "test", prior=PRIOR, predictions=shuffled)
    with pytest.raises(ValueError, match="no unadapted"):
        score_split(shard_dir, "test", prior=PRIOR, predictions=Predictions(q.task_id, q.state, q.label, {}))
