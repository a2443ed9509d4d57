"""Shards through webdataset URLs: http (a local server on 127.0.0.1), pipe:, fsspec, file://; errors
naming the URL; start-up verification modes; the build wait's option and hint."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gmeta.data.batch import TaskBatch
from gmeta.data.datamodule import TaskDataModule, TaskStreamDataset
from gmeta.data.shards import MANIFEST, ShardError, read_manifest
from gmeta.data.stream import as_location, is_url, load_manifest, read_url
from gmeta.data.tasks import SPLITS


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def serve(monkeypatch) -> Iterator:
    """``serve(folder)`` -> ``http://127.0.0.1:<port>`` serving it until the test ends."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(folder: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _module(data_dir, rank=0, world=1, workers=0, **kw) -> TaskDataModule:
    dm = TaskDataModule(
        data_dir,
        batch_tasks=6,
        eval_batch_tasks=6,
        num_workers=workers,
        shuffle_buffer=8,
        rank=rank,
        world_size=world,
        **kw,
    )
    dm.setup()
    return dm


def _tensors(batch: TaskBatch) -> list[torch.Tensor]:
    sets = [batch.support, batch.query]
    return [getattr(s, f) for s in sets for f in ("sparse", "multi_hot", "dense", "label", "mask")] + [
        batch.state,
        batch.task_mask,
    ]


def _assert_same_batches(got: list[TaskBatch], want: list[TaskBatch]) -> None:
    assert len(got) == len(want) and want
    for g, w in zip(got, want, strict=True):
        assert g.task_ids == w.task_ids
        for a, b in zip(_tensors(g), _tensors(w), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _epochs(dm: TaskDataModule, split: str, n: int = 2) -> list[TaskBatch]:
    loader = getattr(dm, f"{split}_dataloader")()
    return [b for _ in range(n) for b in loader]  # the loader advances the epoch per iteration


@pytest.mark.parametrize(
    ("world", "workers", "rank_split"), [(1, 0, "shards"), (2, 2, "shards"), (3, 0, "batches")]
)
def test_http_data_dir_gives_the_local_batches(shard_dir, serve, world, workers, rank_split):
    url = serve(shard_dir)
    for rank in range(world):
        remote = _module(url, rank, world, workers, rank_split=rank_split)
        local = _module(shard_dir, rank, world, workers, rank_split=rank_split)
        assert remote.remote and remote.manifest.shard_paths("train")[0] == f"{url}/train/shard-000000.tar"
        for split in SPLITS:
            _assert_same_batches(_epochs(remote, split), _epochs(local, split))
    assert _module(url).state_dict()["vocab"] == _module(shard_dir).state_dict()["vocab"]


def test_pipe_urls_give_the_local_batches(shard_dir):
    m = read_manifest(shard_dir)
    tasks = [s["tasks"] for s in m.shards("train")]

    def batches(shards) -> list[TaskBatch]:
        ds = TaskStreamDataset(shards, tasks, m.schema, 4, shuffle=True, shuffle_buffer=8, seed=5)
        ds.set_epoch(1)
        return list(ds)

    piped = [f"pipe:cat {p}" for p in m.shard_paths("train")]
    assert all(is_url(p) for p in piped)
    _assert_same_batches(batches(piped), batches(m.shard_paths("train")))


def test_fsspec_and_file_urls_give_the_local_batches(shard_dir):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = "memory://gmeta-test-shards"
    for path in sorted(shard_dir.rglob("*")):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(shard_dir).as_posix()}", path.read_bytes())
    try:
        remote = _module(root, verify="full")  # full: every shard read through fsspec and hashed
        assert remote.remote
        local = _module(shard_dir)
        for split in SPLITS:
            _assert_same_batches(_epochs(remote, split), _epochs(local, split))
    finally:
        fs.rm(root, recursive=True)
    as_file = _module(f"file://{shard_dir}")
    assert as_file.data_dir == as_location(shard_dir) == shard_dir and not as_file.remote
    m = read_manifest(shard_dir)
    tasks = [s["tasks"] for s in m.shards("val")]
    via_url = TaskStreamDataset([f"file://{p}" for p in m.shard_paths("val")], tasks, m.schema, 5)
    plain = TaskStreamDataset(m.shard_paths("val"), tasks, m.schema, 5)
    _assert_same_batches(list(via_url), list(plain))


