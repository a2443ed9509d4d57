"""Counting baselines per cold-start state: the AUC label rates alone reach (``gmeta.count_baselines``).

A floor for every trained model on the same query samples: the user's and the item's positive rates
on the train split (genres for items training never saw), and the task's own support rate. Several
shard folders side by side show what the data protocol gives (e.g. ``max_interactions_policy=drop``
against ``train_window``: the same evaluation tasks, more training users known). With
``--predictions`` (a trained model's ``predictions_<split>_*.npz`` from ``scripts/compare.py``, the
same split and data build) it also scores the model unadapted, and its logit plus the counted
log-odds: how much the model adds to the counts. Prints a table and one JSON line.

    .venv/bin/python scripts/count_baselines.py --split test \\
        --data-dir data/movielens1m/shards --data-dir data/movielens1m_train_window/shards
    .venv/bin/python scripts/count_baselines.py --split test \\
        --predictions logs/compare/<out>/runs/maml/seed_1/predictions_test_auto_per_state.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gmeta.compare import Predictions
from gmeta.count_baselines import MODEL_PREDICTORS, PREDICTORS, score_split

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", action="append", help="shard folder (repeat to compare; default: the experiments')"
    )
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--prior", type=float, default=5.0, help="pseudo-interactions at the global rate")
    p.add_argument(
        "--predictions",
        action="append",
        default=[],
        help="a model's saved predictions of --split (repeat for several; needs one --data-dir)",
    )
    args = p.parse_args(argv)
    # default: the shards `make data` builds for the experiments
    dirs = args.data_dir or [str(ROOT / "data" / "movielens1m_train_window" / "shards")]
    if args.predictions and len(dirs) != 1:
        p.error("--predictions scores the model against one --data-dir (the build it was scored on)")
    results = {d: score_split(d, args.split, args.prior) for d in dirs}
    results.update(
        {
            path: score_split(dirs[0], args.split, args.prior, Predictions.load(path))
            for path in args.predictions
        }
    )
    for key, by_state in results.items():
        names = PREDICTORS + (MODEL_PREDICTORS if key in args.predictions else ())
        print(f"\n{key} ({args.split} split, AUC of pooled query samples)")
        print(f"| state | known users | {' | '.join(names)} |")
        print("|---|---|" + "---|" * len(names))
        for state, r in by_state.items():
            cells = " | ".join(f"{r[name]:.4f}" for name in names)
            print(f"| {state} | {r['known_user_share']:.1%} | {cells} |")
    print(json.dumps({"count_baselines": {"split": args.split, "prior": args.prior, "results": results}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
