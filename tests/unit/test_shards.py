"""Shards: deterministic bytes, manifest contents, exact round trip, idempotent prepare."""

from __future__ import annotations

import json

import pytest

from gmeta.data.shards import (
    MANIFEST,
    ShardError,
    iter_shard,
    prepare_shards,
    read_manifest,
    sha256_file,
    verify_shards,
    write_shards,
)
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import SPLITS, TaskConfig


def test_shard_bytes_are_deterministic(tmp_path, small_splits, small_task_config, shard_dir):
    again = write_shards(small_splits, tmp_path / "again", small_task_config, seed=0, tasks_per_shard=20)
    first = read_manifest(shard_dir).data
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (shard_dir / MANIFEST).read_bytes()
    for split in SPLITS:
        for a, b in zip(again["splits"][split]["shards"], first["splits"][split]["shards"], strict=True):
            assert (tmp_path / "again" / a["path"]).read_bytes() == (shard_dir / b["path"]).read_bytes()


def test_manifest_lists_counts_and_checksums(shard_dir, small_splits):
    m = read_manifest(shard_dir)
    assert m.schema == small_splits.schema
    assert m.data["counts"] == small_splits.stats["counts"]
    assert m.data["filtered"] == small_splits.stats["filtered"]
    for split in SPLITS:
        recs = small_splits.split(split)
        shards = m.shards(split)
        assert m.num_tasks(split) == len(recs) == sum(s["tasks"] for s in shards)
        assert [s["tasks"] for s in shards[:-1]] == [20] * (len(shards) - 1)
        assert m.data["splits"][split]["samples"] == sum(r.num("support") + r.num("query") for r in recs)
        for k, s in enumerate(shards):
            assert s["path"] == f"{split}/shard-{k:06d}.tar"
            assert s["sha256"] == sha256_file(shard_dir / s["path"])
            assert s["bytes"] == (shard_dir / s["path"]).stat().st_size
    assert len(m.shards("train")) == 5
    verify_shards(m)  # no error


def test_round_trip_is_exact(shard_dir, small_splits):
    m = read_manifest(shard_dir)
    for split in SPLITS:
        original = {r.task_id: r for r in small_splits.split(split)}
        read = [
            r
            for path, s in zip(m.shard_paths(split), m.shards(split), strict=True)
            for r in iter_shard(path, m.schema, s["tasks"])
        ]
        assert sorted(r.task_id for r in read) == sorted(original)  # each task exactly once
        for r in read:
            o = original[r.task_id]
            assert r.state == o.state and r.arrays.keys() == o.arrays.keys()
            for k in o.arrays:
                assert r.arrays[k].dtype == o.arrays[k].dtype and r.arrays[k].shape == o.arrays[k].shape
                assert r.arrays[k].tobytes() == o.arrays[k].tobytes()
    # val/test keep build order; train is shuffled once (seeded)
    val_ids = [r.task_id for p in m.shard_paths("val") for r in iter_shard(p, m.schema)]
    assert val_ids == [r.task_id for r in small_splits.val]


def test_prepare_shards_is_idempotent_and_detects_stale(tmp_path):
    src = SyntheticSource(num_users=40, num_items=80, min_interactions=8, max_interactions=30, seed=1)
    cfg = TaskConfig(min_interactions=6, max_interactions=30, query_size=3)
    out = prepare_shards(src, cfg, tmp_path / "s", tasks_per_shard=8, seed=0)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert prepare_shards(src, cfg, out, tasks_per_shard=8, seed=0) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ShardError, match=r"manifest.json was built with a different task_config.*force=True"):
        prepare_shards(src, TaskConfig(min_interactions=7, max_interactions=30, query_size=3), out, seed=0)
    with pytest.raises(ShardError, match="different seed"):
        prepare_shards(src, cfg, out, seed=1)
    prepare_shards(src, cfg, out, tasks_per_shard=8, seed=1, force=True)
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp folders
