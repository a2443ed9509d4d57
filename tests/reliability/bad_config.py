"""The config part of the bad-input corpus: Hydra overrides that must stop with a message (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigCase:
    """Overrides of ``conf/train.yaml``; composing them and instantiating ``target`` must fail with ``message``."""

    id: str
    what: str
    overrides: tuple[str, ...]
    message: str
    target: str = "data.task_config"  # the config node instantiated (after composition)


CONFIG_CASES: list[ConfigCase] = [
    ConfigCase(
        "unknown-key",
        "an override of a key that does not exist",
        ("data.task_config.min_interaction=5",),
        r"Could not override 'data.task_config.min_interaction'",
    ),
    ConfigCase(
        "unknown-option",
        "a config group option that does not exist",
        ("data=nope",),
        r"Could not find 'data/nope'",
    ),
    ConfigCase(
        "override-syntax",
        "an override that does not parse",
        ("data.task_config.min_interactions=[1",),
        r"no viable alternative at input '\[1'",
    ),
    ConfigCase(
        "tabular-without-path",
        "data=tabular without data.source.path",
        ("data=tabular",),
        r"Missing mandatory value: (data.)?source.path",
        target="data.source",
    ),
    ConfigCase(
        "appended-typo",
        "a misspelt task-config key appended with +",
        ("+data.task_config.max_interaction=5",),
        r"TaskConfig.*unexpected keyword argument 'max_interaction'",
    ),
    ConfigCase(
        "bad-policy",
        "max_interactions_policy that is none of drop, window, train_window",
        ("data.task_config.max_interactions_policy=cut",),
        r"max_interactions_policy must be one of \('drop', 'window', 'train_window'\), got 'cut'",
    ),
    ConfigCase(
        "bad-threshold",
        "label_threshold that is not a number, auto or null",
        ("data.task_config.label_threshold=high",),
        r"label_threshold must be a number, 'auto' \(0/1 labels\) or null",
    ),
    ConfigCase(
        "query-not-below-min",
        "min_interactions not above query_size",
        ("data.task_config.min_interactions=5", "data.task_config.query_size=5"),
        r"min_interactions \(5\) must exceed query_size \(5\)",
    ),
    ConfigCase(
        "max-below-min",
        "max_interactions below min_interactions",
        ("data.task_config.max_interactions=5",),
        r"max_interactions \(5\) must be >= min_interactions \(13\)",
    ),
    ConfigCase(
        "bad-query-selection",
        "query_selection that is neither last nor random",
        ("data.task_config.query_selection=first",),
        r"query_selection must be 'last' or 'random', got 'first'",
    ),
    ConfigCase(
        "zero-query",
        "query_size 0",
        ("data.task_config.query_size=0",),
        r"query_size must be >= 1, got 0",
    ),
    ConfigCase(
        "bad-verify-mode",
        "data.verify that is neither sizes nor full",
        ("data.verify=everything",),
        r"data.verify must be one of .*got 'everything'",
        target="data",
    ),
    ConfigCase(
        "bad-rank-split",
        "data.rank_split that is neither shards nor batches",
        ("data.rank_split=users",),
        r"rank_split must be one of .*got 'users'",
        target="data",
    ),
    ConfigCase(
        "bad-item-rule",
        "new_item_rule without min_value or quantile",
        ("~data.task_config.new_item_rule.min_value",),
        r"new_item_rule must be \{column, min_value\} or \{quantile\}",
    ),
]
