"""LightningModule for meta-DLRM training with manual optimization.

One training step (a meta-step over a batch of T tasks):
  1. ONE embedding lookup for the support and query ids of all tasks in the batch;
  2. ``MetaLearner.loss``: the inner loop on each task's support set, vectorized over tasks, and the
     query loss at the adapted weights -> ``manual_backward`` (one outer backward);
  4. one dense optimizer step (Adam) + one sparse row-wise update of the looked-up embedding rows.

Only the dense optimizer is a Lightning optimizer, so ``global_step`` advances once per meta-step;
the embedding rows are updated by the table's own row-wise optimizer (its state lives in the
module's state_dict and so in every checkpoint).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from gmeta.data.batch import TaskBatch
from gmeta.data.schema import Schema
from gmeta.errors import ConfigError, UserError
from gmeta.meta.config import MetaConfig
from gmeta.meta.episodes import drop_ids, drop_task_keys, truncate_episodes
from gmeta.meta.learner import MetaLearner
from gmeta.meta.schedule import SCHEDULE_KEY, AdaptationSchedule
from gmeta.metrics import ColdStartMetrics
from gmeta.model.dlrm import DLRM, GeneratorSpec
from gmeta.model.embedding import EmbeddingCollection, EmbeddingTable

EVAL_MODES: tuple[tuple[str, bool], ...] = (("plain", False), ("adapted", True))

# The val/test metrics are computed by a collective (``ColdStartMetrics.compute``), so every rank
# logs the same global value; Lightning cannot know that and would warn once per metric and epoch
# on multi-process runs (52 lines on a 1-epoch run) that sync_dist=True is recommended.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('(val|test)/.*sync_dist=True\)`"
)


#: a meta loss (binary cross-entropy, nats per sample) above this counts as exploded: the adapted
#: logits are hundreds of units on the wrong side; a healthy CTR model sits near 0.3-0.7
EXPLODED_LOSS = 100.0


class DivergenceError(UserError):
    """Meta-training produced a non-finite or exploded loss: a setting to change, not a bug."""


def check_divergence(
    loss: torch.Tensor, stats: dict[str, torch.Tensor], step: int, cfg: MetaConfig, task_ids: list[str]
) -> None:
    """Stop with a message naming the inner-loop settings when the meta loss is non-finite or exploded.

    The usual cause is an inner learning rate too large for the towers (the adapted weights overshoot,
    the query loss explodes, the outer gradient follows), so the message names it and a smaller value.
    """
    value = float(loss.detach())
    if math.isfinite(value) and value <= EXPLODED_LOSS:
        return
    parts = [f"meta loss {value:.4g}"]
    for name in ("support_loss", "query_loss"):
        if name in stats and stats[name].numel() == 1:
            parts.append(f"{name.replace('_', ' ')} {float(stats[name]):.4g}")
    raise DivergenceError(
        f"meta-training diverged at step {step}: {', '.join(parts)} (non-finite or above {EXPLODED_LOSS:g}) "
        f"with meta.inner_lr={cfg.inner_lr:g}, meta.inner_steps={cfg.inner_steps} ({cfg.name}); lower the "
        f"inner learning rate (e.g. meta.inner_lr={cfg.inner_lr / 4:g}) or the outer ones "
        f"(model.dense_optimizer.lr, model.embedding_optimizer.lr). Tasks of this batch: {task_ids[:5]}"
    )


def _metric(metrics: nn.ModuleDict, mode: str) -> ColdStartMetrics:
    # ModuleDict items are typed nn.Module; these hold ColdStartMetrics (or a test's stand-in)
    return cast(ColdStartMetrics, metrics[mode])


def run_train_step(
    table: EmbeddingTable,
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer | LightningOptimizer,
    batch: TaskBatch,
    *,
    backward: Callable[[torch.Tensor], Any],
    loss_weight: int = 1,
    check: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One meta-step: lookup, meta loss, backward, dense optimizer step, sparse row update.

    The LightningModule's ``training_step`` and the training benchmark both run exactly this.

    Args:
        table: the embedding table (local or row-sharded).
        backward: ``manual_backward`` under Lightning (precision, DDP), ``Tensor.backward`` without.
        loss_weight: how many units this rank's loss averages over (the global normaliser's share).
        check: called with the loss and stats before the backward (e.g. to stop on divergence).

    Returns:
        the detached loss and the learner's stats.
    """
    # With a sharded table this is the step's only id/row exchange (support and query together).
    lookup = table.lookup(batch, loss_weight=loss_weight)
    loss, stats = learner.loss(batch, lookup)
    if check is not None:
        check(loss, stats)
    optimizer.zero_grad()
    # loss_share (1 on one process) weights this rank's mean so the ranks' gradients sum to the
    # gradient of the global mean; the strategy sums dense gradients in optimizer.step().
    backward(loss * lookup.loss_share)
    optimizer.step()
    table.apply_gradients(lookup)
    return loss.detach(), stats


