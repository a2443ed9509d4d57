"""Training-step throughput of the meta-learning objectives (issue 4).

Builds ONE model (``EmbeddingCollection`` + ``DLRM``) and ONE list of task-grouped meta-batches
(``TaskBatch``) per config, then times, in the same process and on the same batches, the variants

* ``plain``       ``MetaLearner.loss`` with meta name ``none`` (plain DLRM training on all
  support+query samples, one forward over both sets; same kernels as the fast meta step);
* ``maml``        second-order MAML on the ``fast`` backend (``gmeta.meta.fast``);
* ``fomaml``      first-order MAML on the ``fast`` backend;
* ``maml_loop``   the MAML config on the ``reference`` backend: one Python iteration per task with
  ``torch.autograd.grad(create_graph=True)`` (the obvious implementation);
* ``maml_vmap`` / ``fomaml_vmap``  the same objectives on the ``vmap`` backend (the
  ``torch.func.vmap`` inner loop, the earlier implementation).

Variants run round-robin (one step of each per round) so machine drift hits them all equally.
A *step* is ``gmeta.meta.module.run_train_step``, the step ``MetaDLRMModule.training_step`` runs,
without Lightning: embedding lookup, loss, backward, Adam step on the dense params, row-wise
optimizer step on the looked-up rows.

Configs:

* ``criteo``: 26 sparse fields x ``--rows`` rows (default 100k on CPU, 1M on CUDA), dim 64, 13 dense
  fields, bottom MLP 256-64, top MLP 512-256-1 (``dot`` interaction, as the DLRM reference), Zipf-like
  random ids and random labels built directly as ``TaskBatch`` tensors; ``--tasks`` x (``--support`` +
  ``--query``) samples per meta-batch; MAML with ``conf/meta/maml.yaml``'s 1 inner step, lr 0.1.
* ``movielens``: the default MovieLens model (``conf/model/meta_dlrm.yaml`` +
  ``conf/experiment/movielens_maml.yaml``: dim 16, bottom [32], top [64, 32], concat, 3 inner steps,
  inner lr 0.3, support loss weight 1) on real training batches (32 tasks) streamed from
  ``data/movielens1m/shards``; skipped with a message when that folder is missing.

Reported per variant: ``samples_per_s`` (real support+query samples per step / median step time),
median ``step_ms`` over ``--steps`` timed steps after ``--warmup`` untimed ones, ``vs_plain_paired``
(the median over rounds of plain's step time / this variant's in the same round, on the same batch:
machine drift cancels out), ``gflop_per_step`` (matrix-product FLOPs of one step,
``torch.utils.flop_counter``), ``peak_tensor_mb`` (the largest total of tensors alive at once that one
step allocates, ``gmeta.tensor_memory.TensorMemoryTracker``: exact and repeatable) and ``peak_mem_mb``:
on CUDA ``torch.cuda.max_memory_allocated`` during one extra step minus the memory allocated before it;
on CPU the growth of the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) during one
extra step above the RSS before it, after ``malloc_trim(0)`` has handed glibc's free heap back to the
OS (allocator slack and the machine's state move it by tens of MB). Finally the ratios: samples/s
maml/plain, fomaml/plain, maml/maml_loop, maml/maml_vmap, fomaml/fomaml_vmap, maml_vmap/plain and
fomaml_vmap/plain; the paired maml/plain and fomaml/plain; the FLOP bound plain/variant GFLOP (what
the ratio would be if every step ran at the same FLOP rate); and peak tensor memory variant/plain.

Run (defaults finish in under 10 minutes on 2 CPU cores)::

    .venv/bin/python scripts/bench_train.py                      # criteo + movielens, CPU
    .venv/bin/python scripts/bench_train.py --config criteo --device cuda --json-out bench.jsonl

Output: a table, then one JSON line per (config, variant) and one ``ratios`` JSON line per config.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.config import MetaConfig
from gmeta.meta.learner import MetaLearner
from gmeta.meta.module import run_train_step
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingCollection
from gmeta.tensor_memory import TensorMemoryTracker

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_SHARDS = ROOT / "data" / "movielens1m" / "shards"
VARIANTS: tuple[str, ...] = ("plain", "maml", "fomaml", "maml_loop", "maml_vmap", "fomaml_vmap")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def trim_malloc() -> None:
    """Return glibc's free heap pages to the OS (``malloc_trim(0)``), so that RSS is close to the live
    memory before a measured step. No-op where unavailable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_heap_allocations() -> bool:
    """glibc: serve every allocation from the heap and keep freed memory there (``mallopt``).

    By default glibc maps each block over 32 MB with ``mmap`` and unmaps it when freed, so a
    step that allocates such tensors page-faults (and zero-fills) them again every step. Which
    variant pays that depends on tensor sizes, not on the algorithm: criteo's plain step does
    (its (8192, 27, 64) interaction tensors are 54 MB), the meta steps (4096-row sets, 27 MB) do not;
    that alone moved plain's step from 159 to 200 ms between runs. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_peak_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Extra memory (MiB) one call of ``fn`` needs above what was live before it (None if unknown)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    trim_malloc()
    if not _reset_hwm():
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def measure_tensor_peak_mb(fn: Callable[[], None]) -> float:
    """Largest total of tensor storages alive at once during ``fn`` (MiB), counting only what it
    allocates (``TensorMemoryTracker``): exact and repeatable, unlike the RSS figure."""
    gc.collect()
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak_mb


def measure_gflop(fn: Callable[[], None]) -> float:
    """Matrix-product FLOPs of one call (``torch.utils.flop_counter``: mm, bmm, addmm, baddbmm, ...),
    in GFLOP. Elementwise ops are not counted; they are a small share of these models' work."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------------------------------
