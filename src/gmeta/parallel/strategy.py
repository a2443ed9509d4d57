"""``HybridParallelStrategy``: row-sharded embedding tables + data-parallel dense towers, for Lightning.

What it does on top of Lightning's ``DDPStrategy`` (process launch, process group, ranks):

* ``setup``: replaces every ``EmbeddingCollection`` of the LightningModule by its row shard
  (``ShardedEmbeddingCollection``: lookups and row gradients go through AlltoAll), and broadcasts the
  dense parameters from rank 0 so the replicas start equal. The module is NOT wrapped in
  ``DistributedDataParallel``: DDP would broadcast the table buffers from rank 0 (losing the other
  ranks' rows) and reduce on every ``backward``, while the meta step wants exactly one reduction.
* ``optimizer_step``: ONE all_reduce (sum) of all dense gradients flattened into one buffer, then the
  optimizer step. The module scales its loss by ``lookup.loss_share`` (this rank's share of the global
  task count), so the sum is the gradient of the global mean loss, exactly as on one process, also
  when ranks hold different numbers of real tasks.
* checkpoints: ``lightning_module_state_dict`` gathers every sharded table into the full table, so a
  checkpoint is the same file as a single-process one; loading takes each rank's own rows (a run on N
  ranks resumes on M).
* ``reduce`` / ``barrier`` / ``broadcast`` go through the same ``Communicator`` as the meta-step
  collectives: failures name the collective and the rank, and time out after ``collective_timeout_s``.

Only manual optimization is supported (the meta step's backward happens in ``training_step``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from gmeta.parallel.comm import Communicator
from gmeta.parallel.launch import HydraJobLauncher
from gmeta.parallel.sharded_embedding import gathered_state_dict, shard_embeddings

log = logging.getLogger(__name__)


class HybridParallelStrategy(DDPStrategy):
    """Row-wise sharded embeddings (model parallel) + replicated dense towers (data parallel).

    Args:
        collective_timeout_s: how long any collective waits for the other ranks before failing (a rank
            that died or hangs turns into a ``CollectiveError`` on the others after at most this long).
        **kwargs: passed to ``DDPStrategy`` (``accelerator``, ``process_group_backend``,
            ``start_method``, ...). DDP-wrapper options (``find_unused_parameters`` ...) do not apply.
    """

    strategy_name = "hybrid_parallel"

    def __init__(self, collective_timeout_s: float = 1800.0, **kwargs: Any) -> None:
        if collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {collective_timeout_s}")
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

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        module = self.lightning_module
        if module is not None and module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} needs manual optimization (the LightningModule must call "
                "manual_backward and optimizer.step itself); set automatic_optimization = False"
            )
        self.accelerator.setup(trainer)
        replaced = shard_embeddings(self.model, self.comm)  # before moving: only the shard goes to the device
        if replaced:
            log.info("rank %d/%d: row-sharded tables %s", self.comm.rank, self.comm.world_size, replaced)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._broadcast_dense_parameters()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _setup_model(self, model: Module) -> Module:
        return model  # no DistributedDataParallel wrapper (see the module docstring)

    @torch.no_grad()
    def _broadcast_dense_parameters(self) -> None:
        """Make every rank's dense parameters rank 0's (one flattened broadcast)."""
        params = [p for p in self.model.parameters()]
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
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state with full (gathered) tables: a collective, every rank calls it."""
        assert self.lightning_module is not None
        return gathered_state_dict(self.lightning_module, self.lightning_module.state_dict())

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