def generator_spec(cfg: dict[str, Any] | None, id_fields: list[str]) -> GeneratorSpec | None:
    """``model.id_generator`` (``{field, from, hidden}``, field names) as the DLRM's ``GeneratorSpec``
    (indices into the id fields); None for null. Unknown or repeated names are a ``ConfigError``."""
    if cfg is None:
        return None
    unknown_keys = set(cfg) - {"field", "from", "hidden"}
    if unknown_keys or "field" not in cfg or not cfg.get("from"):
        raise ConfigError(
            f"model.id_generator must be {{field: <id field>, from: [<id fields>], hidden: [sizes]}}, got {dict(cfg)}"
        )
    names = [cfg["field"], *cfg["from"]]
    unknown = [n for n in names if n not in id_fields]
    if unknown:
        raise ConfigError(f"model.id_generator: {unknown} are not id fields of the data ({id_fields})")
    if len(set(names)) != len(names):
        raise ConfigError(f"model.id_generator: field and from must name distinct fields, got {names}")
    hidden = cfg.get("hidden")  # absent or null: the spec's default; []: one linear layer
    sources = tuple(id_fields.index(n) for n in cfg["from"])
    if hidden is None:
        return GeneratorSpec(id_fields.index(cfg["field"]), sources)
    return GeneratorSpec(id_fields.index(cfg["field"]), sources, tuple(int(h) for h in hidden))


