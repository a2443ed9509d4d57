"""Synthetic interactions with planted per-task structure, for tests, quick runs and scale runs.

``schema="movielens"`` mimics ML-1M's columns. Every user has a private preference (weights over
genres, a latent vector against item factors and a bias) that drives the rating; the user side
features are only weakly informative. A global model therefore cannot predict a new user well,
while adapting on that user's support set can: the signal meta-learning should find.

``schema="criteo"`` gives 26 sparse fields (configurable vocabularies), 13 dense fields and a 0/1
click label, grouped into tasks by ``task``: each task has private weights over the dense fields
and a private bias, plus a global effect of the first sparse field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from gmeta.data.schema import FieldSpec, Schema, SchemaError
from gmeta.data.sources.movielens import YEAR_MIN, YEAR_SPAN, movielens_schema

log = logging.getLogger(__name__)

NUM_CRITEO_SPARSE, NUM_CRITEO_DENSE = 26, 13
_AGES = np.array([1, 18, 25, 35, 45, 50, 56])


def criteo_schema(hash_buckets: int = 0) -> Schema:
    """Criteo-like schema: sparse C1..C26, dense I1..I13, label ``label``, tasks by ``task``."""
    return Schema(
        task_key="task",
        label="label",
        time="timestamp",
        fields=(
            *(FieldSpec(f"C{i + 1}", "sparse", hash_buckets=hash_buckets) for i in range(NUM_CRITEO_SPARSE)),
            *(FieldSpec(f"I{i + 1}", "dense") for i in range(NUM_CRITEO_DENSE)),
        ),
    )


class SyntheticSource:
    """Generate a reproducible interaction table (see the module docstring).

    Args:
        num_users: tasks to generate (users, or task groups for ``criteo``).
        num_items: items (ML-like) or the vocabulary of C1 (criteo).
        min_interactions / max_interactions: interactions per user, drawn uniformly in this range.
        seed: generator seed; the same arguments always give the same table.
        schema: ``"movielens"`` or ``"criteo"``.
        num_genres: ML-like: genre vocabulary; each item has 1..3 genres.
        latent_dim: ML-like: size of the user/item latent factors.
        new_item_fraction: ML-like: share of items released in 1998..2000 (the default item-cold rule).
        noise: standard deviation of the rating noise (in units of the planted score's spread).
        vocab_sizes: criteo: vocabulary of C2..C26 (one int for all or 25 ints).
        hash_buckets: criteo: if > 0, the sparse fields are hashed into this many buckets.
        time_span: timestamps are spread over [0, time_span) seconds.
    """

    def __init__(
        self,
        num_users: int = 200,
        num_items: int = 300,
        min_interactions: int = 15,
        max_interactions: int = 60,
        seed: int = 0,
        schema: Literal["movielens", "criteo"] = "movielens",
        num_genres: int = 12,
        latent_dim: int = 8,
        new_item_fraction: float = 0.1,
        noise: float = 0.3,
        vocab_sizes: int | Sequence[int] = 1000,
        hash_buckets: int = 0,
        time_span: int = 10_000_000,
    ) -> None:
        if schema not in ("movielens", "criteo"):
            raise SchemaError(f"SyntheticSource: schema must be 'movielens' or 'criteo', got {schema!r}")
        if not 1 <= min_interactions <= max_interactions:
            raise SchemaError(
                f"SyntheticSource: need 1 <= min_interactions <= max_interactions, got {min_interactions}, {max_interactions}"
            )
        if schema == "movielens" and max_interactions > num_items:
            raise SchemaError(f"SyntheticSource: max_interactions {max_interactions} > num_items {num_items}")
        self.num_users, self.num_items = num_users, num_items
        self.min_interactions, self.max_interactions = min_interactions, max_interactions
        self.seed, self.schema = seed, schema
        self.num_genres, self.latent_dim = num_genres, latent_dim
        self.new_item_fraction, self.noise = new_item_fraction, noise
        if isinstance(vocab_sizes, int):
            vocab_sizes = [vocab_sizes] * (NUM_CRITEO_SPARSE - 1)
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        if len(self.vocab_sizes) != NUM_CRITEO_SPARSE - 1:
            raise SchemaError(f"SyntheticSource: vocab_sizes needs {NUM_CRITEO_SPARSE - 1} entries (C2..C26)")
        self.hash_buckets, self.time_span = hash_buckets, time_span

    def describe(self) -> dict[str, Any]:
        return {"source": "synthetic", **{k: v for k, v in vars(self).items()}}

    def load(self) -> tuple[pd.DataFrame, Schema]:
        rng = np.random.default_rng(self.seed)
        df = self._movielens(rng) if self.schema == "movielens" else self._criteo(rng)
        log.info("synthetic %s: %d interactions, %d tasks", self.schema, len(df), self.num_users)
        schema = movielens_schema() if self.schema == "movielens" else criteo_schema(self.hash_buckets)
        return df[schema.required_columns()].reset_index(drop=True), schema

    # -- shared pieces ---------------------------------------------------------------------
    def _counts_and_times(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Interactions per user and their timestamps (users start uniformly over the span)."""
        counts = rng.integers(self.min_interactions, self.max_interactions + 1, size=self.num_users)
        start = rng.integers(0, self.time_span // 2, size=self.num_users)
        gaps = rng.exponential(self.time_span / (4 * self.max_interactions), size=int(counts.sum()))
        owner = np.repeat(np.arange(self.num_users), counts)
        offsets = np.concatenate([np.cumsum(g) for g in np.split(gaps, np.cumsum(counts)[:-1])])
        return counts, (start[owner] + offsets).astype(np.int64)

    # -- MovieLens-like --------------------------------------------------------------------
    def _movielens(self, rng: np.random.Generator) -> pd.DataFrame:
        nu, ni, d, ng = self.num_users, self.num_items, self.latent_dim, self.num_genres
        # items: genres, latent factors, bias, release year (new items: 1998..2000)
        genre_names = np.array([f"genre{g:02d}" for g in range(ng)])
        item_genres = [rng.choice(ng, size=rng.integers(1, 4), replace=False) for _ in range(ni)]
        item_genre_mat = np.zeros((ni, ng))
        for i, gs in enumerate(item_genres):
            item_genre_mat[i, gs] = 1.0 / len(gs)
        item_vec = rng.normal(size=(ni, d)) / np.sqrt(d)
        item_bias = rng.normal(scale=0.3, size=ni)
        is_new = rng.random(ni) < self.new_item_fraction
        year = np.where(is_new, rng.integers(1998, 2001, size=ni), rng.integers(1919, 1998, size=ni))
        popularity = rng.zipf(1.5, size=ni).astype(float)
        popularity /= popularity.sum()
        popularity = 0.5 * popularity + 0.5 / ni  # keep the long tail reachable

        # users: private preference (genre weights, latent vector, bias); weak side features
        genre_w = rng.normal(scale=1.5, size=(nu, ng))
        user_vec = rng.normal(size=(nu, d))
        user_bias = rng.normal(scale=1.0, size=nu)
        gender = np.where(user_bias + rng.normal(scale=3.0, size=nu) > 0, "M", "F")
        age = _AGES[rng.integers(0, len(_AGES), size=nu)]
        occupation = rng.integers(0, 21, size=nu)
        zip3 = np.array([f"{z:03d}" for z in rng.integers(0, 1000, size=nu)])

        counts, ts = self._counts_and_times(rng)
        owner = np.repeat(np.arange(nu), counts)
        items = np.concatenate([rng.choice(ni, size=c, replace=False, p=popularity) for c in counts])
        score = (
            (genre_w[owner] * item_genre_mat[items]).sum(1)
            + (user_vec[owner] * item_vec[items]).sum(1)
            + user_bias[owner]
            + item_bias[items]
        )
        score = score + rng.normal(scale=self.noise * score.std(), size=score.shape)
        # ratings 1..5 by global score quantiles: about 40% of ratings are >= 4
        rating = 1 + np.searchsorted(np.quantile(score, [0.15, 0.35, 0.6, 0.8]), score)
        return pd.DataFrame(
            {
                "user_id": np.char.add("u", owner.astype(str)),
                "item_id": np.char.add("i", items.astype(str)),
                "rating": rating.astype(np.float32),
                "timestamp": ts,
                "gender": gender[owner],
                "age": age[owner].astype(str),
                "occupation": occupation[owner].astype(str),
                "zip3": zip3[owner],
                "release_year": year[items].astype(str),
                "genre": [" ".join(genre_names[np.sort(item_genres[i])]) for i in items],
                "year_norm": ((year[items] - YEAR_MIN) / YEAR_SPAN).astype(np.float32),
            }
        )

    # -- Criteo-like -----------------------------------------------------------------------
    def _criteo(self, rng: np.random.Generator) -> pd.DataFrame:
        nu = self.num_users
        counts, ts = self._counts_and_times(rng)
        owner = np.repeat(np.arange(nu), counts)
        n = len(owner)
        dense = rng.normal(size=(n, NUM_CRITEO_DENSE)).astype(np.float32)
        c1 = rng.integers(0, self.num_items, size=n)
        c1_effect = rng.normal(scale=0.5, size=self.num_items)
        task_w = rng.normal(size=(nu, NUM_CRITEO_DENSE)) / np.sqrt(NUM_CRITEO_DENSE) * 2.0
        task_bias = rng.normal(scale=1.0, size=nu)
        logit = (task_w[owner] * dense).sum(1) + task_bias[owner] + c1_effect[c1]
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        cols: dict[str, Any] = {"task": np.char.add("t", owner.astype(str)), "label": label, "timestamp": ts}
        cols["C1"] = np.char.add("c1_", c1.astype(str))
        for j, v in enumerate(self.vocab_sizes, start=2):
            cols[f"C{j}"] = np.char.add(f"c{j}_", rng.integers(0, v, size=n).astype(str))
        for j in range(NUM_CRITEO_DENSE):
            cols[f"I{j + 1}"] = dense[:, j]
        return pd.DataFrame(cols)
