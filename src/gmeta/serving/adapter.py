"""Few-shot adaptation for new users: load a checkpoint, adapt on a handful of interactions, score items.

A new user (any value of the grouping key) brings *support* interactions (rows with the schema's
columns, label included) and a list of *candidate* items (rows without labels). ``FewShotAdapter``
encodes both with the checkpoint's training ``FeatureEncoder`` (``gmeta.data.encoder``: the same
object the shard build fitted, so ids never seen in training map to the OOV row 0 or to their hash
bucket exactly as in training), builds one task per user (support = the user's interactions in time
order, query = the candidates in input order), runs the same inner loop as evaluation for many users
at once, and returns a probability per candidate. For the same task it gives the evaluation path's
scores.

The steps live in ``gmeta.serving``, one concern each:

* ``gmeta.serving.checkpoint``: load the checkpoint and find its encoder (in the checkpoint, a shard
  folder, or the run directory);
* ``gmeta.serving.inputs``: read raw files, check columns, complete candidate rows with item and user
  columns (``fill_candidate_features``);
* ``gmeta.serving.user_tasks``: encode and group rows into one task per user, and batch the tasks;
* here: scoring a batch (adapted and plain) and assembling the output table.

Shapes: a batch holds T users, S = the most support rows of one of them, Q = the most candidates.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gmeta.data.batch import TaskBatch
from gmeta.data.encoder import FeatureEncoder
from gmeta.meta.module import MetaDLRMModule
from gmeta.serving.checkpoint import find_encoder, load_checkpoint
from gmeta.serving.inputs import fill_candidate_features, read_table
from gmeta.serving.user_tasks import UserTask, build_user_tasks, task_batches

log = logging.getLogger(__name__)


class FewShotAdapter:
    """Adapt a trained meta-DLRM to new users on their support interactions and score candidates.

    Args:
        module: a trained ``MetaDLRMModule`` (moved to ``device`` and put in eval mode).
        encoder: the training feature encoder (``gmeta.serving.checkpoint.find_encoder``).
        device: where to run (``"cpu"``, ``"cuda"``, ...).
        batch_users: users per inner-loop batch (memory grows with users x support x candidates).
    """

    def __init__(
        self,
        module: MetaDLRMModule,
        encoder: FeatureEncoder,
        device: str | torch.device = "cpu",
        batch_users: int = 256,
    ) -> None:
        if batch_users < 1:
            raise ValueError(f"batch_users must be >= 1, got {batch_users}")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.encoder = encoder
        self.schema = encoder.schema
        self.batch_users = batch_users

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | Path,
        data_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_users: int = 256,
        label_threshold: float | None | str = "training",
    ) -> FewShotAdapter:
        """Load a Lightning checkpoint (a file or a sharded directory) and its training encoder.

        ``label_threshold``: ``"training"`` uses the training data's threshold (the encoder's); a
        number or None overrides it (None: support labels must be 0/1).
        """
        module, checkpoint = load_checkpoint(ckpt_path)
        encoder = find_encoder(module.schema, checkpoint, data_dir=data_dir, ckpt_path=ckpt_path)
        if label_threshold != "training":
            threshold = None if label_threshold is None else float(label_threshold)
            encoder = dataclasses.replace(encoder, label_threshold=threshold)
        log.info("loaded %s (encoder from %s) on %s", ckpt_path, encoder.origin, device)
        return cls(module, encoder, device=device, batch_users=batch_users)

    # -- inputs --------------------------------------------------------------------------------
    def feature_columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    def id_columns(self, key: str | None = None) -> list[str]:
        """Columns read as strings: the key, the id fields and the item column."""
        item = [self.encoder.item_key] if self.encoder.item_key else []
        return list(
            dict.fromkeys([key or self.schema.task_key, *(f.name for f in self.schema.id_fields), *item])
        )

    def read(self, path: str | Path, key: str | None = None) -> pd.DataFrame:
        """``read_table`` with this model's id columns read as strings."""
        return read_table(path, self.id_columns(key))

    def fill_candidates(
        self,
        candidates: pd.DataFrame,
        support: pd.DataFrame,
        items: pd.DataFrame | None = None,
        user_columns: Sequence[str] = (),
        key: str | None = None,
        item_key: str | None = None,
        names: tuple[str, str, str] = ("candidates", "support", "items"),
    ) -> pd.DataFrame:
        """``fill_candidate_features`` with this model's schema, key and item column."""
        return fill_candidate_features(
            candidates,
            support,
            self.schema,
            key or self.schema.task_key,
            items=items,
            item_key=item_key or self.encoder.item_key,
            user_columns=user_columns,
            names=names,
        )

    # -- building tasks ------------------------------------------------------------------------
    def build_tasks(
        self,
        support: pd.DataFrame,
        candidates: pd.DataFrame,
        key: str | None = None,
        names: tuple[str, str] = ("support", "candidates"),
    ) -> list[UserTask]:
        """``build_user_tasks`` with this model's encoder; ``key`` defaults to the schema's task key."""
        return build_user_tasks(support, candidates, self.encoder, key or self.schema.task_key, names)

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_batch(self, batch: TaskBatch, plain: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, Q) probabilities after adaptation and, if ``plain``, at the shared (meta-learned) weights.

        Exactly the evaluation path: one ``embedding.lookup`` then ``MetaLearner.predict`` per mode.
        """
        m = self.module
        batch = batch.to(self.device)
        lookup = m.embedding.lookup(batch)
        adapted = m.learner.predict(batch, lookup, adapted=True)
        shared = m.learner.predict(batch, lookup, adapted=False) if plain else None
        return torch.sigmoid(adapted).cpu(), (torch.sigmoid(shared).cpu() if shared is not None else None)

    def score_tasks(
        self, tasks: Sequence[UserTask], plain: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per task, (adapted probabilities, plain probabilities) of its candidates, in input order.

        Tasks run in batches of ``batch_users`` (padded to the longest support / candidate list). A
        task with an empty support set gets its plain score as the adapted score.
        """
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for chunk, batch in task_batches(tasks, self.batch_users):
            need_plain = plain or any(t.support_size == 0 for t in chunk)
            adapted, shared = self.score_batch(batch, plain=need_plain)
            for i, t in enumerate(chunk):
                nq = len(t.candidate_rows)
                a = adapted[i, :nq].double().numpy()
                s = shared[i, :nq].double().numpy() if shared is not None else None
                if t.support_size == 0:
                    assert s is not None  # need_plain holds for a task with an empty support set
                    a = s.copy()
                out.append((a, s if plain else None))
        return out

    def score(
        self,
        support: pd.DataFrame,
        candidates: pd.DataFrame,
        key: str | None = None,
        plain: bool = True,
        item_column: str | None = None,
        names: tuple[str, str] = ("support", "candidates"),
    ) -> pd.DataFrame:
        """Adapt to every user in ``candidates`` on their ``support`` rows and score their candidates.

        Args:
            support: labelled interactions (the schema's feature columns, label, optionally time).
            candidates: rows to score, every feature column filled (``fill_candidate_features``).
            key: column grouping rows into users; default the schema's task key.
            plain: also return ``score_plain`` (no adaptation), for comparison.
            item_column: candidates' column copied into the output (default: the training item key).
            names: how to call the two tables in error messages (e.g. their file names).

        Returns:
            One row per candidate, in the candidates' input order: the key, the item column (if any),
            ``score`` (probability after adaptation), ``score_plain``, ``rank`` (1 = best, per user),
            ``support_size``, ``adapted`` (False when the user had no support rows: plain score),
            ``user_known`` (the user id has a trained embedding; None if the task key is not an unhashed sparse field).
        """
        key = key or self.schema.task_key
        candidates = candidates.reset_index(drop=True)
        tasks = self.build_tasks(support, candidates, key=key, names=names)
        scores = self.score_tasks(tasks, plain=plain)
        n = len(candidates)
        result: dict[str, np.ndarray] = {
            "score": np.full(n, np.nan),
            "score_plain": np.full(n, np.nan),
            "support_size": np.zeros(n, np.int64),
            "adapted": np.zeros(n, bool),
            "user_known": np.full(n, None, dtype=object),
        }
        for t, (a, s) in zip(tasks, scores, strict=True):
            rows = t.candidate_rows
            result["score"][rows] = a
            if s is not None:
                result["score_plain"][rows] = s
            result["support_size"][rows] = t.support_size
            result["adapted"][rows] = t.support_size > 0
            result["user_known"][rows] = t.user_known
        empty = [t.key for t in tasks if t.support_size == 0]
        if empty:
            log.warning(
                "%d user(s) have no support rows: their score is the un-adapted one (adapted=False): %s",
                len(empty),
                empty[:5],
            )
        item_column = item_column or self.encoder.item_key
        out = pd.DataFrame({key: candidates[key].astype(str)})
        if item_column and item_column in candidates.columns and item_column != key:
            out[item_column] = candidates[item_column].astype(str)
        out["score"] = result["score"]
        if plain:
            out["score_plain"] = result["score_plain"]
        out["rank"] = (
            out.groupby(key, sort=False)["score"].rank(ascending=False, method="first").astype(np.int64)
        )
        out["support_size"] = result["support_size"]
        out["adapted"] = result["adapted"]
        out["user_known"] = result["user_known"]
        return out
