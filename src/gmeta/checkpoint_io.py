"""Checkpoint files that are complete or absent, and one clear message for a file that is not one.

Lightning's ``TorchCheckpointIO`` writes through fsspec's local "transaction": a temporary file from
``mkstemp()`` in ``$TMPDIR``, moved into place at the end. Across file systems the move is a copy,
so a kill or a full disk during it leaves a truncated file under the final name (and ``last.ckpt``
is the file a resume trusts). ``AtomicCheckpointIO`` instead writes a temporary file in the
destination folder, flushes it to disk (``fsync``), renames it over the final name (atomic on POSIX
file systems) and syncs the folder, so the final name holds either the previous complete checkpoint
or the new complete one, whatever happens when.

Loading wraps every way a file can fail to be a checkpoint (missing, empty, truncated, not a
PyTorch file, a PyTorch file that is not a training checkpoint) into ``CheckpointError`` saying what
the file is and what was expected, instead of ``OSError: [Errno 22]`` or ``KeyError``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH

from gmeta.errors import UserError

log = logging.getLogger(__name__)

#: keys every Lightning training checkpoint has (``Trainer.save_checkpoint``)
REQUIRED_KEYS = ("state_dict", "pytorch-lightning_version")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be written, or a file that is not a usable checkpoint."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories; the rename itself is still atomic
    finally:
        os.close(fd)


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``: temporary file in the same folder, fsync, rename, fsync folder.

    On any failure the temporary file is removed and ``path`` is untouched; a full disk raises
    ``CheckpointError`` naming the folder and the free space.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # a fresh name in the destination folder (same file system: the rename cannot become a copy);
    # os.open with 0o666 keeps the umask's permissions, as a plain open() would
    tmp = folder / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and _no_space(e):
            free = _free_bytes(folder)
            raise CheckpointError(
                f"cannot write checkpoint {path}: no space left on the device of {folder} "
                f"({free / 2**20:.1f} MiB free). Nothing was written under that name (the previous "
                "file, if any, is intact); free some space or point callbacks' dirpath elsewhere"
            ) from e
        raise
    _fsync_dir(folder)


def _free_bytes(folder: Path) -> int:
    try:
        return os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    except OSError:
        return 0


def _describe(path: Path) -> str:
    """What a file that torch could not load looks like (for the error message)."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # a zip archive, torch's format since 1.6
        if not zipfile.is_zipfile(path):
            return f"a truncated PyTorch file ({size} bytes, the end of the zip archive is missing)"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the first member whose CRC does not match, or None
        if bad is not None:
            return f"a corrupt PyTorch file ({size} bytes, member {bad} of its zip archive is damaged)"
        return f"a PyTorch file ({size} bytes) whose contents torch could not read"
    return f"not a PyTorch file ({size} bytes starting with {head!r})"


def read_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights_only: bool | None = False,
    load: Callable[..., Any] | None = None,
    verify_crc: bool = True,
) -> dict[str, Any]:
    """Load a Lightning checkpoint file, or raise ``CheckpointError`` saying what the file is.

    ``load`` (default ``torch.load``) does the reading; checkpoints written by gmeta hold numpy
    and plain Python objects besides tensors, hence ``weights_only=False`` by default: load only
    checkpoints you trust. ``verify_crc`` reads the file once more to check every member's CRC
    (torch does not), so that a damaged byte is an error rather than a silently different weight.
    """
    path = Path(path)
    expected = "expected a checkpoint written by gmeta's train.py (a PyTorch Lightning checkpoint)"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, {expected} file")
    load = load or torch.load
    # torch.load does not check the zip archive's CRCs: bit rot inside a tensor would load silently
    if verify_crc and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded: it is {_describe(path)}; {expected}; resume from "
                "another checkpoint of the run (last.ckpt, epoch_*.ckpt, hpc_ckpt_*.ckpt)"
            )
    try:
        ckpt = load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise  # torch's own message says which types were refused and how to allow them
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_describe(path)}; {expected}") from e
    except Exception as e:
        what = _describe(path)
        hint = (
            "; a kill or a full disk during an older, non-atomic save can leave such a file: "
            "resume from another checkpoint of the run (last.ckpt, epoch_*.ckpt, hpc_ckpt_*.ckpt)"
            if "truncated" in what or "empty" in what or "corrupt" in what
            else ""
        )
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: it is {what}; {expected}{hint} "
            f"(torch said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        held = (
            f"a dict with keys {sorted(map(str, ckpt))[:8]}{' ...' if len(ckpt) > 8 else ''}"
            if isinstance(ckpt, dict)
            else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(
            f"checkpoint {path} is a PyTorch file but not a training checkpoint: it holds {held}; "
            f"{expected}, with keys {list(REQUIRED_KEYS)} (a bare model state_dict cannot be resumed)"
        )
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes (``atomic_save``) and clear load errors
    (``read_checkpoint``); remote URLs (``s3://`` ...) keep Lightning's fsspec path."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)
