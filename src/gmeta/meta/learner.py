"""``MetaLearner``: the meta-learning objective and predictions of one model under one meta config.

It is the only entry point to the meta path: the LightningModule's training and evaluation steps,
serving, the evaluation report and the benchmarks all call ``loss(batch, lookup)`` or
``predict(batch, lookup, adapted)``. The backend that computes the logits (``fast``, ``vmap`` or
``reference``, see ``gmeta.meta.backend``) is chosen once, at construction.

Objective (``loss``):
    meta algorithms: mean over real tasks of each task's masked-mean query BCE at its adapted weights
        (plus ``support_loss_weight`` times the support loss at the shared weights);
    ``none``: masked-mean BCE over all real support + query samples at the shared weights.
Dummy tasks (``task_mask`` False) and padded samples contribute exactly zero. ``loss.backward()``
fills the dense params' and ``lookup.rows``' gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from gmeta.data.batch import TaskBatch
from gmeta.errors import ConfigError
from gmeta.meta import fast
from gmeta.meta.backend import InnerLoop, MetaBackend, Pass
from gmeta.meta.config import MetaConfig
from gmeta.meta.inner_lr import InnerLearningRates, lr_slots
from gmeta.meta.losses import masked_bce, masked_sample_mean_bce, masked_task_mean
from gmeta.meta.reference import ReferenceBackend
from gmeta.meta.schedule import AdaptationSchedule, InnerSetting
from gmeta.meta.vmap import VmapBackend
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingLookup

log = logging.getLogger(__name__)


def make_backend(model: DLRM, cfg: MetaConfig, inner: InnerLoop) -> MetaBackend:
    """The backend ``cfg.backend`` names, running ``inner``; ``fast`` falls back to ``vmap`` for a
    model it does not know."""
    if cfg.backend == "fast":
        if fast.supports(model, inner.adapt_embeddings):
            return fast.FastBackend(model, inner)
        reason = "a generator with adapted rows" if fast.supports(model) else "a structure it does not know"
        log.info("meta.backend=fast cannot run %s (%s): using the vmap backend", type(model).__name__, reason)
        return VmapBackend(model, inner)
    if cfg.backend == "vmap":
        return VmapBackend(model, inner)
    return ReferenceBackend(model, inner)


def _field_indices(cfg: MetaConfig, id_fields: Sequence[str] | None) -> tuple[int, ...] | None:
    """``cfg.adapt_embedding_fields`` as indices into ``id_fields``; None: every field adapts."""
    if cfg.adapt_embedding_fields is None:
        return None
    if id_fields is None:
        raise ValueError("meta.adapt_embedding_fields needs the model's id field names (id_fields)")
    unknown = [f for f in cfg.adapt_embedding_fields if f not in id_fields]
    if unknown:
        raise ConfigError(
            f"meta.adapt_embedding_fields {unknown} are not id fields of the data; id fields: {list(id_fields)}"
        )
    return tuple(sorted(list(id_fields).index(f) for f in cfg.adapt_embedding_fields))


class MetaLearner:
    """The meta objective and predictions of ``model`` under ``cfg``.

    Args:
        model: the dense towers (their current parameters are used at every call).
        cfg: the meta-learning settings.
        id_fields: the names of the model's F id fields in order (``Schema.id_fields``); needed
            only to resolve ``cfg.adapt_embedding_fields``.

    Attributes:
        inner_lrs: the learned inner learning rates (``meta.learn_inner_lr``), else None; a module
            whose owner (the LightningModule) registers, optimizes and checkpoints it.
    """

    def __init__(self, model: DLRM, cfg: MetaConfig, id_fields: Sequence[str] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.inner_lrs = (
            InnerLearningRates(lr_slots(model), cfg.inner_steps, cfg.inner_lr) if cfg.learn_inner_lr else None
        )
        self.embedding_fields = _field_indices(cfg, id_fields)
        self.backend = make_backend(model, cfg, InnerLoop.of(cfg, self.inner_lrs, self.embedding_fields))
        #: evaluation-time inner loops per support size (``gmeta.meta.schedule``); None: the config's
        self.schedule: AdaptationSchedule | None = None
        self._setting_backends: dict[InnerSetting, MetaBackend] = {}

    def _params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def loss(self, batch: TaskBatch, lookup: EmbeddingLookup) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective at the model's params and ``lookup.rows``.

        Returns:
            loss: scalar, attached.
            stats: detached ``support_loss`` (at the shared weights; NaN when no support forward ran)
                and ``query_loss`` (means over real tasks), and the (T, Q) ``query_logits``.
        """
        cfg, tm = self.cfg, batch.task_mask
        rows, s, q = lookup.rows, batch.support, batch.query
        s_label, q_label = s.label.to(rows.dtype), q.label.to(rows.dtype)
        params = self._params()
        if not cfg.is_meta:
            s_logits, q_logits = self.backend.plain_logits(params, rows, lookup, batch)
            loss = masked_sample_mean_bce([(s_logits, s_label, s.mask), (q_logits, q_label, q.mask)], tm)
            support_loss = masked_task_mean(masked_bce(s_logits, s_label, s.mask), tm)
            query_loss = masked_task_mean(masked_bce(q_logits, q_label, q.mask), tm)
        else:
            weight = cfg.support_loss_weight
            res = self.backend.adapted_logits(
                params, rows, lookup, batch, Pass.for_training(cfg), support_grad=weight > 0
            )
            q_logits = res.query
            loss = query_loss = masked_task_mean(masked_bce(q_logits, q_label, q.mask), tm)
            if res.support is None:
                support_loss = torch.full_like(loss, float("nan"))
            else:
                support_loss = masked_task_mean(masked_bce(res.support, s_label, s.mask), tm)
                if weight > 0:
                    loss = query_loss + weight * support_loss
        stats = {
            "support_loss": support_loss.detach(),
            "query_loss": query_loss.detach(),
            "query_logits": q_logits.detach(),
        }
        return loss, stats

    def predict(self, batch: TaskBatch, lookup: EmbeddingLookup, adapted: bool) -> Tensor:
        """(T, Q) query logits for evaluation (``sigmoid`` for probabilities); no graph is kept.

        ``adapted``: first run the inner loop on each task's support set (first order; for ``none``
        this is fine-tuning, the fair comparison); otherwise score the query at the shared weights.
        The inner loop is the config's, or with a ``schedule`` set (``gmeta.meta.schedule``) the one
        of the task's support-size bucket.
        """
        params = {k: v.detach() for k, v in self._params().items()}
        rows = lookup.rows.detach()
        if adapted and self.schedule is not None:
            return self._predict_scheduled(self.schedule, params, rows, batch, lookup)
        if adapted and self.cfg.adapts:
            return self.backend.adapted_logits(params, rows, lookup, batch, Pass.EVALUATE).query.detach()
        with torch.no_grad():
            return self.backend.shared_logits(params, rows, lookup.query, batch.query)

    def predict_with(self, setting: InnerSetting, batch: TaskBatch, lookup: EmbeddingLookup) -> Tensor:
        """(T, Q) query logits after the inner loop ``setting`` on every task (no schedule)."""
        params = {k: v.detach() for k, v in self._params().items()}
        rows = lookup.rows.detach()
        if not setting.adapts:
            with torch.no_grad():
                return self.backend.shared_logits(params, rows, lookup.query, batch.query)
        backend = self._backend_for(setting)
        return backend.adapted_logits(params, rows, lookup, batch, Pass.EVALUATE).query.detach()

    def _backend_for(self, setting: InnerSetting) -> MetaBackend:
        if setting not in self._setting_backends:
            # learned rates: the setting's lr scales them as it would scale meta.inner_lr
            scale = setting.lr / self.cfg.inner_lr
            inner = InnerLoop(
                setting.steps,
                setting.lr,
                setting.groups,
                self.cfg.adapt_embeddings,
                learned=self.inner_lrs,
                lr_scale=scale,
                embedding_fields=self.embedding_fields,
            )
            self._setting_backends[setting] = make_backend(self.model, self.cfg, inner)
        return self._setting_backends[setting]

    def _predict_scheduled(
        self,
        schedule: AdaptationSchedule,
        params: dict[str, Tensor],
        rows: Tensor,
        batch: TaskBatch,
        lookup: EmbeddingLookup,
    ) -> Tensor:
        """Each task adapts with the inner loop of its support-size bucket (of its state's buckets, if
        the schedule has them). A backend runs whole batches, so each inner loop in use costs one
        pass over the batch; only its tasks' rows are kept."""
        chosen = schedule.settings_of(batch.support.mask.sum(1), batch.state)
        with torch.no_grad():
            out = self.backend.shared_logits(params, rows, lookup.query, batch.query)
        for setting, tasks in chosen.items():
            logits = self._backend_for(setting).adapted_logits(params, rows, lookup, batch, Pass.EVALUATE)
            out[tasks] = logits.query.detach()[tasks]
        return out
