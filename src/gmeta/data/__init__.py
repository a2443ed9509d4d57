"""Data: sources -> tasks -> task-grouped shards -> streaming DataModule -> TaskBatch."""
