"""How much a task adapts at evaluation, as a function of how many support interactions it has.

A fixed inner loop (say 3 steps at lr 0.3) takes steps of the same size whether a new user has one
rating or ninety: with one or two it over-fits them and the adapted predictions are worse than not
adapting at all (docs/results.md). An ``AdaptationSchedule`` gives each support-size bucket its own
inner loop (steps, lr, adapted groups; zero steps = do not adapt). ``gmeta.meta.schedule_search``
chooses one on the validation split, per data set, for the meta-learner and the fine-tuned baseline
alike; it is stored in the checkpoint and used by every adapted prediction (``MetaLearner.predict``).

Buckets: ``entries[i]`` applies to tasks with ``entries[i].min_support <= n < entries[i+1].min_support``
real support samples; a task with fewer than the first bound (n = 0 included) is not adapted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

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


@dataclass(frozen=True)
class AdaptationSchedule:
    """Inner loops per support-size bucket (see the module docstring); entries sorted by ``min_support``."""

    entries: tuple[ScheduleEntry, ...]

    def __post_init__(self) -> None:
        bounds = [e.min_support for e in self.entries]
        if not bounds or bounds[0] < 1 or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise ConfigError(f"schedule bounds must be strictly increasing integers >= 1, got {bounds}")

    @property
    def bounds(self) -> list[int]:
        return [e.min_support for e in self.entries]

    def bucket_of(self, support_sizes: Tensor) -> Tensor:
        """(T,) entry index per task, -1 below the first bound (not adapted)."""
        bounds = torch.tensor(self.bounds, device=support_sizes.device)
        return torch.bucketize(support_sizes, bounds, right=True) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": [
                {"min_support": e.min_support, **asdict(e.setting), "groups": list(e.setting.groups)}
                for e in self.entries
            ]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptationSchedule:
        try:
            return cls(
                tuple(
                    ScheduleEntry(
                        int(e["min_support"]),
                        InnerSetting(int(e["steps"]), float(e["lr"]), tuple(e["groups"])),
                    )
                    for e in data["entries"]
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed adaptation schedule {data!r}: {e}") from e

    def describe(self) -> str:
        """One line per bucket, e.g. ``support 1: 1 x 0.1 on top``."""
        lines = []
        for i, e in enumerate(self.entries):
            upper = self.entries[i + 1].min_support - 1 if i + 1 < len(self.entries) else None
            span = (
                f"{e.min_support}"
                if upper == e.min_support
                else f"{e.min_support}-{upper}"
                if upper is not None
                else f">={e.min_support}"
            )
            lines.append(f"support {span}: {e.setting.label()}")
        return "; ".join(lines)
