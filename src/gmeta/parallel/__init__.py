"""Hybrid parallelism: row-sharded embedding tables (AlltoAll) + data-parallel dense towers."""

from gmeta.parallel.comm import CollectiveError, Communicator, shutdown_process_group
from gmeta.parallel.sharded_embedding import ShardedEmbeddingCollection, shard_embeddings
from gmeta.parallel.strategy import HybridParallelStrategy

__all__ = [
    "CollectiveError",
    "Communicator",
    "HybridParallelStrategy",
    "ShardedEmbeddingCollection",
    "shard_embeddings",
    "shutdown_process_group",
]
