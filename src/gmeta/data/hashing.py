"""The one stable hash of the data pipeline (hash buckets of id fields, val/test split of task keys)."""

from __future__ import annotations

import hashlib


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
