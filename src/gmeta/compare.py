"""Honest method comparisons: per-task predictions at k support shots, and paired bootstrap intervals.

``collect_predictions`` scores every query sample of a split at each shot count k (k = 0: no
adaptation; k = n: each task adapts on its first n support samples, what a user with n interactions
has; ``None``: the whole support set), through the model's own evaluation path
(``MetaLearner.predict``, with the checkpoint's adaptation schedule if it has one).

``paired_bootstrap`` compares methods on the SAME resampled tasks: each replicate draws the tasks of
each cold-start state with replacement (a task is one user in one state, so this resamples users,
the unit that is independent), and every method, seed and k is scored on that replicate with a
weighted AUC. The mean over seeds of method A minus method B, per replicate, gives the interval:
seed noise and user sampling noise are both in it, and the pairing removes what the methods share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gmeta.data.batch import TaskBatch, truncate_support
from gmeta.data.schema import STATES

if TYPE_CHECKING:
    from gmeta.meta.module import MetaDLRMModule


@dataclass
class Predictions:
    """Query predictions of one model on one split: one entry per real query sample.

    Attributes:
        task_ids: (N,) the sample's task id. state: (N,) index into ``STATES``. label: (N,) 0/1.
        logits: {k: (N,) logits after adapting on the first k support samples}; key -1 = all of them.
    """

    task_ids: np.ndarray
    state: np.ndarray
    label: np.ndarray
    logits: dict[int, np.ndarray]

    def save(self, path: str) -> None:
        arrays = {"task_ids": self.task_ids, "state": self.state, "label": self.label}
        arrays.update({f"logits_{k}": v for k, v in self.logits.items()})
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds poorly

    @classmethod
    def load(cls, path: str) -> Predictions:
        with np.load(path, allow_pickle=False) as f:
            logits = {int(name.split("_", 1)[1]): f[name] for name in f.files if name.startswith("logits_")}
            return cls(f["task_ids"], f["state"], f["label"], logits)


ALL = -1  #: the ``Predictions.logits`` key of the whole support set


@torch.no_grad()
def collect_predictions(
    model: MetaDLRMModule, batches: Iterable[TaskBatch], shots: Sequence[int | None]
) -> Predictions:
    """Query logits of every real task of ``batches`` at each shot count (0: not adapted; None: all);
    samples are ordered by batch, task, position.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    task_ids: list[np.ndarray] = []
    state: list[np.ndarray] = []
    label: list[np.ndarray] = []
    logits: dict[int, list[np.ndarray]] = {ALL if k is None else int(k): [] for k in shots}
    try:
        for batch in batches:
            batch = batch.to(device)
            lookup = model.embedding.lookup(batch)
            q = batch.query
            real = q.mask & batch.task_mask[:, None]
            ids = np.array(batch.task_ids, dtype=object)[:, None].repeat(real.shape[1], axis=1)
            task_ids.append(ids[real.cpu().numpy()].astype(str))
            state.append(batch.state[:, None].expand_as(real)[real].cpu().numpy())
            label.append(q.label[real].cpu().numpy())
            for k in shots:
                if k == 0:
                    out = model.learner.predict(batch, lookup, adapted=False)
                elif k is None:
                    out = model.learner.predict(batch, lookup, adapted=True)
                else:  # compact: adapt over k support columns (a lookup of its own)
                    view = truncate_support(batch, k, compact=True)
                    out = model.learner.predict(view, model.embedding.lookup(view), adapted=True)
                logits[ALL if k is None else int(k)].append(out[real].double().cpu().numpy())
    finally:
        model.train(was_training)
    cat = np.concatenate
    return Predictions(cat(task_ids), cat(state), cat(label), {k: cat(v) for k, v in logits.items()})


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC with per-sample weights (ties count half), for each row of ``weights`` (B, N) at once.

    A weight w is the same as the sample repeated w times, so integer bootstrap counts give the AUC
    of the resampled data exactly.
    """
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order] > 0.5, weights[:, order]
    # groups of tied scores: negatives strictly below a positive count 1, tied ones 1/2
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def task_weights(
    task_index: np.ndarray, num_tasks: int, replicates: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, N) per-sample bootstrap weights: each replicate draws ``num_tasks`` tasks with replacement;
    a sample's weight is how often its task was drawn. Row 0 is all ones (the observed data)."""
    counts = rng.multinomial(num_tasks, np.full(num_tasks, 1.0 / num_tasks), size=replicates)
    counts[0] = 1
    return counts[:, task_index].astype(np.float64)


@dataclass(frozen=True)
class Interval:
    """A paired estimate: observed value and percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 4) -> str:
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def interval(samples: np.ndarray, level: float = 0.95) -> Interval:
    """Row 0 is the observed value, rows 1.. the bootstrap replicates."""
    reps = samples[1:][~np.isnan(samples[1:])]
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha]) if len(reps) else (np.nan, np.nan)
    return Interval(float(samples[0]), float(low), float(high))


def bootstrap_aucs(
    runs: dict[str, list[Predictions]], replicates: int = 1000, seed: int = 0
) -> dict[tuple[str, str, int], np.ndarray]:
    """{(method, state, k): (B,) AUC averaged over the method's seeds} on shared resampled tasks.

    All predictions must cover the same query samples in the same order (one split of one data
    build); the bootstrap resamples tasks within each state.
    """
    first = next(iter(runs.values()))[0]
    for method, preds in runs.items():
        for p in preds:
            if not (np.array_equal(p.task_ids, first.task_ids) and np.array_equal(p.label, first.label)):
                raise ValueError(f"{method}: predictions cover other query samples than {next(iter(runs))}'s")
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str, int], np.ndarray] = {}
    for code, state in enumerate(STATES):
        in_state = first.state == code
        if not in_state.any():
            continue
        names, index = np.unique(first.task_ids[in_state], return_inverse=True)
        weights = task_weights(index, len(names), replicates, rng)
        labels = first.label[in_state]
        for method, preds in runs.items():
            for k in preds[0].logits:
                aucs = [weighted_auc(p.logits[k][in_state], labels, weights) for p in preds]
                out[(method, state, k)] = np.mean(aucs, axis=0)
    return out
