"""Counting baselines per cold-start state: the AUC label rates alone reach (``gmeta.count_baselines``).

A floor for every trained model on the same query samples: the user's and the item's positive rates
on the train split (genres for items training never saw), and the task's own support rate. Several
shard folders side by side show what the data protocol gives (e.g. ``max_interactions_policy=drop``
against ``train_window``: the same evaluation tasks, more training users known). Prints a table and
one JSON line.

    .venv/bin/python scripts/count_baselines.py --split test \\
        --data-dir data/movielens1m/shards --data-dir data/movielens1m_train_window/shards
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gmeta.count_baselines import PREDICTORS, score_split

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", action="append", help="shard folder (repeat to compare; default: the experiments')"
    )
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--prior", type=float, default=5.0, help="pseudo-interactions at the global rate")
    args = p.parse_args(argv)
    # default: the shards `make data` builds for the experiments
    dirs = args.data_dir or [str(ROOT / "data" / "movielens1m_train_window" / "shards")]
    results = {d: score_split(d, args.split, args.prior) for d in dirs}
    for d, by_state in results.items():
        print(f"\n{d} ({args.split} split, AUC of pooled query samples)")
        print(f"| state | known users | {' | '.join(PREDICTORS)} |")
        print("|---|---|" + "---|" * len(PREDICTORS))
        for state, r in by_state.items():
            cells = " | ".join(f"{r[name]:.4f}" for name in PREDICTORS)
            print(f"| {state} | {r['known_user_share']:.1%} | {cells} |")
    print(json.dumps({"count_baselines": {"split": args.split, "prior": args.prior, "results": results}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
