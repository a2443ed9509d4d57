"""What every data source provides: an interaction table plus the Schema describing it."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import pandas as pd

from gmeta.data.schema import Schema


@runtime_checkable
class Source(Protocol):
    """A reader of raw interactions.

    ``load`` returns one row per interaction with every column the schema names (id fields as
    strings, multi-hot fields as separator-joined strings, dense fields as floats) and the schema
    with ``vocab_size`` still 0 (vocabularies are built later from the training split only).
    ``describe`` returns JSON-serialisable parameters stored in the shard manifest, so that stale
    shards built from another source or configuration are detected.
    """

    def load(self) -> tuple[pd.DataFrame, Schema]: ...

    def describe(self) -> dict[str, Any]: ...
