"""Shards: deterministic bytes, manifest contents, exact round trip, idempotent prepare, format v2,
columnar collation equal to per-record collation."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from gmeta.data.batch import (
    batch_from_arrays,
    batch_to_arrays,
    collate_chunk_runs,
    collate_chunk_tasks,
    collate_tasks,
)
from gmeta.data.shards import (
    MANIFEST,
    ShardError,
    decode_task,
    encode_task,
    iter_shard,
    prepare_shards,
    read_manifest,
    read_shard,
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


def test_chunk_collation_equals_record_collation(shard_dir):
    m = read_manifest(shard_dir)
    chunks = [
        read_shard(p, m.schema, s["tasks"])
        for p, s in zip(m.shard_paths("train"), m.shards("train"), strict=True)
    ]
    items = [(c, i) for c in chunks for i in range(c.num_tasks)]
    rng = np.random.default_rng(0)
    shuffled = [items[j] for j in rng.permutation(len(items))[:13]]  # several chunks, interleaved
    grouped = sorted(shuffled, key=lambda t: id(t[0]))  # each chunk's tasks adjacent
    runs = [
        (chunks[1], np.array([4, 0, 7])),
        (chunks[0], np.array([], dtype=np.int64)),
        (chunks[3], np.array([2])),
    ]
    run_items = [(c, int(i)) for c, ix in runs for i in ix]
    cases = [(collate_chunk_tasks(b), b) for b in (shuffled, grouped, items[3:9], items[:1])]
    cases.append((collate_chunk_runs(runs), run_items))
    for fast, batch_items in cases:
        ref = collate_tasks([c.record(i) for c, i in batch_items])
        assert fast.task_ids == ref.task_ids
        assert torch.equal(fast.state, ref.state) and torch.equal(fast.task_mask, ref.task_mask)
        for which in ("support", "query"):
            for f in ("sparse", "multi_hot", "dense", "label", "mask"):
                a, b = getattr(getattr(fast, which), f), getattr(getattr(ref, which), f)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (which, f)


def test_wire_form_round_trip(shard_dir):
    m = read_manifest(shard_dir)
    batch = collate_tasks(list(iter_shard(m.shard_paths("val")[0], m.schema))[:5])
    back = batch_from_arrays(*batch_to_arrays(batch))
    assert back.task_ids == batch.task_ids
    for a, b in zip(_tensors(back), _tensors(batch), strict=True):
        assert torch.equal(a, b)


def _tensors(batch):
    yield batch.state
    yield batch.task_mask
    for which in ("support", "query"):
        s = getattr(batch, which)
        yield from (s.sparse, s.multi_hot, s.dense, s.label, s.mask)


def test_record_encoding_round_trip_and_one_member_per_task(shard_dir, small_splits):
    rec = small_splits.train[0]
    sample = encode_task(rec, 7)
    assert set(sample) == {"__key__", "task"} and "." not in sample["__key__"]
    back = decode_task(sample, "x.tar", small_splits.schema)
    assert back.task_id == rec.task_id and back.state == rec.state
    for k, a in rec.arrays.items():
        assert back.arrays[k].dtype == a.dtype and back.arrays[k].tobytes() == a.tobytes()
    with pytest.raises(ShardError, match=r"record 'k' in x.tar has no .task member .*format-1"):
        decode_task({"__key__": "k", "meta.json": b"{}"}, "x.tar", small_splits.schema)
    m = read_manifest(shard_dir)
    with tarfile.open(m.shard_paths("train")[0]) as tf:
        names = tf.getnames()
    assert len(names) == m.shards("train")[0]["tasks"] and all(n.endswith(".task") for n in names)


def test_older_format_is_a_clear_error_and_prepare_rebuilds(tmp_path, caplog):
    src = SyntheticSource(num_users=40, num_items=80, min_interactions=8, max_interactions=30, seed=1)
    cfg = TaskConfig(min_interactions=6, max_interactions=30, query_size=3)
    out = prepare_shards(src, cfg, tmp_path / "s", tasks_per_shard=8, seed=0)
    data = json.loads((out / MANIFEST).read_text())
    data["format_version"] = 1
    (out / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"format 'gmeta-task-shards' v1, expected .* v2: .*rebuild them"):
        read_manifest(out)
    with pytest.raises(ShardError, match=r"older format built with a different seed"):
        prepare_shards(src, cfg, out, tasks_per_shard=8, seed=1)
    with caplog.at_level("WARNING"):
        prepare_shards(src, cfg, out, tasks_per_shard=8, seed=0)
    assert "older format" in caplog.text
    assert read_manifest(out).data["format_version"] == 2


def test_shards_stay_webdataset_readable(shard_dir):
    """The webdataset library itself reads a shard as one {"__key__", "task"} sample per task."""
    import webdataset as wds

    m = read_manifest(shard_dir)
    path = m.shard_paths("train")[1]
    samples = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    ours = list(iter_shard(path, m.schema, m.shards("train")[1]["tasks"]))
    assert len(samples) == len(ours) and all(set(s) >= {"__key__", "task"} for s in samples)
    for sample, rec in zip(samples, ours, strict=True):
        got = decode_task(sample, path.name, m.schema)
        assert got.task_id == rec.task_id and got.state == rec.state
        assert all(got.arrays[k].tobytes() == a.tobytes() for k, a in rec.arrays.items())
