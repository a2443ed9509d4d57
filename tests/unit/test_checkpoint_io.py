"""Atomic checkpoint writes and one clear message for every file that is not a checkpoint."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from gmeta import checkpoint_io
from gmeta.checkpoint_io import AtomicCheckpointIO, CheckpointError, atomic_save, read_checkpoint
from gmeta.errors import UserError


def _ckpt(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64, 8), value)}, "pytorch-lightning_version": "2.6.6", "epoch": 0}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_writes_in_the_destination_folder_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), path)
    AtomicCheckpointIO().save_checkpoint(_ckpt(2.0), path)  # replaces the previous file
    got = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(got["state_dict"]["w"], torch.full((64, 8), 2.0))
    assert _leftovers(path.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it


class _FullDisk:
    """A file object whose writes fail with ENOSPC after ``limit`` bytes (what a full disk does)."""

    def __init__(self, f, limit: int) -> None:
        self.f, self.left = f, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            self.f.write(bytes(data)[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save(_ckpt(1.0), path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoint_io.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), 1000))
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*last.ckpt: no space left on the device"
    ):
        atomic_save(_ckpt(2.0), path)
    assert path.read_bytes() == before  # the final name still holds the complete previous file
    assert _leftovers(tmp_path) == []  # and the partial temporary file is gone


def test_a_kill_during_the_write_leaves_only_a_hidden_temporary_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save(_ckpt(1.0), path)
    before = path.read_bytes()

    def killed(*args, **kwargs):  # the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_ckpt(2.0), path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, good: p.write_bytes(b""), r"it is an empty file \(0 bytes\)"),
        (lambda p, good: p.write_bytes(good[: len(good) // 2]), r"it is a truncated PyTorch file"),
        (
            lambda p, good: p.write_bytes(b"hello, not a checkpoint\n"),
            r"it is not a PyTorch file \(24 bytes starting with b'hell'\)",
        ),
        (
            lambda p, good: torch.save({"w": torch.zeros(2)}, p),
            r"PyTorch file but not a training checkpoint: it holds a dict with keys \['w'\]",
        ),
        (
            lambda p, good: torch.save(torch.zeros(2), p),
            r"PyTorch file but not a training checkpoint: it holds a Tensor",
        ),
    ],
    ids=["empty", "truncated", "foreign", "bare-state-dict", "tensor"],
)
def test_a_file_that_is_not_a_checkpoint_gets_one_clear_message(tmp_path: Path, make, message) -> None:
    good = tmp_path / "good.ckpt"
    atomic_save(_ckpt(), good)
    bad = tmp_path / "bad.ckpt"
    make(bad, good.read_bytes())
    with pytest.raises(CheckpointError, match=message) as info:
        AtomicCheckpointIO().load_checkpoint(bad)
    assert str(bad) in str(info.value) and "expected a checkpoint written by gmeta" in str(info.value)
    assert isinstance(info.value, UserError)  # the entry points report it in one line, exit status 2


def test_a_corrupt_member_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bit_rot.ckpt"
    atomic_save(_ckpt(), path)
    data = bytearray(path.read_bytes())
    i = data.index(b"\x00\x00\x80\x3f")  # inside the stored 1.0 floats of the tensor's data member
    data[i + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt PyTorch file .*member .*data/0 of its zip archive"):
        read_checkpoint(path)


def test_a_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope.ckpt"):
        read_checkpoint(tmp_path / "nope.ckpt")
