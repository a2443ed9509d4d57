"""How much a task adapts at evaluation, as a function of how many support interactions it has.

A fixed inner loop (say 3 steps at lr 0.3) takes steps of the same size whether a new user has one
rating or ninety: with one or two it over-fits them and the adapted predictions are worse than not
adapting at all (docs/results.md). An ``AdaptationSchedule`` gives each support-size bucket its own
inner loop (steps, lr, adapted groups; zero steps = do not adapt). ``gmeta.meta.schedule_search``
chooses one on the validation split, per data set, for the meta-learner and the fine-tuned baseline
alike; it is stored in the checkpoint and used by every adapted prediction (``MetaLearner.predict``).

Buckets: ``entries[i]`` applies to tasks with ``entries[i].min_support <= n < entries[i+1].min_support``
real support samples; a task with fewer than the first bound (n = 0 included) is not adapted.

Per cold-start state (optional, ``by_state``): a state's own buckets replace ``entries`` for its tasks.
How much a few ratings should move the model differs by state (a new user rating new items gains from
large steps where a known user loses), and the state is known when a task is scored: evaluation tasks
carry it, and serving knows whether the user is new (``gmeta.serving.user_tasks``: warm or user_cold).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from gmeta.data.schema import STATES
from gmeta.errors import ConfigError
from gmeta.meta.config import PARAM_GROUPS

#: the checkpoint key holding ``AdaptationSchedule.to_dict()``
SCHEDULE_KEY = "adaptation_schedule"


@dataclass(frozen=True)
class InnerSetting:
    """One inner loop: ``steps`` SGD steps at ``lr`` on ``groups`` (0 steps: no adaptation)."""

    steps: int
    lr: float
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.lr > 0:
            raise ConfigError(f"inner setting needs steps >= 0 and lr > 0, got {self}")
        unknown = sorted(set(self.groups) - set(PARAM_GROUPS))
        if unknown:
            raise ConfigError(f"inner setting groups {unknown} unknown; expected a subset of {PARAM_GROUPS}")
        object.__setattr__(self, "groups", tuple(self.groups))

    @property
    def adapts(self) -> bool:
        return self.steps > 0 and bool(self.groups)

    def label(self) -> str:
        return f"{self.steps} x {self.lr:g} on {'+'.join(self.groups)}" if self.adapts else "no adaptation"


@dataclass(frozen=True)
class ScheduleEntry:
    """The inner loop for tasks with at least ``min_support`` support samples (up to the next entry's)."""

    min_support: int
    setting: InnerSetting


Entries = tuple[ScheduleEntry, ...]


def _check_bounds(entries: Entries, where: str) -> None:
    bounds = [e.min_support for e in entries]
    if not bounds or bounds[0] < 1 or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        raise ConfigError(f"schedule bounds{where} must be strictly increasing integers >= 1, got {bounds}")


def _bucket_of(entries: Entries, support_sizes: Tensor) -> Tensor:
    bounds = torch.tensor([e.min_support for e in entries], device=support_sizes.device)
    return torch.bucketize(support_sizes, bounds, right=True) - 1


@dataclass(frozen=True)
class AdaptationSchedule:
    """Inner loops per support-size bucket (see the module docstring); entries sorted by ``min_support``.

    Attributes:
        entries: the buckets of every task whose state has none of its own.
        by_state: per state name (``schema.STATES``), buckets that replace ``entries`` for its tasks.
    """

    entries: Entries
    by_state: Mapping[str, Entries] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_bounds(self.entries, "")
        for state, entries in self.by_state.items():
            if state not in STATES:
                raise ConfigError(f"schedule for unknown state {state!r}; states: {list(STATES)}")
            _check_bounds(entries, f" of state {state}")

    @property
    def bounds(self) -> list[int]:
        return [e.min_support for e in self.entries]

    def bucket_of(self, support_sizes: Tensor) -> Tensor:
        """(T,) index into ``entries`` per task, -1 below the first bound (not adapted)."""
        return _bucket_of(self.entries, support_sizes)

    def settings_of(self, support_sizes: Tensor, states: Tensor) -> dict[InnerSetting, Tensor]:
        """Which tasks adapt with which inner loop: ``{setting: (T,) bool}`` over the settings that
        adapt (a task in none of the masks is not adapted). ``states``: (T,) ``STATES`` indices."""
        out: dict[InnerSetting, Tensor] = {}
        for s in states.unique().tolist():
            of_state = states == s
            entries = self.by_state.get(STATES[s], self.entries)
            bucket = _bucket_of(entries, support_sizes)
            for i in bucket[of_state].unique().tolist():
                setting = entries[i].setting if i >= 0 else None
                if setting is None or not setting.adapts:
                    continue
                chosen = of_state & (bucket == i)
                out[setting] = out[setting] | chosen if setting in out else chosen
        return out

    def to_dict(self) -> dict[str, Any]:
        def rows(entries: Entries) -> list[dict[str, Any]]:
            return [
                {"min_support": e.min_support, **asdict(e.setting), "groups": list(e.setting.groups)}
                for e in entries
            ]

        out: dict[str, Any] = {"entries": rows(self.entries)}
        if self.by_state:
            out["by_state"] = {state: rows(entries) for state, entries in self.by_state.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptationSchedule:
        def entries(rows: list[dict[str, Any]]) -> Entries:
            return tuple(
                ScheduleEntry(
                    int(e["min_support"]), InnerSetting(int(e["steps"]), float(e["lr"]), tuple(e["groups"]))
                )
                for e in rows
            )

        try:
            by_state = {str(s): entries(rows) for s, rows in (data.get("by_state") or {}).items()}
            return cls(entries(data["entries"]), by_state)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed adaptation schedule {data!r}: {e}") from e

    def describe(self) -> str:
        """One clause per bucket, e.g. ``support 1: 1 x 0.1 on top``; then each state's own."""
        text = _describe(self.entries)
        for state, entries in self.by_state.items():
            text += f" | {state}: {_describe(entries)}"
        return text


def _describe(entries: Entries) -> str:
    lines = []
    for i, e in enumerate(entries):
        upper = entries[i + 1].min_support - 1 if i + 1 < len(entries) else None
        span = (
            f"{e.min_support}"
            if upper == e.min_support
            else f"{e.min_support}-{upper}"
            if upper is not None
            else f">={e.min_support}"
        )
        lines.append(f"support {span}: {e.setting.label()}")
    return "; ".join(lines)
