"""``HybridParallelStrategy``: row-sharded embedding tables + data-parallel dense towers, for Lightning.

What it does on top of Lightning's ``DDPStrategy`` (process launch, process group, ranks):

* ``setup_environment`` (right after the process group starts, before the module's
  ``configure_model`` and any checkpoint restore): replaces every ``EmbeddingCollection`` of the
  LightningModule by its row shard (``ShardedEmbeddingCollection``: lookups and row gradients go
  through AlltoAll). A deferred (meta) table is built here, each rank allocating and initialising only
  its own rows from rank 0's init seed: the whole table never exists on any rank.
* ``setup``: broadcasts the dense parameters from rank 0 so the replicas start equal. The module is NOT wrapped in
  ``DistributedDataParallel``: DDP would broadcast the table buffers from rank 0 (losing the other
  ranks' rows) and reduce on every ``backward``, while the meta step wants exactly one reduction.
* ``optimizer_step``: ONE all_reduce (sum) of all dense gradients flattened into one buffer, then the
  optimizer step. The module scales its loss by ``lookup.loss_share`` (this rank's share of the global
  task count), so the sum is the gradient of the global mean loss, exactly as on one process, also
  when ranks hold different numbers of real tasks.
* checkpoints (``checkpoint_format``): ``sharded`` writes a directory through
  ``torch.distributed.checkpoint``, each rank its own rows (``parallel/sharded_checkpoint.py``), and
  loads one on any number of ranks, each reading only its rows; ``full`` gathers every table into the
  file a single process writes (each rank holds the whole table for a moment); ``auto`` (default) is
  ``sharded`` when the tables and their row state exceed ``gather_limit_bytes``. Both formats load on
  any world size.
* ``reduce`` / ``barrier`` / ``broadcast`` go through the same ``Communicator`` as the meta-step
  collectives: failures name the collective and the rank, and time out after ``collective_timeout_s``.

Only manual optimization is supported (the meta step's backward happens in ``training_step``).
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from gmeta.checkpoint_io import AtomicCheckpointIO
from gmeta.model.embedding import EmbeddingCollection
from gmeta.parallel.comm import Communicator
from gmeta.parallel.launch import HydraJobLauncher
from gmeta.parallel.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_into,
    save_sharded,
    tables_of,
)
from gmeta.parallel.sharded_embedding import gathered_state_dict, shard_embeddings

log = logging.getLogger(__name__)


class HybridParallelStrategy(DDPStrategy):
    """Row-wise sharded embeddings (model parallel) + replicated dense towers (data parallel).

    Args:
        collective_timeout_s: how long any collective waits for the other ranks before failing (a rank
            that died or hangs turns into a ``CollectiveError`` on the others after at most this long).
        checkpoint_format: ``sharded`` (a directory, each rank writes its rows), ``full`` (one file with
            the gathered tables) or ``auto`` (``sharded`` above ``gather_limit_bytes``).
        gather_limit_bytes: for ``auto``: the largest tables (weights + row state, all tables) that
            are still gathered into one file.
        **kwargs: passed to ``DDPStrategy`` (``accelerator``, ``process_group_backend``,
            ``start_method``, ...). DDP-wrapper options (``find_unused_parameters`` ...) do not apply.
    """

    strategy_name = "hybrid_parallel"

    def __init__(
        self,
        collective_timeout_s: float = 1800.0,
        checkpoint_format: str = "auto",
        gather_limit_bytes: int = 2**30,
        **kwargs: Any,
    ) -> None:
        if collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {collective_timeout_s}")
        if checkpoint_format not in ("auto", "sharded", "full"):
            raise ValueError(f"checkpoint_format must be auto, sharded or full, got {checkpoint_format!r}")
        self.checkpoint_format = checkpoint_format
        self.gather_limit_bytes = int(gather_limit_bytes)
        kwargs.setdefault("timeout", timedelta(seconds=collective_timeout_s))
        super().__init__(**kwargs)
        self.collective_timeout_s = collective_timeout_s
        self.comm = Communicator(timeout_s=collective_timeout_s)

    # -- set-up ------------------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":  # re-runs the script: make it Hydra-multirun safe
            assert self.cluster_environment is not None
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.comm = Communicator(timeout_s=self.collective_timeout_s)

    def setup_environment(self) -> None:
        super().setup_environment()  # the process group
        self._shard_tables()

    def _shard_tables(self) -> None:
        """Replace every unsharded table by this rank's rows (built here if it was deferred)."""
        model = self.model
        if model is None:  # no module connected yet: setup() shards it
            return
        for table in tables_of(model).values():  # one seed for all ranks: rank 0's
            if isinstance(table, EmbeddingCollection):  # not sharded yet
                table.init_seed = self.comm.broadcast_object(table.init_seed, src=0, tag="setup/init_seed")
        replaced = shard_embeddings(model, self.comm)
        if replaced:
            log.info("rank %d/%d: row-sharded tables %s", self.comm.rank, self.comm.world_size, replaced)

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        module = self.lightning_module
        if module is not None and module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} needs manual optimization (the LightningModule must call "
                "manual_backward and optimizer.step itself); set automatic_optimization = False"
            )
        self.accelerator.setup(trainer)
        self._shard_tables()  # already done in setup_environment; a module connected later is sharded here
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._broadcast_dense_parameters()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    # DDPStrategy declares DistributedDataParallel: this strategy deliberately does not wrap.
    def _setup_model(self, model: Module) -> Module:  # type: ignore[override]
        return model  # no DistributedDataParallel wrapper (see the module docstring)

    @torch.no_grad()
    def _broadcast_dense_parameters(self) -> None:
        """Make every rank's dense parameters rank 0's (one flattened broadcast)."""
        params = list(self.model.parameters()) if self.model is not None else []
        if not params or self.comm.world_size == 1:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.comm.broadcast(flat, src=0, tag="setup/dense_params")
        torch.nn.utils.vector_to_parameters(flat, params)

    # -- the meta step's dense reduction -----------------------------------------------------------
    @torch.no_grad()
    def all_reduce_dense_gradients(self, optimizer: Optimizer) -> None:
        """Sum the gradients of all of ``optimizer``'s parameters over ranks in ONE all_reduce."""
        if self.comm.world_size == 1:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            if p.grad is None:  # every rank must contribute the same layout
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.comm.all_reduce_sum(flat, tag="dense/grads")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        # Manual optimization: the backward already ran in training_step; the closure is a no-op.
        inner = getattr(optimizer, "_optimizer", optimizer)
        self.all_reduce_dense_gradients(inner)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_io(self) -> Any:
        """The single-file (full) checkpoints' CheckpointIO: a Trainer plugin if one is given, else
        ``AtomicCheckpointIO`` (complete or absent) rather than Lightning's ``TorchCheckpointIO``. Set
        lazily: Lightning refuses a CheckpointIO given both to the strategy and as a plugin."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return super().checkpoint_io  # Lightning's handling of wrapping (async) CheckpointIOs

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        self._checkpoint_io = io

    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written sharded (see ``checkpoint_format``); the same on every rank."""
        if self.checkpoint_format != "auto":
            return self.checkpoint_format == "sharded"
        assert self.lightning_module is not None
        tables = tables_of(self.lightning_module).values()
        return sum(t.row_bytes * t.num_total_rows for t in tables) > self.gather_limit_bytes

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state: this rank's rows (sharded checkpoints), or the full tables gathered (a
        collective: every rank calls it)."""
        assert self.lightning_module is not None
        state = self.lightning_module.state_dict()
        if self.sharded_checkpoints():
            return state
        return gathered_state_dict(self.lightning_module, state)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Sharded: every rank writes its rows into the directory ``filepath`` (a collective). Full:
        rank 0 writes the file through the CheckpointIO, as Lightning does."""
        path = Path(self.broadcast(str(filepath)))
        if not self.sharded_checkpoints():
            if self.is_global_zero and is_sharded_checkpoint(path):
                shutil.rmtree(path)  # the full file replaces an earlier sharded one of the same name
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("sharded checkpoints do not take storage_options (they bypass the CheckpointIO)")
        assert self.lightning_module is not None
        save_sharded(checkpoint, path, self.lightning_module, self.comm)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded checkpoint: each rank reads only its own rows (any saved world size); a file: as
        Lightning does (each table's ``load_state_dict`` then keeps the owned rows)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            assert self.lightning_module is not None
            return load_sharded_into(self.lightning_module, path)
        return super().load_checkpoint(path, weights_only=weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero and is_sharded_checkpoint(filepath):
            shutil.rmtree(filepath)
            return
        super().remove_checkpoint(filepath)

    # -- other collectives, through the communicator -----------------------------------------------
    def barrier(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        self.comm.barrier(tag=f"barrier/{name or ''}")

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.comm.broadcast_object(obj, src=src, tag="broadcast")

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if not isinstance(tensor, Tensor) or self.comm.world_size == 1:
            return tensor
        op = str(reduce_op).lower().rsplit(".", 1)[-1]
        if op not in ("mean", "avg", "sum"):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        t = tensor.detach().clone()
        out = self.comm.all_reduce_sum(t if t.is_floating_point() else t.double(), tag=f"reduce/{op}")
        return out / self.comm.world_size if op in ("mean", "avg") else out

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="gmeta: row-sharded embeddings (AlltoAll) + data-parallel towers (one AllReduce)",
            )
            strategy_registry.register(
                cls.strategy_name + "_spawn",
                cls,
                description="hybrid_parallel with start_method='spawn'",
                start_method="spawn",
            )


HybridParallelStrategy.register_strategies(StrategyRegistry)
