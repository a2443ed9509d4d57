"""Sharded checkpoint directories on one process: contents, layout checks, damaged and incomplete saves.

Written and read here without a process group (one "rank"); N -> M resharding with real processes
is in ``tests/distributed/test_hybrid_parallel.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from gmeta.model.embedding import EmbeddingCollection
from gmeta.parallel import sharded_checkpoint as sc
from gmeta.parallel.comm import Communicator

VOCABS = (40, 31, 23, 12)


class Tiny(nn.Module):
    def __init__(
        self, vocabs=VOCABS, dim: int = 4, names=None, deferred: bool = False, init_seed: int = 5
    ) -> None:
        super().__init__()
        self.embedding = EmbeddingCollection(
            vocabs, 2, dim, init_seed=init_seed, field_names=names, device="meta" if deferred else None
        ).double()
        self.tower = nn.Linear(dim, 1).double()


def trained(block_bytes: int = 64) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.arange(0, model.embedding.num_total_rows, 3)
    model.embedding.apply_row_gradients(ids, torch.randn(ids.shape[0], 4, dtype=torch.float64))
    return model


def save(model: nn.Module, path: Path, block_bytes: int = 64) -> None:
    checkpoint = {"state_dict": model.state_dict(), "epoch": 3, "hyper_parameters": {"vocab": ["a", "b"]}}
    sc.save_sharded(checkpoint, path, model, Communicator(), block_bytes=block_bytes)


@pytest.mark.parametrize("deferred", [True, False])
def test_round_trip_in_blocks_restores_every_row_and_the_rest(tmp_path, deferred):
    model = trained()
    path = tmp_path / "last.ckpt"
    save(model, path)  # 64-byte blocks: 2 rows of 4 float64 each, many blocks
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", sc.META_FILE]
    whole = sc.consolidate(path)
    assert whole["epoch"] == 3 and whole["hyper_parameters"] == {"vocab": ["a", "b"]}  # travels along
    assert "gmeta_sharded" not in whole
    for key, value in model.state_dict().items():
        torch.testing.assert_close(whole["state_dict"][key], value, rtol=0, atol=0, msg=key)
    if deferred:  # allocated by the load, not initialised whole
        fresh = Tiny(deferred=True)
    else:  # built, with other rows, other optimizer state and another tower: all replaced by the load
        fresh = Tiny(init_seed=6)
        with torch.no_grad():
            fresh.embedding.optimizer.sum_sq.fill_(3.0)
        for key, value in fresh.state_dict().items():
            assert not torch.equal(value, model.state_dict()[key]), key
    state = sc.load_sharded_into(fresh, path)["state_dict"]
    fresh.load_state_dict(state)
    assert torch.equal(fresh.embedding.weight, model.embedding.weight)
    assert torch.equal(fresh.embedding.optimizer.sum_sq, model.embedding.optimizer.sum_sq)
    assert torch.equal(fresh.tower.weight, model.tower.weight)


def test_a_second_save_replaces_the_first_atomically(tmp_path):
    path = tmp_path / "last.ckpt"
    save(trained(), path)
    model = trained()
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    save(model, path)
    assert torch.equal(sc.consolidate(path)["state_dict"]["embedding.weight"], model.embedding.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary or old copy left


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "last.ckpt"
    first = trained()
    save(first, path)

    def dies(state_dict, storage_writer, **kwargs):  # writes part of a rank file, then the process "dies"
        Path(storage_writer.path, "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save(trained(), path)
    monkeypatch.undo()
    assert torch.equal(sc.consolidate(path)["state_dict"]["embedding.weight"], first.embedding.weight)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-")
    with pytest.raises(sc.CheckpointError, match=r"not a complete sharded checkpoint: meta.pt is missing"):
        sc.consolidate(leftovers[0])  # the half-written directory is never taken for a checkpoint


@pytest.mark.parametrize(
    ("other", "model_has"),
    [
        (
            {"vocabs": (40, 31, 23, 13)},
            r"the model has 107 rows x dim 4 \(vocab sizes \{field0: 40, field1: 31, field2: 23, field3: 13\}",
        ),
        ({"dim": 8}, r"the model has 106 rows x dim 8"),
        (
            {"names": ("user", "item", "genre", "tag")},
            r"the model has 106 rows x dim 4 \(vocab sizes \{user: 40",
        ),
    ],
)
def test_loading_into_another_layout_is_refused_naming_both(tmp_path, other, model_has):
    path = tmp_path / "c.ckpt"
    save(trained(), path)
    saved = (
        r"checkpoint has 106 rows x dim 4 \(vocab sizes \{field0: 40, field1: 31, field2: 23, field3: 12\}"
    )
    with pytest.raises(
        sc.CheckpointError, match=rf"{path}: table 'embedding' does not fit the model: {saved}.*; {model_has}"
    ):
        sc.load_sharded_into(Tiny(**other), path)


def test_a_truncated_or_missing_rank_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.ckpt"
    save(trained(), path)
    rank_file = path / "__0_0.distcp"
    size = rank_file.stat().st_size
    with open(rank_file, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(
        sc.CheckpointError, match=rf"file {rank_file} has {size - 10} bytes, {size} were written"
    ):
        sc.consolidate(path)
    rank_file.unlink()
    with pytest.raises(sc.CheckpointError, match=rf"file {rank_file} is missing"):
        sc.load_sharded_into(Tiny(), path)
