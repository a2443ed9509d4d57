"""Checkpoint save/load of a row-sharded table: sharded (DCP, each rank its rows) vs gathered (one file).

For each table size (``--rows``, dim ``--dim``, float32, row-wise Adagrad) and each design, starts
``--world`` gloo processes (this script) that build the table per rank, then

* ``gathered`` (``checkpoint_format=full``, the only format before issue 11): every rank gathers the
  whole table and its Adagrad state (all_gather), rank 0 writes one file (torch.save + fsync); to
  load, every rank reads the whole file and keeps its rows;
* ``sharded`` (``checkpoint_format=sharded``): every rank writes its own rows through
  ``torch.distributed.checkpoint`` into one directory (``parallel/sharded_checkpoint.py``); to load,
  every rank reads only its rows.

Reports per design and size: save and load wall time (slowest rank), bytes written per rank, and
the peak resident memory each phase added on the worst rank (``VmHWM`` of ``/proc/self/status``,
reset before each phase through ``/proc/self/clear_refs``). Loads read what the save just wrote, so
mostly from the page cache. Output: a table, then one JSON line per design and size.

    .venv/bin/python scripts/bench_checkpoint.py                       # 4M and 16M rows, 2 processes
    .venv/bin/python scripts/bench_checkpoint.py --rows 1000000 --world 4
    .venv/bin/python scripts/bench_checkpoint.py --rows 16000000 --designs sharded

The gathered design needs about 3x the table per rank while saving (its rows, the all_gather
buffers, the assembled table): at 16M rows x 64 on 2 ranks that is ~12 GB per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_ranks import Column, emit_json_lines, print_table, run_ranks

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("gathered", "sharded")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[4_000_000, 16_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--json-out", type=Path, default=None, help="also append the JSON lines here")
    p.add_argument("--design", default=None, help=argparse.SUPPRESS)  # set for the workers
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# -- one rank -------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def run_rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    sys.path.insert(0, str(ROOT / "src"))
    from gmeta.model.embedding import EmbeddingCollection
    from gmeta.model.row_init import fill_normal_rows_
    from gmeta.parallel.comm import Communicator, shutdown_process_group
    from gmeta.parallel.sharded_checkpoint import load_sharded_into, save_sharded
    from gmeta.parallel.sharded_embedding import ShardedEmbeddingCollection, gathered_state_dict

    dist.init_process_group("gloo")
    comm = Communicator()
    rows = args.rows[0]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            table = EmbeddingCollection((rows,), 1, args.dim, init_seed=1, device="meta")
            self.embedding = ShardedEmbeddingCollection(table, comm)  # only this rank's rows
            self.tower = nn.Linear(args.dim, 1)

    model = Model()
    path = args.dir / ("ckpt" if args.design == "sharded" else "ckpt.pt")
    out: dict[str, Any] = {}

    comm.barrier("start")
    base = _reset_peak()
    t0 = time.perf_counter()
    if args.design == "sharded":
        save_sharded({"state_dict": model.state_dict(), "epoch": 0}, path, model, comm)
        mine = path / f"__{comm.rank}_0.distcp"
        out["bytes_written"] = mine.stat().st_size + (
            sum(f.stat().st_size for f in path.iterdir() if not f.name.endswith(".distcp"))
            if comm.rank == 0
            else 0
        )
    else:
        state = gathered_state_dict(model, model.state_dict())  # every rank: the whole table
        if comm.rank == 0:
            with open(path, "wb") as f:
                torch.save({"state_dict": state, "epoch": 0}, f)
                f.flush()
                os.fsync(f.fileno())
        del state
        comm.barrier("saved")
        out["bytes_written"] = path.stat().st_size if comm.rank == 0 else 0
    comm.barrier("save done")
    out["save_s"] = time.perf_counter() - t0
    out["save_peak_added"] = _status_kb("VmHWM") * 1024 - base

    with torch.no_grad():
        model.embedding.weight.zero_()  # what the load restores
    comm.barrier("before load")
    base = _reset_peak()
    t0 = time.perf_counter()
    if args.design == "sharded":
        model.load_state_dict(load_sharded_into(model, path)["state_dict"])
    else:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    comm.barrier("load done")
    out["load_s"] = time.perf_counter() - t0
    out["load_peak_added"] = _status_kb("VmHWM") * 1024 - base
    out["local_table_bytes"] = sum(t.numel() * t.element_size() for t in model.embedding.row_state().values())
    # nothing was trained, so the loaded rows must be the initial ones: check 1000 against a rebuild
    table = model.embedding
    probe = table.global_rows()[:1000]
    ref = fill_normal_rows_(
        torch.empty(probe.shape[0], args.dim), table.init_seed, table.offsets, probe, table.init_std
    )
    out["rows_ok"] = bool(torch.equal(model.embedding.weight[: probe.shape[0]], ref))
    args.result.with_suffix(f".rank{comm.rank}.json").write_text(json.dumps(out))
    shutdown_process_group()


# -- the launcher ---------------------------------------------------------------------------------


def launch(args: argparse.Namespace, rows: int, design: str, workdir: Path) -> list[dict[str, Any]]:
    result = workdir / f"result_{design}_{rows}"
    cmd = [__file__, "--rows", str(rows), "--dim", str(args.dim), "--world", str(args.world)]
    cmd += ["--design", design, "--dir", str(workdir), "--result", str(result)]
    run_ranks(cmd, args.world, deadline_s=3600, what=f"{design}, {rows} rows")
    return [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(args.world)]


def main() -> None:
    args = parse_args()
    if args.rank is not None:
        run_rank(args)
        return
    lines = []
    for rows in args.rows:
        for design in args.designs:
            workdir = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
            try:
                ranks = launch(args, rows, design, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            table_bytes = rows * args.dim * 4 + rows * 4  # weights + one Adagrad accumulator per row
            lines.append(
                {
                    "bench": "checkpoint",
                    "design": design,
                    "rows": rows,
                    "dim": args.dim,
                    "world": args.world,
                    "table_bytes": table_bytes,
                    "save_s": max(r["save_s"] for r in ranks),
                    "load_s": max(r["load_s"] for r in ranks),
                    "bytes_written_per_rank": [r["bytes_written"] for r in ranks],
                    "save_peak_added_max": max(r["save_peak_added"] for r in ranks),
                    "load_peak_added_max": max(r["load_peak_added"] for r in ranks),
                    "rows_ok": all(r["rows_ok"] for r in ranks),
                }
            )
    gib = 2**30
    print(f"\n{args.world} gloo processes, dim {args.dim}, float32 + row-wise Adagrad")
    columns = [
        Column("rows", 11, ","),
        Column("design", 9, align="<"),
        Column("save s", 7, ".1f"),
        Column("load s", 7, ".1f"),
        Column("written/rank GiB", 22),
        Column("save +peak GiB", 15, ".2f"),
        Column("load +peak GiB", 15, ".2f"),
    ]
    print_table(
        columns,
        [
            (
                line["rows"],
                line["design"],
                line["save_s"],
                line["load_s"],
                "/".join(f"{b / gib:.2f}" for b in line["bytes_written_per_rank"]),
                line["save_peak_added_max"] / gib,
                line["load_peak_added_max"] / gib,
            )
            for line in lines
        ],
    )
    print()
    emit_json_lines(lines, args.json_out)


if __name__ == "__main__":
    main()
