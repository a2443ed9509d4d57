"""Few-shot serving: ``adapter.FewShotAdapter`` composes the parts and scores.

* ``inputs``: reading raw interaction files, checking their columns, completing candidate rows;
* ``checkpoint``: loading a checkpoint and finding its training ``FeatureEncoder``
  (``gmeta.data.encoder``) in the checkpoint, a shard folder or the run directory;
* ``user_tasks``: one task per user from encoded support and candidate rows, and their batches.
"""

from __future__ import annotations

from gmeta.data.schema import SchemaError


class ServeError(SchemaError):
    """Bad serving input (file, row, column named) or a checkpoint without a usable encoder."""
