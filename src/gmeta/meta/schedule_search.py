"""Choosing an ``AdaptationSchedule`` on the validation split (``adaptation.mode=auto``).

For every support-size bucket (bounds ``support_sizes``, e.g. 1, 2, 3, 5, 10, 20) and every inner loop
of a grid (steps x lr x adapted groups) plus "no adaptation", the validation tasks are scored as a
new user of that bucket would be: truncated to their first k support samples (k = the bucket's lower
bound; the last bucket keeps each task's whole support set and only tasks that reach the bound).
A bucket takes the setting with the best mean AUC over the cold-start states among those that do
not lower any state's AUC below no adaptation by more than ``tolerance``: so adaptation is chosen
only where it helps on validation, at every k ("adaptation that never hurts"). With ``per_state``,
each cold-start state also gets its own buckets, chosen by its own AUC under the same rule (from the
same pass: every state's AUC of every grid point is measured anyway).

The meta-learner and the fine-tuned plain baseline are tuned by the same grid on the same split,
which is what makes their comparison fair (``scripts/compare.py``). One pass over the validation
batches evaluates the whole grid; every rank runs the same loop (metrics sync in ``compute``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gmeta.data.batch import TaskBatch, truncate_support
from gmeta.errors import ConfigError
from gmeta.meta.schedule import AdaptationSchedule, InnerSetting, ScheduleEntry
from gmeta.metrics import ColdStartMetrics

if TYPE_CHECKING:
    from gmeta.meta.module import MetaDLRMModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """What ``search_schedule`` tries: buckets and the grid of inner loops (the ``adaptation`` config)."""

    support_sizes: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    steps: tuple[int, ...] = (1, 3, 5)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    groups: tuple[tuple[str, ...], ...] = (("bottom", "top"), ("top",))
    tolerance: float = 0.0
    per_state: bool = False

    def __post_init__(self) -> None:
        sizes = list(self.support_sizes)
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ConfigError(f"adaptation.support_sizes must be increasing integers >= 1, got {sizes}")
        if not self.steps or not self.lrs or not self.groups:
            raise ConfigError("adaptation.steps, adaptation.lrs and adaptation.groups must not be empty")

    def settings(self) -> list[InnerSetting]:
        """The grid, "no adaptation" first."""
        grid = [InnerSetting(0, 1.0, ())]
        for steps, lr, groups in itertools.product(self.steps, self.lrs, self.groups):
            if steps > 0:
                grid.append(InnerSetting(int(steps), float(lr), tuple(groups)))
        return grid

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SearchSpace:
        return cls(
            support_sizes=tuple(int(k) for k in cfg.get("support_sizes", cls.support_sizes)),
            steps=tuple(int(s) for s in cfg.get("steps", cls.steps)),
            lrs=tuple(float(x) for x in cfg.get("lrs", cls.lrs)),
            groups=tuple(tuple(g) for g in cfg.get("groups", cls.groups)),
            tolerance=float(cfg.get("tolerance", cls.tolerance)),
            per_state=bool(cfg.get("per_state", cls.per_state)),
        )


def _mean_auc(per_state: dict[str, dict[str, float]]) -> float:
    aucs = [v["auc"] for v in per_state.values() if not math.isnan(v["auc"])]
    return sum(aucs) / len(aucs) if aucs else math.nan


def choose(
    candidates: Sequence[tuple[InnerSetting, dict[str, dict[str, float]]]], tolerance: float
) -> tuple[InnerSetting, float]:
    """The best setting by mean AUC over states among those no worse than the first candidate (no
    adaptation) in any state by more than ``tolerance``; the first candidate if none is better. A
    NaN AUC where no adaptation has one (diverged logits) counts as worse."""
    base_setting, base = candidates[0]
    best, best_score = base_setting, _mean_auc(base)
    for setting, per_state in candidates[1:]:
        score = _mean_auc(per_state)
        never_hurts = all(
            per_state.get(s, {}).get("auc", math.nan) >= v["auc"] - tolerance
            for s, v in base.items()
            if not math.isnan(v["auc"])
        )
        if never_hurts and score > best_score:
            best, best_score = setting, score
    return best, best_score


@torch.no_grad()
def search_schedule(
    model: MetaDLRMModule, batches: Iterable[TaskBatch], space: SearchSpace
) -> tuple[AdaptationSchedule, list[dict[str, Any]]]:
    """Choose a schedule for ``model`` on ``batches`` (the validation split).

    Returns the schedule and one record per (bucket, setting): ``{"min_support", "setting",
    "mean_auc", "chosen", "chosen_for" (the states that took it, with ``per_state``), <state>: auc,
    ...}`` (what the log and the report show).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    grid = space.settings()
    sizes = space.support_sizes
    metrics = {(k, i): ColdStartMetrics().to(device) for k in sizes for i in range(len(grid))}
    try:
        for batch in batches:
            batch = batch.to(device)
            n_support = batch.support.mask.sum(1)
            for j, k in enumerate(sizes):
                last = j == len(sizes) - 1
                # compact: the inner loop runs over k support columns, not the longest task's
                view = batch if last else truncate_support(batch, k, compact=True)
                lookup = model.embedding.lookup(view)
                tasks = batch.task_mask & (n_support >= k)
                q = view.query
                for i, setting in enumerate(grid):
                    logits = model.learner.predict_with(setting, view, lookup)
                    metrics[(k, i)].update(logits, q.label, q.mask, view.state, tasks)
    finally:
        model.train(was_training)
    entries: list[ScheduleEntry] = []
    by_state: dict[str, list[ScheduleEntry]] = {}
    records = []
    for k in sizes:
        results = [(setting, metrics[(k, i)].compute()) for i, setting in enumerate(grid)]
        chosen, _ = choose(results, space.tolerance)
        entries.append(ScheduleEntry(k, chosen))
        chosen_for: dict[InnerSetting, list[str]] = {}
        if space.per_state:
            states = [s for s, v in results[0][1].items() if not math.isnan(v["auc"])]
            for state in states:
                mine, _ = choose([(setting, {state: r[state]}) for setting, r in results], space.tolerance)
                by_state.setdefault(state, []).append(ScheduleEntry(k, mine))
                chosen_for.setdefault(mine, []).append(state)
        for setting, per_state in results:
            records.append(
                {
                    "min_support": k,
                    "setting": setting.label(),
                    "mean_auc": _mean_auc(per_state),
                    "chosen": setting == chosen,
                    "chosen_for": chosen_for.get(setting, []),
                    **{s: v["auc"] for s, v in per_state.items()},
                }
            )
    schedule = AdaptationSchedule(tuple(entries), {s: tuple(e) for s, e in by_state.items()})
    log.info("adaptation schedule chosen on validation: %s", schedule.describe())
    return schedule, records