def _stream(shards, m, split="val") -> list[TaskBatch]:
    tasks = [s["tasks"] for s in m.shards(split)][: len(shards)]
    return list(TaskStreamDataset(shards, tasks, m.schema, 5))


def test_unreachable_or_malformed_shard_urls_are_errors_naming_them(shard_dir, serve, tmp_path):
    url = serve(shard_dir)
    m = read_manifest(shard_dir)
    missing = f"{url}/val/shard-999999.tar"
    with pytest.raises(ShardError, match=rf"shard {missing}: cannot be read .*curl.*status 22: .*HTTP error"):
        _stream([f"{url}/val/shard-000000.tar", missing], m)
    not_a_tar = f"{url}/{MANIFEST}"
    with pytest.raises(ShardError, match=rf"shard {not_a_tar}: corrupt or truncated tar after 0 tasks"):
        _stream([not_a_tar], m)
    for bad in ("nosuchscheme://somewhere/shard-000000.tar", "pipe:cat /nonexistent/shard-000000.tar"):
        with pytest.raises(ShardError, match=rf"shard {bad}: cannot be (opened|read)"):
            _stream([bad], m)
    with pytest.raises(ShardError, match=r"status 1"):
        _stream(["pipe:cat /nonexistent/shard-000000.tar"], m)
    # a server that is not there: connection refused (curl exits 7), named with its URL
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    port = server.server_address[1]
    server.server_close()
    gone = f"http://127.0.0.1:{port}/val/shard-000000.tar"
    with pytest.raises(ShardError, match=rf"shard {gone}: cannot be read .*status 7: could not connect"):
        _stream([gone], m)
    # the manifest itself: missing, or not JSON
    with pytest.raises(ShardError, match=rf"manifest {url}/nothing/{MANIFEST}: cannot be read"):
        TaskDataModule(f"{url}/nothing").setup()
    (tmp_path / MANIFEST).write_text("{not json")
    bad_json = serve(tmp_path)
    with pytest.raises(ShardError, match=rf"{bad_json}/{MANIFEST}: not valid JSON"):
        load_manifest(bad_json)


