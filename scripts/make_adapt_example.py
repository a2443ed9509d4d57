"""Write a `gmeta adapt` example from MovieLens-1M: one test user's support rows, candidates, item table.

    python scripts/make_adapt_example.py [--out data/adapt_example] [--state user_cold] [--user ID] [--users N]

Rebuilds the tasks of the shard folder (same source, task config and seed as its manifest), picks
test task(s) of the given cold-start state and writes, into ``--out``:

* ``support.csv``    the users' support interactions, every schema column (label = raw rating);
* ``candidates.csv`` user_id + item_id of each user's held-out query items (what `gmeta adapt` scores);
* ``items.csv``      the item table (item_id, release_year, genre, year_norm) to fill candidate features;
* ``truth.csv``      the held-out ratings of the candidates, to compare the scores against.

Needs the MovieLens cache (``make data``). Nothing here is committed: MovieLens may not be redistributed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITEM_COLUMNS = ["item_id", "release_year", "genre", "year_norm"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "movielens1m_train_window" / "shards")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "movielens")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "adapt_example")
    p.add_argument("--state", default="user_cold", help="cold-start state of the test task(s)")
    p.add_argument("--user", default=None, help="a user id (default: the first test task(s) of --state)")
    p.add_argument("--users", type=int, default=1, help="how many users (ignored with --user)")
    args = p.parse_args(argv)

    from gmeta.data.shards import read_manifest
    from gmeta.data.sources.movielens import MovieLensSource
    from gmeta.data.tasks import TaskConfig, build_tasks

    manifest = read_manifest(args.data_dir)
    if manifest.data.get("source", {}).get("source") != "movielens1m":
        print(f"{args.data_dir}: not MovieLens-1M shards", file=sys.stderr)
        return 2
    df, schema = MovieLensSource(args.cache_dir, fetch=False).load()
    cfg = TaskConfig(**manifest.data["task_config"])
    splits = build_tasks(df, schema, cfg, seed=int(manifest.data.get("seed", 0)))
    if splits.schema.to_dict() != manifest.schema.to_dict():
        print(f"rebuilt tasks do not match {args.data_dir}: rebuild the shards", file=sys.stderr)
        return 2
    tasks = [t for t in splits.rows["test"] if t.endswith(f"/{args.state}")]
    if args.user is not None:
        tasks = [t for t in tasks if t.split("/")[0] == args.user]
        if not tasks:
            print(f"user {args.user!r} has no {args.state} test task", file=sys.stderr)
            return 2
    else:
        tasks = tasks[: args.users]
    support_parts, query_parts = [], []
    for t in tasks:
        sup, qry = splits.rows["test"][t]
        support_parts.append(df.iloc[sup])
        query_parts.append(df.iloc[qry])
    import pandas as pd

    support = pd.concat(support_parts)
    query = pd.concat(query_parts)
    args.out.mkdir(parents=True, exist_ok=True)
    support.to_csv(args.out / "support.csv", index=False)
    query[["user_id", "item_id"]].to_csv(args.out / "candidates.csv", index=False)
    df[ITEM_COLUMNS].drop_duplicates("item_id").to_csv(args.out / "items.csv", index=False)
    truth = query[["user_id", "item_id", "rating"]].assign(
        liked=(query["rating"] >= cfg.label_threshold).astype(int)
    )
    truth.to_csv(args.out / "truth.csv", index=False)
    print(
        f"wrote {args.out}/: support.csv ({len(support)} rows), candidates.csv ({len(query)} rows), "
        f"items.csv, truth.csv for {len(tasks)} {args.state} test user(s): {[t.split('/')[0] for t in tasks]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
