"""The ``gmeta`` command line: ``gmeta adapt`` scores candidate items for new users (``gmeta.serving``);
``gmeta export`` writes a sharded checkpoint directory as one checkpoint file.

    gmeta adapt --ckpt logs/movielens_maml/runs/<ts>/checkpoints/last.ckpt \\
        --support support.csv --candidates candidates.csv [--items items.csv] \\
        [--user-columns gender,age,occupation,zip3] [--data-dir data/movielens1m/shards] [--out scores.csv]

    gmeta export --ckpt logs/.../checkpoints/last.ckpt --out model.ckpt

Training and evaluation stay Hydra entry points (``train.py`` / ``eval.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gmeta.data.schema import SchemaError
from gmeta.errors import report_user_errors

#: Scores are float32 probabilities: 7 significant digits keep them to within 5e-8.
FLOAT_FORMAT = "%.7g"


def _adapt_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a trained model to new users on their support interactions and score candidates",
        description=(
            "Adapt a trained meta-DLRM to each user in --candidates on that user's rows in --support "
            "(the inner loop of evaluation), then score the user's candidate items. Writes one row per "
            "candidate, in input order: user key, item, score (probability after adaptation), "
            "score_plain (without adaptation), rank (1 = best for that user), support_size, adapted, "
            "user_known."
        ),
    )
    p.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint (.ckpt) of a gmeta run")
    p.add_argument(
        "--support",
        required=True,
        type=Path,
        help="labelled interactions of the users (CSV/TSV/Parquet/JSON/JSONL with the schema's columns)",
    )
    p.add_argument(
        "--candidates",
        required=True,
        type=Path,
        help="rows to score: user key + item + every feature column (see --items / --user-columns); no label",
    )
    p.add_argument("--out", type=Path, default=None, help="output CSV (default: print to stdout)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="shard folder the model was trained on (manifest.json + vocab.parquet); default: found from the "
        "checkpoint's run directory",
    )
    p.add_argument(
        "--items",
        type=Path,
        default=None,
        help="item table (item column + item feature columns) joined onto the candidates",
    )
    p.add_argument(
        "--user-columns",
        default="",
        help="comma-separated user feature columns copied from each user's support rows onto the candidates",
    )
    p.add_argument(
        "--key", default=None, help="column grouping rows into users (default: the schema's task key)"
    )
    p.add_argument(
        "--item-column", default=None, help="item column (default: the training task config's item key)"
    )
    p.add_argument(
        "--label-threshold",
        default="training",
        help="label = raw label >= this; 'training' (default) uses the training data's threshold, "
        "'none' expects 0/1 labels",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-users", type=int, default=256, help="users per inner-loop batch (default 256)")
    p.add_argument("--no-plain", action="store_true", help="do not compute score_plain")
    p.set_defaults(func=adapt)


def adapt(args: argparse.Namespace) -> int:
    """``gmeta adapt``: returns the exit status."""
    from gmeta.serving.adapter import FewShotAdapter  # torch: load late
    from gmeta.serving.inputs import read_table

    raw: str = args.label_threshold  # argparse gives text
    threshold: float | None | str = raw
    if raw.lower() == "none":
        threshold = None
    elif raw != "training":
        try:
            threshold = float(raw)
        except ValueError:
            raise SchemaError(
                f"--label-threshold: expected a number, 'none' or 'training', got {raw!r}"
            ) from None
    adapter = FewShotAdapter.from_checkpoint(
        args.ckpt,
        data_dir=args.data_dir,
        device=args.device,
        batch_users=args.batch_users,
        label_threshold=threshold,
    )
    key = args.key or adapter.schema.task_key
    item_column = args.item_column or adapter.encoder.item_key
    id_columns = adapter.id_columns(key) + ([item_column] if item_column else [])
    support = read_table(args.support, id_columns)
    candidates = read_table(args.candidates, id_columns)
    user_columns = [c.strip() for c in args.user_columns.split(",") if c.strip()]
    items = read_table(args.items, id_columns) if args.items is not None else None
    if items is not None or user_columns:
        candidates = adapter.fill_candidates(
            candidates,
            support,
            items=items,
            user_columns=user_columns,
            key=key,
            item_key=item_column,
            names=(str(args.candidates), str(args.support), str(args.items)),
        )
    scores = adapter.score(
        support,
        candidates,
        key=key,
        plain=not args.no_plain,
        item_column=item_column,
        names=(str(args.support), str(args.candidates)),
    )
    if args.out is None:
        scores.to_csv(sys.stdout, index=False, float_format=FLOAT_FORMAT)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(args.out, index=False, float_format=FLOAT_FORMAT)
    users = scores[key].nunique()
    adapted_users = scores.loc[scores["adapted"], key].nunique()
    print(
        f"scored {len(scores)} candidates for {users} user(s) ({adapted_users} adapted on their support rows, "
        f"{users - adapted_users} without support: plain scores)" + (f" -> {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="consolidate a sharded checkpoint directory into one checkpoint file",
        description=(
            "Read a sharded checkpoint (a directory written by HybridParallelStrategy with "
            "checkpoint_format=sharded) whole and write it as ONE ordinary Lightning checkpoint file with full "
            "tables, vocabulary and task config included, for eval.py, gmeta adapt or any single process. "
            "Needs memory for the whole model."
        ),
    )
    p.add_argument(
        "--ckpt", required=True, type=Path, help="sharded checkpoint directory (e.g. .../last.ckpt/)"
    )
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    """``gmeta export``: returns the exit status."""
    from gmeta.parallel.sharded_checkpoint import CheckpointError, export_checkpoint  # torch: load late

    if not args.ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    try:
        out = export_checkpoint(args.ckpt, args.out)
    except CheckpointError as e:
        print(f"gmeta export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmeta", description="gmeta: meta-learning DLRM tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _adapt_parser(sub)
    _export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gmeta`` console script; user errors (``gmeta.errors``: bad input files,
    checkpoint, shards) print one message and exit 2; unexpected errors keep their traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return report_user_errors(lambda: args.func(args), f"gmeta {args.command}")
    except SystemExit as e:  # a user error: the message is printed; return its status
        assert e.code is not None  # report_user_errors exits with USER_ERROR_EXIT
        return int(e.code)


if __name__ == "__main__":
    sys.exit(main())
