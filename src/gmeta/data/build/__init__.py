"""Out-of-core task building: interaction tables of any size -> task-grouped shards.

The reference builder (``gmeta.data.tasks.build_tasks`` + ``gmeta.data.shards.write_shards``)
holds the whole log in pandas and loops over tasks in Python; it stays as the small-data reference
that the tests compare against. The engines here produce the *same tasks* (ids, states, splits,
support/query arrays, vocabularies) in two stages:

1. **Relational plan** (``duckdb_plan``, or ``spark_plan`` over ``spark_source`` beyond one
   machine): cold-start thresholds, task sizes and filters, positions in time order, the split of
   every task key, vocabularies from the training rows and the encoding of every id, as aggregate,
   window and join passes over an engine that spills to disk. Output: the encoded rows of every
   kept task, hash-partitioned by task key into Parquet files (``plan.PlanResult``), plus the
   vocabularies and build statistics.
2. **Partition writing** (``partitions.write_partition``): a process pool (DuckDB) or Spark's
   executors turn one partition at a time into ``TaskRecord``s and tar shards, streaming; nothing
   holds all tasks.

``prepare_shards`` (in ``gmeta.data.shards``) writes the manifest last, in a temporary folder that
is renamed into place, so an interrupted build never leaves a folder that trains.
"""

from gmeta.data.build.engine import ENGINES, BuildOptions, build_shards

__all__ = ["ENGINES", "BuildOptions", "build_shards"]