class MetaDLRMModule(L.LightningModule):
    """Meta-DLRM: embedding tables + DLRM towers, trained by the meta algorithm named in ``meta``.

    Args:
        schema: the dataset schema as a dict (from the shards' manifest; carries vocab sizes).
        meta: meta-algorithm settings, the fields of ``MetaConfig`` (name, inner_steps, ...).
        embedding_dim: width of every embedding row (one width so that ``dot`` interaction works).
        bottom_mlp / top_mlp: hidden sizes of the towers. interaction: ``concat`` or ``dot``.
        init_std: std of the normal init of embedding rows.
        dense_optimizer: Adam settings for the towers (lr, weight_decay).
        embedding_optimizer: row-wise sparse optimizer for the tables (name, lr, ...).
        task_key_oov_rate: in training, the share of tasks whose task-key id (the user id) is replaced
            by the OOV row 0. Cold tasks always arrive with OOV task keys; without this the OOV row
            is never trained and the model learns to lean on ids that new users do not have.
        id_dropout: in training, ``{sparse field: rate}``: that share of the field's id values is
            replaced by the OOV row in each step (``gmeta.meta.episodes.drop_ids``), e.g. ``item_id``
            so that new items, which arrive with the OOV row, are scored from their side features.
        id_bias: a first-order term per id (``gmeta.model.dlrm.DLRM``): every embedding row gets one
            more column, the id's bias, added to the logit; trained, sharded and adapted with the row.
        id_generator: ``{field, from, hidden}`` (``generator_spec``): an MLP generates a vector for id
            field ``field`` from the vectors of the fields ``from`` (e.g. an item's from its genres
            and year), added to its id row's vector (``gmeta.model.dlrm.DLRM``); a new item gets
            the OOV row plus the generated vector. Trained with the towers, never adapted.
    """

    def __init__(
        self,
        schema: dict[str, Any],
        meta: dict[str, Any],
        embedding_dim: int = 16,
        bottom_mlp: tuple[int, ...] = (32,),
        top_mlp: tuple[int, ...] = (64, 32),
        interaction: Literal["concat", "dot"] = "concat",
        init_std: float = 0.05,
        dense_optimizer: dict[str, Any] | None = None,
        embedding_optimizer: dict[str, Any] | None = None,
        task_key_oov_rate: float = 0.0,
        id_dropout: dict[str, float] | None = None,
        id_bias: bool = False,
        id_generator: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.schema = Schema.from_dict(schema)
        self.meta_config = MetaConfig.from_dict(meta)
        self.dense_optimizer_config = {"lr": 1e-3, "weight_decay": 0.0, **(dense_optimizer or {})}
        row_optimizer = dict(embedding_optimizer or {"name": "adagrad", "lr": 0.05})
        dlrm = DLRM(
            num_fields=len(self.schema.id_fields),
            num_dense=len(self.schema.dense),
            dim=embedding_dim,
            bottom_mlp=list(bottom_mlp),
            top_mlp=list(top_mlp),
            interaction=interaction,
            id_bias=id_bias,
            generator=generator_spec(id_generator, [f.name for f in self.schema.id_fields]),
        )
        # the local table here; HybridParallelStrategy replaces it by a row-sharded one
        self.embedding: EmbeddingTable = EmbeddingCollection.from_schema(
            self.schema,
            dim=dlrm.row_dim,
            init_std=init_std,
            optimizer=row_optimizer.pop("name"),
            optimizer_kwargs=row_optimizer,
            device="meta",  # built in configure_model: whole here, or only this rank's rows when sharded
        )
        self.dlrm = dlrm  # registered after the table, as before the bias column (state_dict order)
        #: the meta path: every training and evaluation step goes through it
        self.learner = MetaLearner(self.dlrm, self.meta_config, [f.name for f in self.schema.id_fields])
        #: learned inner learning rates (meta.learn_inner_lr): trained, reduced over ranks and
        #: checkpointed with the towers
        self.inner_lrs = self.learner.inner_lrs
        if not 0.0 <= task_key_oov_rate <= 1.0:
            raise ValueError(f"task_key_oov_rate must be in [0, 1], got {task_key_oov_rate}")
        self.task_key_oov_rate = task_key_oov_rate
        sparse_names = [f.name for f in self.schema.sparse]
        self.task_key_column = (
            sparse_names.index(self.schema.task_key) if self.schema.task_key in sparse_names else None
        )
        self.id_dropout: dict[int, float] = {}
        for name, rate in (id_dropout or {}).items():
            if name not in sparse_names:
                raise ConfigError(
                    f"model.id_dropout: {name!r} is not a sparse field of the data ({sparse_names})"
                )
            if not 0.0 <= float(rate) <= 1.0:
                raise ConfigError(f"model.id_dropout.{name} must be in [0, 1], got {rate}")
            self.id_dropout[sparse_names.index(name)] = float(rate)
        self.val_metrics = nn.ModuleDict({mode: ColdStartMetrics() for mode, _ in EVAL_MODES})
        self.test_metrics = nn.ModuleDict({mode: ColdStartMetrics() for mode, _ in EVAL_MODES})
        #: per-state test results of the last test run, as records (see ``gmeta.report``)
        self.test_records: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        # Lightning calls this after the strategy's environment set-up: HybridParallelStrategy has
        # then already replaced the deferred table by this rank's rows; on one process, build it whole.
        self.embedding.materialize()

    # -- checkpoint --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.learner.schedule is not None:  # chosen on validation (gmeta.meta.adaptation)
            checkpoint[SCHEDULE_KEY] = self.learner.schedule.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(SCHEDULE_KEY)
        self.learner.schedule = AdaptationSchedule.from_dict(stored) if stored else None

    # -- optimization ----------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.dlrm.parameters())
        if self.inner_lrs is not None:
            params += list(self.inner_lrs.parameters())
        return torch.optim.Adam(params, **self.dense_optimizer_config)

    def loss_weight(self, batch: TaskBatch) -> int:
        """How many units the local loss averages over: real tasks, or real samples for ``none``."""
        tm = batch.task_mask
        if not self.meta_config.is_meta:
            return int((batch.support.mask & tm[:, None]).sum() + (batch.query.mask & tm[:, None]).sum())
        return int(tm.sum())

    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        # Draws are hashes of (seed, step, task or id), not the process's RNG: the same tasks and ids
        # change whichever rank holds them, so N processes train exactly like one.
        seed, cfg = os.environ.get("PL_GLOBAL_SEED", "0"), self.meta_config
        if self.task_key_column is not None:
            drop_task_keys(batch, self.task_key_column, self.task_key_oov_rate, seed, self.global_step)
        for column, rate in self.id_dropout.items():
            drop_ids(batch, column, rate, seed, self.global_step)
        batch = truncate_episodes(batch, cfg.episode_support_sizes, cfg.episode_rate, seed, self.global_step)
        optimizer = self.optimizers()
        assert isinstance(optimizer, LightningOptimizer)  # configure_optimizers returns one
        loss, stats = run_train_step(
            self.embedding,
            self.learner,
            optimizer,
            batch,
            backward=self.manual_backward,
            loss_weight=self.loss_weight(batch),
            check=lambda loss, stats: check_divergence(
                loss, stats, self.global_step, self.meta_config, batch.task_ids
            ),
        )
        real_tasks = int(batch.task_mask.sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=real_tasks)
        for name in ("support_loss", "query_loss"):
            if name in stats and stats[name].numel() == 1 and torch.isfinite(stats[name]):
                self.log(f"train/{name}", stats[name], batch_size=real_tasks)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.inner_lrs is not None:  # where the learned inner rates went (logged per slot and step)
            for slot, rates in self.inner_lrs.table().items():
                for k, rate in enumerate(rates):
                    self.log(f"inner_lr/{slot}/step{k}", rate, sync_dist=False)

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate_batch(self, batch: TaskBatch, metrics: nn.ModuleDict) -> None:
        lookup = self.embedding.lookup(batch)
        for mode, adapted in EVAL_MODES:
            logits = self.learner.predict(batch, lookup, adapted=adapted)
            q = batch.query
            _metric(metrics, mode).update(logits, q.label, q.mask, batch.state, batch.task_mask)

    def _log_metrics(self, split: str, metrics: nn.ModuleDict) -> list[dict[str, Any]]:
        records = []
        for mode, adapted in EVAL_MODES:
            metric = _metric(metrics, mode)
            per_state = metric.compute()  # a collective: every rank calls it
            metric.reset()
            for state, values in per_state.items():
                records.append(
                    {"state": state, "method": self.meta_config.name, "adapted": adapted, **values}
                )
                for name in ("auc", "logloss", "gauc"):
                    self.log(f"{split}/{state}/{name}_{mode}", values[name], sync_dist=False)
            aucs = [v["auc"] for v in per_state.values() if not math.isnan(v["auc"])]
            if aucs:  # the mean over states: the checkpoint monitor
                self.log(f"{split}/auc_{mode}", sum(aucs) / len(aucs), prog_bar=adapted, sync_dist=False)
        return records

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate_batch(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate_batch(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_records = self._log_metrics("test", self.test_metrics)
