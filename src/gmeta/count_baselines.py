"""Counting baselines: the AUC a model gets from label rates alone, per cold-start state.

A sanity floor for every trained model, read from the same task shards (the same query samples):
each predictor scores a query interaction from positive rates counted on the **train** split, plus,
for ``support``, the task's own support labels (what adaptation on the whole support set sees).
Rates are smoothed towards the global rate with ``prior`` pseudo-interactions, and combined as sums
of log-odds relative to the global rate (naive Bayes). An id the train split never saw (row 0, the
OOV row) gets the global rate, so ``user`` says nothing for a user training never met.

Predictors (``PREDICTORS``):

* ``user``: the user's train rate (the task key's; tasks of one user share it);
* ``item``: the item's train rate; ``item_or_genre``: the same, and for an item training never saw
  the mean log-odds of its genres' train rates (side features, all a new item has);
* ``user+item_or_genre``: both;
* ``support``: the task's own support rate (uses every support label: compare with adapted "all");
* ``support+item_or_genre``: both.

With a trained model's saved predictions (``gmeta.compare.Predictions``, one split, k = 0) ``score_split``
also scores ``model`` (its logits unadapted) and ``model+user+item_or_genre`` (its logit plus the
counted log-odds): what the model knows beyond the counts shows as the gap between the sum and the
counts alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gmeta.compare import Predictions, weighted_auc
from gmeta.data.batch import TaskRecord
from gmeta.data.schema import STATES, Schema
from gmeta.data.shards import iter_shard, read_manifest

PREDICTORS: tuple[str, ...] = (
    "user",
    "item",
    "item_or_genre",
    "user+item_or_genre",
    "support",
    "support+item_or_genre",
)
#: with a model's predictions: its unadapted logits alone and plus ``user+item_or_genre``
MODEL_PREDICTORS: tuple[str, ...] = ("model", "model+user+item_or_genre")


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def smoothed_log_odds(
    positives: np.ndarray, counts: np.ndarray, global_rate: float, prior: float
) -> np.ndarray:
    """The rate ``positives / counts`` with ``prior`` pseudo-interactions at the global rate, as
    log-odds relative to the global rate (0 where nothing was counted)."""
    rate = (positives + prior * global_rate) / (counts + prior)
    return _logit(rate) - _logit(global_rate)


@dataclass
class Rates:
    """Smoothed positive rates per id of one field (index = encoded id), counted on train samples."""

    positives: np.ndarray
    counts: np.ndarray

    @classmethod
    def count(cls, ids: np.ndarray, labels: np.ndarray, size: int) -> Rates:
        return cls(np.bincount(ids, labels, minlength=size), np.bincount(ids, minlength=size).astype(float))

    def log_odds(self, ids: np.ndarray, global_rate: float, prior: float) -> np.ndarray:
        """Smoothed rate of each id as log-odds relative to the global rate (0 for unseen ids)."""
        return smoothed_log_odds(self.positives[ids], self.counts[ids], global_rate, prior)


def _records(schema: Schema, paths: Iterable[Path]) -> Iterator[TaskRecord]:
    for path in paths:
        yield from iter_shard(path, schema)


@dataclass
class QuerySamples:
    """The query samples of one split with the columns the predictors need."""

    task_id: np.ndarray  # the sample's task id (to check a model's predictions cover the same samples)
    state: np.ndarray  # index into STATES
    label: np.ndarray
    user: np.ndarray
    item: np.ndarray
    genres: np.ndarray  # (N, L) genre ids, -1 = padding
    support_positives: np.ndarray  # the task's support positives and size, per query sample
    support_size: np.ndarray


def score_split(
    directory: str | Path,
    split: str = "test",
    prior: float = 5.0,
    predictions: Predictions | None = None,
) -> dict[str, dict[str, float]]:
    """{state: {predictor: pooled AUC of its query samples}} for ``split`` of a MovieLens-like shard folder
    (id fields ``user_id`` = the task key, ``item_id``, and a multi-hot ``genre``); with a model's
    ``predictions`` of the same split and data build, the ``MODEL_PREDICTORS`` too."""
    manifest = read_manifest(directory)
    schema = manifest.schema
    sparse = [f.name for f in schema.sparse]
    multi = [f.name for f in schema.multi_hot]
    for need, names in (("user_id", sparse), ("item_id", sparse), ("genre", multi)):
        if need not in names:
            raise ValueError(
                f"{directory}: counting baselines need the field {need!r}; the schema has {names}"
            )
    u, i, g = sparse.index("user_id"), sparse.index("item_id"), multi.index("genre")
    sizes = {f.name: f.vocab_size for f in schema.id_fields}

    # train rates: every train sample (support and query) counts
    tr_user, tr_item, tr_genre, tr_label = [], [], [], []
    for rec in _records(schema, manifest.shard_paths("train")):
        for which in ("support", "query"):
            a = rec.arrays
            tr_user.append(a[f"{which}.sparse"][:, u])
            tr_item.append(a[f"{which}.sparse"][:, i])
            tr_genre.append(a[f"{which}.multi_hot"][:, g])
            tr_label.append(a[f"{which}.label"])
    labels = np.concatenate(tr_label).astype(float)
    global_rate = float(labels.mean())
    users = Rates.count(np.concatenate(tr_user), labels, sizes["user_id"])
    items = Rates.count(np.concatenate(tr_item), labels, sizes["item_id"])
    genre_ids = np.concatenate(tr_genre)
    present = genre_ids >= 0
    genres = Rates.count(
        genre_ids[present], np.broadcast_to(labels[:, None], genre_ids.shape)[present], sizes["genre"]
    )

    q = _query_samples(schema, manifest.shard_paths(split), u, i, g)
    user_part = users.log_odds(q.user, global_rate, prior)
    item_part = items.log_odds(q.item, global_rate, prior)
    genre_terms = np.where(q.genres >= 0, genres.log_odds(np.maximum(q.genres, 0), global_rate, prior), 0.0)
    genre_part = genre_terms.sum(1) / np.maximum((q.genres >= 0).sum(1), 1)
    item_or_genre = np.where(q.item > 0, item_part, genre_part)
    support_part = smoothed_log_odds(q.support_positives, q.support_size, global_rate, prior)
    scores = {
        "user": user_part,
        "item": item_part,
        "item_or_genre": item_or_genre,
        "user+item_or_genre": user_part + item_or_genre,
        "support": support_part,
        "support+item_or_genre": support_part + item_or_genre,
    }
    if predictions is not None:
        if not (
            np.array_equal(predictions.task_ids, q.task_id) and np.array_equal(predictions.label, q.label)
        ):
            raise ValueError(
                f"the model's predictions cover other query samples than {directory}'s {split} split "
                f"({len(predictions.label)} against {len(q.label)} samples): score the same split of the "
                "same data build"
            )
        if 0 not in predictions.logits:
            raise ValueError("the model's predictions hold no unadapted (k = 0) logits")
        scores["model"] = predictions.logits[0]
        scores["model+user+item_or_genre"] = predictions.logits[0] + scores["user+item_or_genre"]
    out: dict[str, dict[str, float]] = {}
    for s, state in enumerate(STATES):
        rows = q.state == s
        if not rows.any():
            continue
        ones = np.ones((1, int(rows.sum())))
        out[state] = {
            name: float(weighted_auc(v[rows], q.label[rows], ones)[0]) for name, v in scores.items()
        }
        out[state]["known_user_share"] = float((q.user[rows] > 0).mean())
        out[state]["query_samples"] = int(rows.sum())
    return out


def _query_samples(schema: Schema, paths: Iterable[Path], u: int, i: int, g: int) -> QuerySamples:
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("task_id", "state", "label", "user", "item", "genres", "positives", "size")
    }
    for rec in _records(schema, paths):
        a = rec.arrays
        n = len(a["query.label"])
        sup = a["support.label"]
        cols["task_id"].append(np.full(n, rec.task_id))
        cols["state"].append(np.full(n, STATES.index(rec.state)))
        cols["label"].append(a["query.label"])
        cols["user"].append(a["query.sparse"][:, u])
        cols["item"].append(a["query.sparse"][:, i])
        cols["genres"].append(a["query.multi_hot"][:, g])
        cols["positives"].append(np.full(n, float(sup.sum())))
        cols["size"].append(np.full(n, float(len(sup))))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return QuerySamples(
        c["task_id"], c["state"], c["label"], c["user"], c["item"], c["genres"], c["positives"], c["size"]
    )