# Model, batches, step
# --------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One config: the model, its optimizers, the batches and the meta configs of the variants."""

    name: str
    emb: EmbeddingCollection
    dlrm: DLRM
    opt: torch.optim.Optimizer
    batches: list[TaskBatch]
    metas: dict[str, MetaConfig]
    device: torch.device
    info: dict[str, Any]
    autocast: torch.dtype | None = None  # --precision bf16: the forward under torch.autocast

    @property
    def learners(self) -> dict[str, MetaLearner]:
        """One ``MetaLearner`` per variant, built once (as the LightningModule builds its own)."""
        if not hasattr(self, "_learners"):
            self._learners = {v: MetaLearner(self.dlrm, cfg) for v, cfg in self.metas.items()}
        return self._learners


def build_model(
    vocab_sizes: list[int],
    num_sparse: int,
    num_dense: int,
    dim: int,
    bottom: list[int],
    top: list[int],
    interaction: str,
    row_opt: dict[str, Any],
    init_std: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[EmbeddingCollection, DLRM, torch.optim.Optimizer]:
    row_opt = dict(row_opt)
    emb = EmbeddingCollection(
        vocab_sizes,
        num_sparse=num_sparse,
        dim=dim,
        init_std=init_std,
        optimizer=row_opt.pop("name"),
        optimizer_kwargs=row_opt,
        check_ids=True,
    ).to(device=device, dtype=dtype)
    dlrm = DLRM(len(vocab_sizes), num_dense, dim, bottom, top, interaction).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(dlrm.parameters(), lr=1e-3)
    return emb, dlrm, opt


def other_backends(metas: dict[str, MetaConfig]) -> dict[str, MetaConfig]:
    """``maml_loop`` (the reference backend) and ``maml_vmap`` / ``fomaml_vmap`` (the vmap backend):
    the ``maml`` / ``fomaml`` configs computed by the other backends."""
    out = {f"{v}_vmap": replace(metas[v], backend="vmap") for v in ("maml", "fomaml")}
    return {"maml_loop": replace(metas["maml"], backend="reference"), **out}


def real_samples(batch: TaskBatch) -> int:
    tm = batch.task_mask[:, None]
    return int((batch.support.mask & tm).sum()) + int((batch.query.mask & tm).sum())


def train_step(s: Setup, batch: TaskBatch, variant: str) -> float:
    """One training step, the one ``MetaDLRMModule.training_step`` runs (``run_train_step``), with the
    forward under autocast when ``s.autocast`` is set (as Lightning's bf16-mixed precision runs it)."""
    learner = s.learners[variant]
    with torch.autocast(s.device.type, dtype=s.autocast or torch.bfloat16, enabled=s.autocast is not None):
        loss, _ = run_train_step(s.emb, learner, s.opt, batch, backward=torch.Tensor.backward)
    return float(loss)


def _zipf_ids(gen: torch.Generator, shape: tuple[int, ...], rows: int, alpha: float) -> torch.Tensor:
    """Zipf-like ids in [0, rows): inverse-CDF sampling of p(k) ~ (k+1)^-alpha, then a fixed shuffle
    of the ranks so hot ids are spread over the table."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if alpha <= 0:
        return torch.randint(0, rows, shape, generator=gen)
    if alpha == 1.0:
        ranks = torch.floor(torch.exp(u * torch.log(torch.tensor(rows + 1.0)))) - 1
    else:
        a = 1.0 - alpha
        ranks = torch.floor((((rows + 1.0) ** a - 1.0) * u + 1.0) ** (1.0 / a)) - 1
    ranks = ranks.long().clamp_(0, rows - 1)
    return (ranks * 2654435761 + 12345) % rows  # a cheap bijection-ish scatter of ranks


def criteo_batches(
    num_batches: int, tasks: int, support: int, query: int, rows: int, alpha: float, seed: int
) -> list[TaskBatch]:
    gen = torch.Generator().manual_seed(seed)

    def one_set(n: int) -> SetBatch:
        return SetBatch(
            sparse=_zipf_ids(gen, (tasks, n, 26), rows, alpha),
            multi_hot=torch.full((tasks, n, 0, 0), -1, dtype=torch.long),
            dense=torch.randn(tasks, n, 13, generator=gen),
            label=(torch.rand(tasks, n, generator=gen) < 0.25).float(),
            mask=torch.ones(tasks, n, dtype=torch.bool),
        )

    return [
        TaskBatch(
            support=one_set(support),
            query=one_set(query),
            state=torch.zeros(tasks, dtype=torch.long),
            task_mask=torch.ones(tasks, dtype=torch.bool),
            task_ids=[f"t{b}_{i}" for i in range(tasks)],
        )
        for b in range(num_batches)
    ]


def setup_criteo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Setup:
    rows = args.rows or (1_000_000 if device.type == "cuda" else 100_000)
    inner_steps = args.inner_steps if args.inner_steps is not None else 1
    inner_lr = args.inner_lr if args.inner_lr is not None else 0.1
    torch.manual_seed(args.seed)
    emb, dlrm, opt = build_model(
        [rows] * 26,
        26,
        13,
        64,
        [256],
        [512, 256],
        "dot",
        {"name": "adagrad", "lr": 0.05},
        0.01,
        dtype,
        device,
    )
    batches = criteo_batches(
        args.num_batches, args.tasks, args.support, args.query, rows, args.zipf, args.seed
    )
    batches = [b.to(device) for b in batches]
    kw = {"inner_steps": inner_steps, "inner_lr": inner_lr}
    metas = {
        "plain": MetaConfig("none", **kw),
        "maml": MetaConfig("maml", **kw),
        "fomaml": MetaConfig("fomaml", **kw),
    }
    metas.update(other_backends(metas))
    info = {
        "rows_per_table": rows,
        "tables": 26,
        "dim": 64,
        "tasks": args.tasks,
        "support": args.support,
        "query": args.query,
        "inner_steps": inner_steps,
        "inner_lr": inner_lr,
        "zipf": args.zipf,
    }
    return Setup("criteo", emb, dlrm, opt, batches, metas, device, info)


def setup_movielens(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Setup | None:
    data_dir = Path(args.movielens_dir)
    if not (data_dir / "manifest.json").is_file():
        print(f"[movielens] skipped: no shards in {data_dir} (build them with `make data`)", flush=True)
        return None
    from gmeta.data.datamodule import TaskDataModule

    dm = TaskDataModule(data_dir=data_dir, batch_tasks=args.movielens_tasks, verify_checksums=False)
    dm.setup()
    schema = dm.schema
    assert schema is not None
    batches: list[TaskBatch] = []
    for b in dm.dataset("train"):
        if bool(b.task_mask.all()) and b.num_tasks == args.movielens_tasks:
            batches.append(b.to(device))
        if len(batches) == args.num_batches:
            break
    inner_steps = args.inner_steps if args.inner_steps is not None else 3
    inner_lr = args.inner_lr if args.inner_lr is not None else 0.3
    torch.manual_seed(args.seed)
    emb, dlrm, opt = build_model(
        [f.vocab_size for f in schema.id_fields],
        len(schema.sparse),
        len(schema.dense),
        16,
        [32],
        [64, 32],
        "concat",
        {"name": "adagrad", "lr": 0.01},
        0.05,
        dtype,
        device,
    )
    kw = {"inner_steps": inner_steps, "inner_lr": inner_lr, "support_loss_weight": 1.0}
    metas = {
        "plain": MetaConfig("none", inner_steps=inner_steps, inner_lr=inner_lr),
        "maml": MetaConfig("maml", **kw),
        "fomaml": MetaConfig("fomaml", **kw),
    }
    metas.update(other_backends(metas))
    info = {
        "shards": str(data_dir),
        "tasks": args.movielens_tasks,
        "batches": len(batches),
        "samples_per_batch": statistics.mean(real_samples(b) for b in batches),
        "inner_steps": inner_steps,
        "inner_lr": inner_lr,
        "support_loss_weight": 1.0,
    }
    return Setup("movielens", emb, dlrm, opt, batches, metas, device, info)


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OpTimer(TorchDispatchMode):
    """Wall time and calls of every ATen op dispatched while active (forward and CPU backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ms: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ms[name] += (time.perf_counter() - t0) * 1e3
        self.calls[name] += 1
        return out


def op_times(s: Setup, variants: tuple[str, ...], steps: int, top: int) -> list[dict]:
    """Per-op time per step of each variant, side by side (``--op-times``): what a meta step spends
    beyond plain, op by op. Synchronous CPU timing; on CUDA it times kernel launches only."""
    timers = {}
    for v in variants:
        train_step(s, s.batches[0], v)
        timers[v] = _OpTimer()
        with timers[v]:
            for i in range(steps):
                train_step(s, s.batches[i % len(s.batches)], v)
    ops = sorted(
        {op for t in timers.values() for op in t.ms}, key=lambda op: -max(t.ms[op] for t in timers.values())
    )
    print(f"[{s.name}] ms per step (calls per step), {steps} steps")
    print(f"{'op':<22}" + "".join(f"{v:>18}" for v in variants))
    out = []
    for op in ops[:top]:
        cells = [(timers[v].ms[op] / steps, timers[v].calls[op] / steps) for v in variants]
        print(f"{op:<22}" + "".join(f"{ms:>10.2f} ({n:>4.0f})" for ms, n in cells))
        out += [
            {
                "bench": s.name,
                "variant": "op_times",
                "of": v,
                "op": op,
                "ms_per_step": ms,
                "calls_per_step": n,
            }
            for v, (ms, n) in zip(variants, cells, strict=True)
        ]
    print(
        f"{'all ops':<22}" + "".join(f"{sum(t.ms.values()) / steps:>10.2f}       " for t in timers.values())
    )
    return out


def profile_variant(s: Setup, variant: str, steps: int, top: int) -> list[dict]:
    """``torch.profiler`` over ``steps`` training steps of one variant (after one warm-up step): the
    ``top`` ATen ops by self CPU time, grouped by input shapes, with their share of the profiled time.

    Printed as a table; returned as ``profile`` JSON records (ms per step, share of all self time).
    """
    from torch.profiler import ProfilerActivity, profile

    train_step(s, s.batches[0], variant)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            train_step(s, s.batches[i % len(s.batches)], variant)
            _sync(s.device)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    out = [
        {
            "bench": s.name,
            "variant": "profile",
            "of": variant,
            "op": e.key,
            "shapes": str(e.input_shapes),
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / steps / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows
    ]
    print(f"[{s.name}] profile of {variant}: {total / steps / 1e3:.1f} ms self CPU time per step (profiled)")
    for r in out:
        print(
            f"  {r['share']:6.1%} {r['self_ms_per_step']:8.2f} ms {r['calls_per_step']:5.1f}x  {r['op']} {r['shapes'][:90]}"
        )
    return out


def bench(s: Setup, steps: int, warmup: int, loop_steps: int, variants: tuple[str, ...]) -> list[dict]:
    """Round-robin timing of the variants on the same batches; returns one result dict per variant."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    samples: dict[str, list[int]] = {v: [] for v in variants}
    for rnd in range(warmup + steps):
        batch = s.batches[rnd % len(s.batches)]
        for v in variants:
            if v == "maml_loop" and rnd >= warmup + loop_steps:
                continue  # the loop reference is slow: fewer timed steps
            _sync(s.device)
            t0 = time.perf_counter()
            train_step(s, batch, v)
            _sync(s.device)
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[v].append(dt)
                samples[v].append(real_samples(batch))
        print(f"[{s.name}] round {rnd + 1}/{warmup + steps} done", file=sys.stderr, flush=True)
    results = []
    for v in variants:
        step = lambda v=v: (train_step(s, s.batches[0], v), None)[1]  # noqa: E731
        peak = measure_peak_mb(step, s.device)
        med = statistics.median(times[v])
        base = times.get("plain")
        # per-round ratio to plain's step of the same round and batch: drift cancels out
        paired = (
            statistics.median(p / t for p, t in zip(base, times[v], strict=False))
            if base and v != "plain"
            else None
        )
        results.append(
            {
                "bench": s.name,
                "variant": v,
                "samples_per_s": statistics.mean(samples[v]) / med,
                "step_ms": med * 1e3,
                "step_ms_min": min(times[v]) * 1e3,
                "vs_plain_paired": paired,
                "gflop_per_step": measure_gflop(step),
                "peak_tensor_mb": measure_tensor_peak_mb(step),
                "timed_steps": len(times[v]),
                "samples_per_step": statistics.mean(samples[v]),
                "tasks_per_step": int(s.batches[0].task_mask.sum()),
                "peak_mem_mb": peak,
                "device": str(s.device),
                "dtype": str(next(s.dlrm.parameters()).dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(),
            }
        )
    return results


def ratios(name: str, results: list[dict]) -> dict[str, Any]:
    sps = {r["variant"]: r["samples_per_s"] for r in results}

    def ratio(a: str, b: str) -> float | None:
        return sps[a] / sps[b] if a in sps and b in sps else None

    by = {r["variant"]: r for r in results}

    def field_ratio(key: str, a: str, b: str) -> float | None:
        if a not in by or b not in by or not by[a].get(key):
            return None
        return by[b][key] / by[a][key] if key == "gflop_per_step" else by[a][key] / by[b][key]

    return {
        "bench": name,
        "variant": "ratios",
        # samples/s ratios of the medians, and the median of the per-round ratios (paired)
        "maml/plain": ratio("maml", "plain"),
        "maml/plain paired": by.get("maml", {}).get("vs_plain_paired"),
        "fomaml/plain paired": by.get("fomaml", {}).get("vs_plain_paired"),
        # the ratio plain's FLOPs / the variant's (same batch): what a purely compute-bound step gives
        "maml/plain flop bound": field_ratio("gflop_per_step", "maml", "plain"),
        "fomaml/plain flop bound": field_ratio("gflop_per_step", "fomaml", "plain"),
        # exact tensor memory of a step (TensorMemoryTracker), variant / plain
        "maml/plain peak tensor memory": field_ratio("peak_tensor_mb", "maml", "plain"),
        "fomaml/plain peak tensor memory": field_ratio("peak_tensor_mb", "fomaml", "plain"),
        "fomaml/plain": ratio("fomaml", "plain"),
        "maml/maml_loop": ratio("maml", "maml_loop"),
        "maml/maml_vmap": ratio("maml", "maml_vmap"),
        "fomaml/fomaml_vmap": ratio("fomaml", "fomaml_vmap"),
        "maml_vmap/plain": ratio("maml_vmap", "plain"),
        "fomaml_vmap/plain": ratio("fomaml_vmap", "plain"),
    }


def print_table(results: list[dict]) -> None:
    header = (
        f"{'bench':<10} {'variant':<12} {'samples/s':>11} {'step_ms':>10} {'steps':>5} {'GFLOP':>8} "
        f"{'tensor_mb':>10} {'peak_mb':>9}  device"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        print(
            f"{r['bench']:<10} {r['variant']:<12} {r['samples_per_s']:>11.1f} {r['step_ms']:>10.1f} "
            f"{r['timed_steps']:>5} {r['gflop_per_step']:>8.2f} {r['peak_tensor_mb']:>10.1f} {peak:>9}  "
            f"{r['device']}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["criteo", "movielens", "all"], default="all")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument(
        "--loop-steps", type=int, default=None, help="timed steps of maml_loop (default min(steps, 2))"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=int, default=None, help="criteo rows per table (100k CPU, 1M CUDA)")
    p.add_argument("--tasks", type=int, default=256, help="criteo tasks per meta-batch")
    p.add_argument("--support", type=int, default=16, help="criteo support samples per task")
    p.add_argument("--query", type=int, default=16, help="criteo query samples per task")
    p.add_argument("--zipf", type=float, default=1.05, help="criteo id skew (Zipf exponent; 0 = uniform)")
    p.add_argument("--movielens-dir", default=str(MOVIELENS_SHARDS))
    p.add_argument("--movielens-tasks", type=int, default=32, help="tasks per movielens batch")
    p.add_argument("--num-batches", type=int, default=4, help="distinct meta-batches cycled through")
    p.add_argument("--inner-steps", type=int, default=None, help="override (criteo 1, movielens 3)")
    p.add_argument("--inner-lr", type=float, default=None, help="override (criteo 0.1, movielens 0.3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16"],
        default="fp32",
        help="fp32: full float32; tf32: CUDA float32 matmuls on TF32 tensor cores; bf16: the forward "
        "under torch.autocast(bfloat16), parameters float32 (Lightning's bf16-mixed). Same for every "
        "variant, so the ratios compare like with like",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument(
        "--malloc",
        choices=["heap", "default"],
        default="heap",
        help="heap: glibc keeps large blocks on the heap (no per-step page faults; see "
        "keep_heap_allocations); default: glibc's own policy",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="instead of timing: torch.profiler table of this variant's training step (top ops)",
    )
    p.add_argument("--profile-steps", type=int, default=3, help="steps profiled with --profile / --op-times")
    p.add_argument("--profile-top", type=int, default=25, help="ops listed with --profile / --op-times")
    p.add_argument(
        "--op-times",
        action="store_true",
        help="instead of timing: ms per step of every ATen op, the --variants side by side",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    loop_steps = args.loop_steps if args.loop_steps is not None else min(args.steps, 2)
    loop_steps = max(1, min(loop_steps, args.steps))
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    malloc = "heap" if args.malloc == "heap" and keep_heap_allocations() else "default"
    if args.precision != "fp32" and args.dtype != "float32":
        raise SystemExit(f"--precision {args.precision} needs --dtype float32")
    if args.precision == "tf32":
        if device.type != "cuda":
            raise SystemExit("--precision tf32 is a CUDA setting (TF32 tensor cores)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, "
        f"inter-op threads {torch.get_num_interop_threads()}, device {device}, dtype {args.dtype}, "
        f"precision {args.precision}, malloc {malloc}",
        flush=True,
    )
    builders = {"criteo": setup_criteo, "movielens": setup_movielens}
    names = list(builders) if args.config == "all" else [args.config]
    results: list[dict] = []
    summary: list[dict] = []
    for name in names:
        t0 = time.perf_counter()
        s = builders[name](args, device, dtype)
        if s is None:
            continue
        s.autocast = torch.bfloat16 if args.precision == "bf16" else None
        print(f"[{name}] built in {time.perf_counter() - t0:.1f}s: {json.dumps(s.info)}", flush=True)
        if args.profile:
            results += profile_variant(s, args.profile, args.profile_steps, args.profile_top)
            continue
        if args.op_times:
            results += op_times(s, variants, args.profile_steps, args.profile_top)
            continue
        res = bench(s, args.steps, args.warmup, loop_steps, variants)
        for r in res:
            r["malloc"] = malloc
            r["precision"] = args.precision
        results += res
        summary.append(ratios(name, res))
        del s
        gc.collect()
    print()
    if not (args.profile or args.op_times):
        print_table(results)
    for r in summary:
        parts = [f"{k} {v:.3f}" for k, v in r.items() if "/" in k and v is not None]
        print(f"{r['bench']}: " + ", ".join(parts))
    print()
    lines = [json.dumps(r) for r in results + summary]
    for line in lines:
        print(line)
    if args.json_out:
        Path(args.json_out).write_text("\n".join(lines) + "\n")
    return results + summary


if __name__ == "__main__":
    main()
