"""Communication of one meta-step under HybridParallelStrategy, measured, against a naive design.

Runs ``--steps`` real training meta-steps of an experiment (default ``movielens_maml``, the README's
default) on ``--world`` gloo processes (this script starts them), with every collective recorded by
the strategy's ``Communicator.audit``, and reports per rank and step: collectives and payload bytes
per tag, and the step time.

The naive design is computed from the SAME batches (what the step would move if it were built the
straightforward way): support and query looked up in two separate exchanges (each: sizes, ids,
rows), a dense AllReduce after every inner step (as when the inner loop runs through a DDP-wrapped
model) plus the outer one, and the row gradients of the support and the query lookups sent back
separately. Its bytes use the same accounting (payload sent by this rank, self-sends included).

Run::

    .venv/bin/python scripts/bench_comm.py                      # movielens_maml, 2 processes
    .venv/bin/python scripts/bench_comm.py --world 4 --steps 20 --override data.batch_tasks=64

Needs the MovieLens shards (``make data``) for the default experiment; ``--experiment
synthetic_maml`` runs without them. Output: a table, then one JSON line per design.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench_ranks import Column, emit_json_lines, print_table, run_ranks

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="movielens_maml")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--json-out", type=Path, default=None, help="also append the JSON lines here")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # set for the workers
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# -- one rank ----------------------------------------------------------------------------------------


def naive_step_bytes(module: Any, batch: Any, inner_steps: int, row_bytes: int, dense_bytes: int) -> dict:
    """Bytes and collectives this rank would move for ``batch`` in the naive design."""
    from gmeta.data.batch import TaskBatch

    emb = module.embedding
    sizes = {}
    for which in ("support", "query"):
        s = getattr(batch, which)
        unique, _, _ = emb.index(TaskBatch(s, s, batch.state, batch.task_mask, batch.task_ids))
        sizes[which] = int(unique.numel())
    w = emb.world_size
    lookups = sum(8 * w + 8 * u + row_bytes * u for u in sizes.values())  # sizes + ids + rows, per set
    grads = sum(row_bytes * u for u in sizes.values())
    dense = dense_bytes * (inner_steps + 1)
    return {
        "collectives": 3 * 2 + (inner_steps + 1) + 2,
        "bytes": lookups + grads + dense,
        "unique_support": sizes["support"],
        "unique_query": sizes["query"],
    }


def run_rank(args: argparse.Namespace) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from gmeta.app import build_datamodule
    from gmeta.parallel import HybridParallelStrategy, shutdown_process_group

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={args.experiment}", *args.override])
    L.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg)  # rank 0 builds the shards, the other ranks wait for them
    module = instantiate(
        cfg.model, schema=datamodule.schema.to_dict(), meta=OmegaConf.to_container(cfg.meta), _convert_="all"
    )
    records: list[dict[str, Any]] = []

    class Audit(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            self._ctx = trainer.strategy.comm.audit()
            self._log = self._ctx.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            elapsed = time.perf_counter() - self._t0
            self._ctx.__exit__(None, None, None)
            dense_bytes = sum(p.numel() * p.element_size() for p in pl_module.dlrm.parameters())
            row_bytes = pl_module.embedding.dim * pl_module.embedding.weight.element_size()
            cfg_meta = pl_module.meta_config
            records.append(
                {
                    "step_s": elapsed,
                    "measured": [r.__dict__ for r in self._log],
                    "naive": naive_step_bytes(pl_module, batch, cfg_meta.inner_steps, row_bytes, dense_bytes),
                    "tasks": int(batch.task_mask.sum()),
                }
            )

    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.world,
        strategy=HybridParallelStrategy(process_group_backend="gloo", collective_timeout_s=300),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        inference_mode=False,
        callbacks=[Audit()],
    )
    trainer.fit(module, datamodule=datamodule)
    args.result.with_suffix(f".rank{args.rank}.json").write_text(json.dumps(records))
    shutdown_process_group()


# -- the launcher -----------------------------------------------------------------------------------


def launch(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    result = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_comm_{os.getpid()}"
    cmd = [__file__, "--experiment", args.experiment, "--world", str(args.world)]
    cmd += ["--steps", str(args.steps), "--result", str(result)]
    for o in args.override:
        cmd += ["--override", o]
    run_ranks(cmd, args.world, deadline_s=1800, quiet_others=True)
    out = []
    for r in range(args.world):
        path = result.with_suffix(f".rank{r}.json")
        out.append(json.loads(path.read_text()))
        path.unlink()
    return out


def summarize(args: argparse.Namespace, per_rank: list[list[dict[str, Any]]]) -> None:
    measured_tags: dict[str, list[int]] = {}
    per_step_bytes, per_step_naive, per_step_calls, naive_calls, step_s = [], [], [], [], []
    for steps in per_rank:
        for step in steps[1:] or steps:  # the first step includes warm-up: skip it when we can
            by_tag: dict[str, int] = {}
            for r in step["measured"]:
                by_tag[r["tag"]] = by_tag.get(r["tag"], 0) + r["bytes_sent"]
            for tag, b in by_tag.items():
                measured_tags.setdefault(tag, []).append(b)
            per_step_bytes.append(sum(by_tag.values()))
            per_step_calls.append(len(step["measured"]))
            per_step_naive.append(step["naive"]["bytes"])
            naive_calls.append(step["naive"]["collectives"])
            step_s.append(step["step_s"])
    print(f"\n{args.experiment}: {args.world} gloo processes, {args.steps} meta-steps (first skipped)")
    med = statistics.median
    print_table(
        [Column("tag", 16, align="<"), Column("bytes sent / rank / step (median)", 34, ",.0f")],
        [(tag, med(values)) for tag, values in measured_tags.items()],
    )
    rows = [
        ("gmeta", med(per_step_calls), med(per_step_bytes)),
        ("naive", med(naive_calls), med(per_step_naive)),
    ]
    print()
    print_table(
        [
            Column("design", 8, align="<"),
            Column("collectives/step", 17, ".0f"),
            Column("bytes/rank/step", 16, ",.0f"),
        ],
        rows,
    )
    print(f"naive/gmeta bytes: {rows[1][2] / rows[0][2]:.2f}x; median step {1000 * med(step_s):.1f} ms\n")
    lines = [
        {
            "bench": "comm",
            "experiment": args.experiment,
            "world": args.world,
            "design": name,
            "collectives_per_step": calls,
            "bytes_per_rank_step": b,
            **({"by_tag": {t: med(v) for t, v in measured_tags.items()}} if name == "gmeta" else {}),
        }
        for name, calls, b in rows
    ]
    emit_json_lines(lines, args.json_out)


def main() -> None:
    args = parse_args()
    if args.rank is not None:
        run_rank(args)
        return
    summarize(args, launch(args))


if __name__ == "__main__":
    main()