def test_a_shard_of_the_wrong_size_or_count_fails_when_read_naming_it(shard_dir, serve, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    url = serve(root)
    path = root / "val" / "shard-000001.tar"
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + ((last.size + 511) // 512) * 512
    path.write_bytes(path.read_bytes()[:end])  # every task complete, the end-of-archive blocks cut off
    dm = _module(url)  # remote: nothing read at setup
    with pytest.raises(ShardError, match=rf"shard {url}/val/shard-000001.tar: \d+ bytes, manifest says"):
        list(dm.val_dataloader())
    data = json.loads((root / MANIFEST).read_text())
    data["splits"]["val"]["shards"][1]["bytes"] = path.stat().st_size  # size now agrees, the tar does not
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"val/shard-000001.tar: corrupt or truncated tar after 20 tasks"):
        list(_module(url).val_dataloader())


def test_sizes_mode_checks_only_this_ranks_shards_and_full_mode_hashes_all(shard_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    probe = _module(root, rank=0, world=2).dataset("train")
    mine = {r: set(probe.rank_shards(0, 0)) if r == 0 else None for r in range(2)}
    other = _module(root, rank=1, world=2).dataset("train")
    mine[1] = set(other.rank_shards(0, 0))
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == set(range(5))
    victim = min(mine[1])
    path = root / "train" / f"shard-{victim:06d}.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first record: same size, other sha256
    path.write_bytes(bytes(data[:-512]))  # and 512 bytes short
    rank0 = _module(root, rank=0, world=2)
    assert rank0.verify == "sizes"
    rank0.train_dataloader()  # rank 0 reads other shards: not its business at start-up
    rank1 = _module(root, rank=1, world=2)
    with pytest.raises(ShardError, match=rf"train/shard-{victim:06d}.tar: \d+ bytes, manifest says"):
        rank1.train_dataloader()
    with pytest.raises(ShardError, match=rf"train/shard-{victim:06d}.tar: \d+ bytes, manifest says"):
        _module(root, rank=0, world=2, verify="full")  # full: every shard, every rank, at setup
    path.write_bytes(bytes(data))  # right size, wrong content
    rank1 = _module(root, rank=1, world=2)
    rank1.train_dataloader()  # sizes agree: start-up passes
    with pytest.raises(ShardError, match=rf"train/shard-{victim:06d}.tar: sha256 mismatch"):
        _module(root, verify="full")
    (root / "val" / "shard-000002.tar").unlink()
    _module(root).train_dataloader()  # only val misses a shard
    with pytest.raises(ShardError, match=r"val/shard-000002.tar listed in .*manifest.json is missing"):
        _module(root).val_dataloader()


def test_full_verification_of_remote_shards_names_the_url(shard_dir, serve, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    url = serve(root)
    _module(url, verify="full")  # every shard fetched and hashed: all agree
    data = json.loads((root / MANIFEST).read_text())
    data["splits"]["test"]["shards"][0]["sha256"] = "0" * 64
    (root / MANIFEST).write_text(json.dumps(data))
    _module(url)  # sizes: no hashing
    with pytest.raises(ShardError, match=rf"shard {url}/test/shard-000000.tar: sha256 mismatch"):
        _module(url, verify="full")


def test_manifest_inconsistency_is_caught_at_setup(shard_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    data = json.loads((root / MANIFEST).read_text())
    data["splits"]["train"]["tasks"] = 1
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"split train lists 1 tasks but its shards add up to 82"):
        _module(root)


def test_verify_options_and_the_old_flag(shard_dir):
    assert TaskDataModule(shard_dir).verify == "sizes"
    assert TaskDataModule(shard_dir, verify_checksums=True).verify == "full"
    assert TaskDataModule(shard_dir, verify_checksums=False).verify == "sizes"
    assert TaskDataModule(shard_dir, verify="full", verify_checksums=True).verify == "full"
    with pytest.raises(ValueError, match=r"data.verify='sizes' contradicts data.verify_checksums=True"):
        TaskDataModule(shard_dir, verify="sizes", verify_checksums=True)
    with pytest.raises(ValueError, match=r"data.verify must be one of \('sizes', 'full'\), got 'sha'"):
        TaskDataModule(shard_dir, verify="sha")


def test_build_wait_is_an_option_and_its_timeout_says_how_to_prebuild(tmp_path):
    dm = TaskDataModule(tmp_path / "never", build_wait_s=0.2)
    with pytest.raises(
        TimeoutError, match=r"within 0 s .*python scripts/prepare_data.py <the same data overrides"
    ):
        dm.wait_for_shards(poll_s=0.05)


def test_read_url_reads_local_paths_and_names_missing_ones(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert read_url(tmp_path / "a.bin") == read_url(f"pipe:cat {tmp_path / 'a.bin'}") == b"abc"
    with pytest.raises(
        ShardError, match=rf"shard {tmp_path / 'b.bin'}: cannot be opened .*FileNotFoundError"
    ):
        read_url(tmp_path / "b.bin")


def test_pipe_data_dir_and_unsafe_manifest_paths(shard_dir, tmp_path):
    piped = _module(f"pipe:cat {shard_dir}")  # "pipe:cat <dir>" + "/manifest.json", "/train/shard-..."
    assert piped.manifest.shard_paths("val")[0] == f"pipe:cat {shard_dir}/val/shard-000000.tar"
    _assert_same_batches(_epochs(piped, "train"), _epochs(_module(shard_dir), "train"))
    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    data = json.loads((root / MANIFEST).read_text())
    data["splits"]["val"]["shards"][0]["path"] = "val/x.tar; touch /tmp/owned"
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(
        ShardError, match=r"shard path 'val/x.tar; touch /tmp/owned' of split val is not a plain"
    ):
        load_manifest(f"pipe:cat {root}")
