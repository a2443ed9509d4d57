"""One rank of a multi-process test: ``python worker.py SPEC.json RANK`` (see ``launch.py``).

Each scenario trains the real ``MetaDLRMModule`` with the real ``HybridParallelStrategy`` through a
Lightning ``Trainer`` in float64, on deterministic global meta-batches of which this rank takes a
contiguous block of tasks, and writes what the test compares into ``SPEC["out_dir"]``:

* ``train``:  losses per step (with this rank's loss weight) and, from rank 0, the gathered full state
  (dense parameters and every embedding row, with optimizer state) after the steps; optionally
  saves a checkpoint (``checkpoint_format``: auto, full or sharded) after ``save_at`` steps, with the
  adapted predictions and the gathered state at that point, or resumes from ``resume_from`` and
  records the predictions before its first step.
* ``memory``: ``train`` on a large float32 table (``vocabs``, ``dim``), recording each rank's peak RSS
  instead of the gathered state.
* ``audit``:  the collectives of one meta-step, through the communicator and counted at
  ``torch.distributed`` itself.
* ``bad_ids``: rank 1 gets an out-of-range id; every rank records the error it raised.
* ``rank_raises``: rank 1 raises inside its second meta-step; every rank records what it raised.
* ``rank_dies``: rank 1 exits abruptly at its second meta-step; the others record what they raised.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "unit"))

from tiny_tasks import random_batch  # noqa: E402

from gmeta.data.batch import SetBatch, TaskBatch  # noqa: E402
from gmeta.meta.module import MetaDLRMModule  # noqa: E402
from gmeta.parallel import HybridParallelStrategy  # noqa: E402
from gmeta.parallel.sharded_embedding import gathered_state_dict  # noqa: E402

VOCABS = (40, 31, 23, 12)  # 2 sparse (user, item), 2 multi-hot
TASKS_PER_BATCH = 8  # divisible by 1, 2 and 4 ranks
META = {
    "maml": {"name": "maml", "inner_steps": 2, "inner_lr": 0.3, "first_order": False},
    "fomaml": {"name": "fomaml", "inner_steps": 2, "inner_lr": 0.3, "first_order": True},
    "none": {"name": "none", "inner_steps": 1, "inner_lr": 0.3},
}
DIST_FUNCTIONS = (
    "all_to_all_single",
    "all_to_all",
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
)


def schema_dict(vocabs: tuple[int, ...] = VOCABS) -> dict[str, Any]:
    names = ("user", "item", "genre", "tag")
    kinds = ("sparse", "sparse", "multi_hot", "multi_hot")
    fields = [
        {"name": n, "kind": k, "vocab_size": v, "max_len": 3 if k == "multi_hot" else 1}
        for n, k, v in zip(names, kinds, vocabs, strict=True)
    ]
    fields += [{"name": f"d{i}", "kind": "dense"} for i in range(3)]
    return {"task_key": "user", "label": "rating", "time": None, "fields": fields}


def make_module(
    algo: str,
    meta_overrides: dict[str, Any] | None = None,
    vocabs: tuple[int, ...] = VOCABS,
    dim: int = 4,
    model_overrides: dict[str, Any] | None = None,
) -> MetaDLRMModule:
    torch.manual_seed(1234)  # same initial weights on every rank and world size
    kwargs: dict[str, Any] = {
        "embedding_dim": dim,
        "bottom_mlp": (8,),
        "top_mlp": (8,),
        "init_std": 0.3,
        "dense_optimizer": {"lr": 0.05},
        "embedding_optimizer": {"name": "adagrad", "lr": 0.2},
    }
    return MetaDLRMModule(
        schema=schema_dict(vocabs),
        meta={**META[algo], **(meta_overrides or {})},
        **{**kwargs, **(model_overrides or {})},
    )


def global_batch(step: int, vocabs: tuple[int, ...] = VOCABS) -> TaskBatch:
    gen = torch.Generator().manual_seed(100 + step)
    support = torch.randint(1, 7, (TASKS_PER_BATCH,), generator=gen).tolist()
    query = torch.randint(1, 5, (TASKS_PER_BATCH,), generator=gen).tolist()
    return random_batch(1000 + step, support, query, vocab_sizes=vocabs, num_sparse=2)


def select_tasks(batch: TaskBatch, lo: int, hi: int) -> TaskBatch:
    def sub(s: SetBatch) -> SetBatch:
        return SetBatch(*(getattr(s, f)[lo:hi] for f in ("sparse", "multi_hot", "dense", "label", "mask")))

    return TaskBatch(
        support=sub(batch.support),
        query=sub(batch.query),
        state=batch.state[lo:hi],
        task_mask=batch.task_mask[lo:hi],
        task_ids=batch.task_ids[lo:hi],
    )


def local_batch(step: int, rank: int, world: int, vocabs: tuple[int, ...] = VOCABS) -> TaskBatch:
    k = TASKS_PER_BATCH // world
    return select_tasks(global_batch(step, vocabs), rank * k, (rank + 1) * k)


class Recorder(L.Callback):
    """Losses and loss weights of every step; checkpoint + predictions at ``save_at``; faults."""

    def __init__(self, spec: dict[str, Any], rank: int, world: int) -> None:
        self.spec, self.rank, self.world = spec, rank, world
        self.losses: list[dict[str, float]] = []
        self.predictions: torch.Tensor | None = None
        self.audits: list[dict[str, Any]] = []
        self._counts: dict[str, int] | None = None
        self._patched: dict[str, Any] = {}

    def predict_eval_batch(self, module: MetaDLRMModule) -> torch.Tensor:
        batch = local_batch(99, self.rank, self.world)
        lookup = module.embedding.lookup(batch)
        return module.learner.predict(batch, lookup, adapted=True).detach()

    def on_train_start(self, trainer: L.Trainer, module: MetaDLRMModule) -> None:
        if self.spec.get("resume_from") and self.spec["scenario"] != "memory":
            self.predictions = self.predict_eval_batch(module)

    # -- raw collective counting (audit) --------------------------------------------------------
    def _patch(self) -> None:
        counts: dict[str, int] = {}
        for name in DIST_FUNCTIONS:
            original = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _orig: Any = original, **kwargs: Any) -> Any:
                counts[_name] = counts.get(_name, 0) + 1
                return _orig(*args, **kwargs)

            self._patched[name] = original
            setattr(dist, name, counted)
        self._counts = counts

    def _unpatch(self) -> dict[str, int]:
        for name, original in self._patched.items():
            setattr(dist, name, original)
        self._patched = {}
        counts, self._counts = self._counts or {}, None
        return counts

    def on_train_batch_start(self, trainer: L.Trainer, module: MetaDLRMModule, batch: Any, idx: int) -> None:
        if self.rank == 1 and trainer.global_step == 1:
            if self.spec["scenario"] == "rank_raises":
                raise RuntimeError("injected failure on rank 1 in meta-step 2")
            if self.spec["scenario"] == "rank_dies":
                os._exit(3)  # no exception, no clean-up: as if the process was killed
        if self.spec["scenario"] == "audit":
            self._patch()
            self._audit = trainer.strategy.comm.audit()
            self._records = self._audit.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: MetaDLRMModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.spec["scenario"] == "audit":
            self._audit.__exit__(None, None, None)
            self.audits.append(
                {
                    "raw": self._unpatch(),
                    "records": [r.__dict__ for r in self._records],
                    "dense_params": sum(p.numel() for p in module.dlrm.parameters()),
                }
            )
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append({"loss": float(loss), "weight": module.loss_weight(batch)})
        if self.spec.get("save_at") == trainer.global_step:
            trainer.save_checkpoint(self.spec["ckpt"])
            if self.spec["scenario"] == "memory":
                return
            self.predictions = self.predict_eval_batch(module)
            state = gathered_state_dict(module, module.state_dict())  # what the checkpoint must hold
            if self.rank == 0:
                torch.save(
                    {k: v.detach().cpu() for k, v in state.items()},
                    Path(self.spec["out_dir"]) / "saved_state.pt",
                )


#: Trainer settings for training on prepared batches only (no logs, checkpoints, validation)
BARE_TRAINER: dict[str, Any] = {
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "use_distributed_sampler": False,
    "inference_mode": False,
}


def _identity(batch: TaskBatch) -> TaskBatch:
    return batch


def batch_loader(batches: list[TaskBatch]) -> DataLoader:
    """A DataLoader that yields the given TaskBatches as they are."""
    return DataLoader(batches, batch_size=None, collate_fn=_identity)


def run(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    world = spec["world"]
    out: dict[str, Any] = {}
    vocabs = tuple(spec.get("vocabs", VOCABS))
    float64 = spec.get("float64", True)
    for algo in spec["algos"]:
        module = make_module(
            algo, spec.get("meta_overrides"), vocabs, spec.get("dim", 4), spec.get("model_overrides")
        )
        if float64:  # before fit: Lightning restores a checkpoint before the precision plugin converts
            module = module.double()
        steps = spec["steps"]
        first = spec.get("first_step", 0)
        batches = [local_batch(s, rank, world, vocabs) for s in range(first, steps)]
        if spec["scenario"] == "bad_ids" and rank == 1:
            batches[0].query.sparse[1, 0, 1] = VOCABS[1] + 5  # item id out of range
        recorder = Recorder(spec, rank, world)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=HybridParallelStrategy(
                collective_timeout_s=spec.get("timeout_s", 60),
                checkpoint_format=spec.get("checkpoint_format", "auto"),
            ),
            precision="64-true" if float64 else "32-true",
            max_steps=steps,
            callbacks=[recorder],
            **BARE_TRAINER,
        )
        loader = batch_loader(batches)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=spec.get("resume_from"))
        out[algo] = {"losses": recorder.losses, "audits": recorder.audits}
        if spec["scenario"] == "memory":  # peak resident memory of this process, in bytes
            out[algo]["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out[algo]["local_rows"] = module.embedding.num_local_rows
            continue  # gathering the whole state is what this scenario must never do
        state = gathered_state_dict(module, module.state_dict())
        if rank == 0:
            torch.save(
                {k: v.detach().cpu() for k, v in state.items()}, Path(spec["out_dir"]) / f"state_{algo}.pt"
            )
        if recorder.predictions is not None:
            torch.save(recorder.predictions, Path(spec["out_dir"]) / f"pred_{algo}_rank{rank}.pt")
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    out_dir = Path(spec["out_dir"])
    result: dict[str, Any] = {"rank": rank}
    try:
        result["result"] = run(spec, rank)
        code = 0
    except BaseException as exc:  # record what this rank saw, then fail
        result["error"] = {"type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}
        code = 1
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.destroy_process_group()
            time.sleep(0.3)  # let gloo's peers finish their own shutdown before this process exits
        else:
            os._exit(code)  # a peer may be gone: don't wait on a collective shutdown
    sys.exit(code)


if __name__ == "__main__":
    main()
