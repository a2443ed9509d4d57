"""Sharded, reshardable checkpoints of row-sharded tables, written with ``torch.distributed.checkpoint``.

A sharded checkpoint is a DIRECTORY (named like a checkpoint file, e.g. ``last.ckpt/``)::

    __0_0.distcp ... __{W-1}_0.distcp   each rank's own table rows and row-wise optimizer state (DCP)
    .metadata                           DCP's index: which block lies in which file, at which offset
    meta.pt                             everything else of the Lightning checkpoint, written once by
                                        rank 0: dense towers and their Adam state, loops, callbacks,
                                        the DataModule state (vocabulary), hyper-parameters; plus
                                        ``gmeta_sharded``: the tables' layout and every file's size

Rows are stored in the layout they were trained in (global row ``g`` on rank ``g % W`` at local row
``g // W``), cut into blocks of at most ``block_rows`` rows; one DCP entry per block, keyed
``<table>.<buffer>/rank<r>/rows<k0>``: block ``(r, k0)`` holds global rows ``r + (k0 + i) * W``. So
saving moves no row between ranks, and loading on M ranks (rank q owns rows ``g % M == q``) reads
only the blocks that hold some of its rows, a bounded number of bytes at a time, into its own rows in
place: no rank ever holds the whole table, whatever W and M. (DCP's own resharding works on contiguous
chunks of a tensor; the modulo layout of two world sizes overlaps in strided row sets, not chunks, so
the row mapping is done here and DCP reads whole blocks by key.)

Complete or absent: every rank writes into ``.<name>.tmp-<token>/`` next to the destination (DCP
fsyncs the files), rank 0 then writes ``meta.pt`` last (with the size of every file), fsyncs, and
renames the directory into place. A save killed half-way leaves only a ``.tmp-`` directory, which is
never loaded; a directory without ``meta.pt``, with a missing file or a file of the wrong size is an
error naming it.

A single process loads a sharded checkpoint whole (``consolidate``: eval, ``gmeta adapt``, ``gmeta
export``), one block at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gmeta.model.embedding import EmbeddingTable, owned_rows
from gmeta.parallel.comm import Communicator

log = logging.getLogger(__name__)

META_FILE = "meta.pt"  # the name Lightning's FSDP/ModelParallel strategies use for the same role
FORMAT_VERSION = 1
#: blocks of at most this many bytes (a reader holds one block, plus the rows it keeps)
BLOCK_BYTES = 32 * 2**20
#: a loading rank reads blocks in groups of at most this many bytes
READ_BYTES = 128 * 2**20


class CheckpointError(RuntimeError):
    """A sharded checkpoint is incomplete, damaged, or does not fit the model."""


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A directory checkpoint (complete or not: ``read_meta`` says which)."""
    return Path(path).is_dir()


# -- layout ---------------------------------------------------------------------------------------


def tables_of(module: nn.Module) -> dict[str, EmbeddingTable]:
    """Qualified name -> every embedding table (sharded or not) inside ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, EmbeddingTable)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def table_layout(table: EmbeddingTable) -> dict[str, Any]:
    """What must agree between a checkpoint and a model for its rows to load (world size excluded)."""
    buffers = {
        buf: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
        for buf, t in table.row_state().items()
    }
    return {
        "fields": [[n, int(v)] for n, v in zip(table.field_names, table.vocab_sizes, strict=True)],
        "num_rows": table.num_total_rows,
        "dim": table.dim,
        "buffers": buffers,
    }


def describe_layout(layout: dict[str, Any]) -> str:
    fields = ", ".join(f"{n}: {v}" for n, v in layout["fields"])
    return (
        f"{layout['num_rows']} rows x dim {layout['dim']} (vocab sizes {{{fields}}}; "
        f"row state {sorted(layout['buffers'])})"
    )


def check_layout(path: Path, name: str, saved: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse rows of another table layout, naming both."""
    same = (
        saved["fields"] == model["fields"]
        and saved["dim"] == model["dim"]
        and saved["num_rows"] == model["num_rows"]
        and sorted(saved["buffers"]) == sorted(model["buffers"])
        and all(saved["buffers"][b]["shape"] == model["buffers"][b]["shape"] for b in saved["buffers"])
    )
    if not same:
        raise CheckpointError(
            f"checkpoint {path}: table {name or 'embedding'!r} does not fit the model: "
            f"checkpoint has {describe_layout(saved)}; the model has {describe_layout(model)}"
        )


def block_key(name: str, buf: str, rank: int, start: int) -> str:
    return f"{_prefix(name)}{buf}/rank{rank}/rows{start}"


def _blocks(num_rows: int, world: int, block_rows: int) -> Iterator[tuple[int, int, int]]:
    """Every stored block (rank, first local row, rows) of a table saved on ``world`` ranks."""
    for rank in range(world):
        n = owned_rows(num_rows, world, rank)
        for start in range(0, n, block_rows):
            yield rank, start, min(block_rows, n - start)


# -- writing --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, dest: Path, token: str) -> None:
    """Move the finished ``tmp`` directory to ``dest``; an existing ``dest`` (file or directory) is
    moved aside first and deleted after, so ``dest`` is always the old or the new checkpoint, or absent."""
    old = dest.parent / f".{dest.name}.old-{token}"
    had_old = dest.exists() or dest.is_symlink()
    if had_old:
        os.replace(dest, old)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _block(local: Tensor, start: int, rows: int) -> Tensor:
    """Rows ``start : start + rows`` of ``local`` as a tensor sharing its memory and owning a storage
    of exactly its own size. DCP clones a view of a larger storage before writing it and keeps every
    clone until the rank's file is complete, i.e. a second copy of all this rank's rows; a tensor
    made over the numpy view of the block is not cloned."""
    view = local[start : start + rows].detach().cpu()
    try:
        return torch.from_numpy(view.numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16): DCP copies it
        return view


def save_sharded(
    checkpoint: dict[str, Any],
    path: str | os.PathLike,
    module: nn.Module,
    comm: Communicator,
    block_bytes: int = BLOCK_BYTES,
) -> None:
    """Write ``checkpoint`` (a Lightning checkpoint dict whose ``state_dict`` holds this rank's rows)
    as a sharded checkpoint directory at ``path``. A collective: every rank calls it, with the same path.
    """
    import torch.distributed.checkpoint as dcp

    dest = Path(path)
    token = comm.broadcast_object(uuid.uuid4().hex[:12], src=0, tag="checkpoint/token")
    tmp = dest.parent / f".{dest.name}.tmp-{token}"
    state = dict(checkpoint["state_dict"])
    blocks: dict[str, Tensor] = {}
    layouts: dict[str, Any] = {}
    block_rows = 1
    for name, table in tables_of(module).items():
        layouts[name] = table_layout(table)
        row_bytes = table.dim * table.weight.element_size()
        block_rows = max(1, block_bytes // row_bytes)
        layouts[name]["block_rows"] = block_rows
        if (table.world_size, table.rank) != (comm.world_size, comm.rank):
            raise CheckpointError(
                f"table {name!r} holds the rows of rank {table.rank} of {table.world_size}, not of this "
                f"process (rank {comm.rank} of {comm.world_size})"
            )
        for buf in table.row_buffers:
            local = state.pop(_prefix(name) + buf)
            for start in range(0, local.shape[0], block_rows):
                blocks[block_key(name, buf, comm.rank, start)] = _block(local, start, block_rows)
        state.pop(_prefix(name) + "shard_info", None)
    if comm.rank == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    comm.barrier(tag="checkpoint/mkdir")
    try:
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
        with warnings.catch_warnings():  # one process, no process group: "save in a single process", yes
            warnings.filterwarnings("ignore", message=".*save in a single process")
            dcp.save(blocks, storage_writer=writer)
    except Exception as exc:
        raise CheckpointError(
            f"rank {comm.rank}: writing the sharded checkpoint {dest} failed: {exc}"
        ) from exc
    comm.barrier(tag="checkpoint/written")  # every rank's file is complete and synced
    if comm.rank == 0:
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        meta["state_dict"] = state  # the replicated part: towers and other module state
        meta["gmeta_sharded"] = {
            "format": FORMAT_VERSION,
            "world_size": comm.world_size,
            "tables": layouts,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        }
        with open(tmp / META_FILE, "wb") as f:  # last: its presence marks a complete checkpoint
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _replace(tmp, dest, token)
    comm.barrier(tag="checkpoint/renamed")


# -- reading --------------------------------------------------------------------------------------


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint, after checking that every file it lists is there whole."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete sharded checkpoint: {META_FILE} is missing (a save that did not "
            "finish, or not a gmeta checkpoint)"
        )
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    info = meta.get("gmeta_sharded") if isinstance(meta, dict) else None
    if not info or info.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: not a gmeta sharded checkpoint (format {FORMAT_VERSION})")
    for name, size in info["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {path}: file {f} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"sharded checkpoint {path}: file {f} has {actual} bytes, {size} were written (truncated?)"
            )
    return meta


def read_rows(
    path: Path, info: dict[str, Any], name: str, buf: str, dest: Tensor, rank: int, world: int
) -> None:
    """Fill ``dest`` with buffer ``buf`` of table ``name`` for the rows rank ``rank`` of ``world`` owns
    (``dest[j]`` = global row ``rank + j * world``), reading only the blocks that hold some of them.

    Raises if any row of ``dest`` would be filled other than exactly once.
    """
    import torch.distributed.checkpoint as dcp

    layout = info["tables"][name]
    saved_world, block_rows, num_rows = info["world_size"], layout["block_rows"], layout["num_rows"]
    spec = layout["buffers"][buf]
    dtype = getattr(torch, spec["dtype"])
    if dest.shape[0] != owned_rows(num_rows, world, rank):
        raise CheckpointError(f"{buf}: {dest.shape[0]} destination rows for rank {rank} of {world}")
    filled = torch.zeros(dest.shape[0], dtype=torch.int32)
    pending: dict[str, tuple[Tensor, Any, Tensor]] = {}  # key -> (block, its rows kept, their dest rows)
    pending_bytes = 0
    row_bytes = max(1, int(torch.tensor([], dtype=dtype).element_size() * max(1, _numel(spec["shape"]))))

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        reader = dcp.FileSystemReader(path)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
                warnings.filterwarnings("ignore", message=".*load in a single process")
                dcp.load({k: v[0] for k, v in pending.items()}, storage_reader=reader, no_dist=True)
        except Exception as exc:
            raise CheckpointError(
                f"sharded checkpoint {path}: reading {sorted(pending)[:3]}... failed: {exc}"
            ) from exc
        for block, keep, rows in pending.values():
            if keep is not None:  # else it was read in place
                _copy_rows(dest, rows, block[keep])
            filled[rows] += 1
        pending.clear()
        pending_bytes = 0

    for src_rank, start, n in _blocks(num_rows, saved_world, block_rows):
        global_rows = src_rank + (start + torch.arange(n)) * saved_world
        keep = ((global_rows % world) == rank).nonzero().flatten()
        if keep.numel() == 0:
            continue
        keep = _as_slice(keep)
        rows = global_rows[keep] // world
        key = block_key(name, buf, src_rank, start)
        target = _as_slice(rows)
        if keep == slice(0, n, 1) and isinstance(target, slice) and target.step == 1 and dest.dtype == dtype:
            # the whole block is a run of this rank's rows (same world size): DCP reads into them
            pending[key] = (dest[target], None, rows)
        else:
            pending[key] = (torch.empty((n, *spec["shape"]), dtype=dtype), keep, rows)
            pending_bytes += n * row_bytes
        if pending_bytes >= READ_BYTES:
            flush()
    flush()
    bad = (filled != 1).nonzero().flatten()
    if bad.numel():
        j = int(bad[0])
        raise CheckpointError(
            f"sharded checkpoint {path}: {buf} of global row {rank + j * world} was read {int(filled[j])} "
            f"times (saved on {saved_world} ranks, loading on {world})"
        )


def _as_slice(index: Tensor) -> Tensor | slice:
    """``index`` (sorted, unique) as a slice when it is an arithmetic progression (always, for the
    modulo layouts here): a strided view instead of a gathered copy."""
    n = index.numel()
    start = int(index[0])
    step = int(index[1] - index[0]) if n > 1 else 1
    if step > 0 and int(index[-1]) == start + (n - 1) * step and bool((index.diff() == step).all()):
        return slice(start, start + (n - 1) * step + 1, step)
    return index


def _copy_rows(dest: Tensor, rows: Tensor, values: Tensor) -> None:
    where = _as_slice(rows)
    if isinstance(where, slice):
        dest[where].copy_(values)  # a strided view: no index_put
    else:
        dest[rows] = values.to(dest.dtype)


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


@torch.no_grad()
def load_sharded_into(module: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Read a sharded checkpoint into ``module``'s tables (each its own rows, in place) and return the
    Lightning checkpoint dict whose ``state_dict`` holds those same tensors: loading it with
    ``module.load_state_dict`` then restores the towers and leaves the rows as read.

    Needs no collective: every rank reads its blocks itself (the directory must be visible to all).
    """
    path = Path(path)
    meta = read_meta(path)
    info = meta.pop("gmeta_sharded")
    tables = tables_of(module)
    if sorted(tables) != sorted(info["tables"]):
        raise CheckpointError(
            f"checkpoint {path} holds tables {sorted(info['tables'])}, the model has {sorted(tables)}"
        )
    state = meta["state_dict"]
    for name, table in tables.items():
        if not table.is_materialized:
            table.materialize(init=False)
        check_layout(path, name, info["tables"][name], table_layout(table))
        rows = table.row_state()
        for buf, dest in rows.items():
            read_rows(path, info, name, buf, dest, table.rank, table.world_size)
        # the rows as read, and the table's other state (a shard's shard_info: "these are my rows")
        for key, value in table.state_dict().items():
            state[_prefix(name) + key] = rows.get(key, value)
    return meta


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """The sharded checkpoint at ``path`` as ONE ordinary Lightning checkpoint dict (full tables), as a
    single process would have saved it. Holds the whole table: for models that fit one process."""
    path = Path(path)
    meta = read_meta(path)
    info = meta.pop("gmeta_sharded")
    state = meta["state_dict"]
    for name, layout in info["tables"].items():
        for buf, spec in layout["buffers"].items():
            full = torch.empty((layout["num_rows"], *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
            read_rows(path, info, name, buf, full, rank=0, world=1)
            state[_prefix(name) + buf] = full
    return meta


# -- consumers: eval, gmeta adapt, gmeta export ---------------------------------------------------


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict without needing its table rows: ``meta.pt`` of a sharded checkpoint (its
    ``state_dict`` lacks the rows), or the whole file of an ordinary one."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        meta = read_meta(path)
        meta.pop("gmeta_sharded")
        return meta
    return torch.load(path, map_location="cpu", weights_only=False)


def load_lightning_module(cls: Any, path: str | os.PathLike, rows: bool = True) -> tuple[Any, dict[str, Any]]:
    """A LightningModule of class ``cls`` from a checkpoint file or sharded directory, and the
    checkpoint dict (with full tables when ``rows``).

    ``rows=False`` (sharded only) returns the module with its tables still deferred, for a multi-process
    trainer to load each rank's rows itself (``trainer.test(..., ckpt_path=path)``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not is_sharded_checkpoint(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        module = cls.load_from_checkpoint(path, map_location="cpu")
        dtype = _saved_dtype(checkpoint["state_dict"])
        if dtype not in (None, torch.float32):  # e.g. a 64-true run: not rounded to float32 on load
            module.to(dtype).load_state_dict(checkpoint["state_dict"])
        return module, checkpoint
    checkpoint = consolidate(path) if rows else checkpoint_metadata(path)
    module = cls(**checkpoint.get("hyper_parameters", {}))
    dtype = _saved_dtype(checkpoint["state_dict"])
    if dtype is not None:
        module.to(dtype)
    if rows:
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    return module, checkpoint


def _saved_dtype(state: dict[str, Any]) -> torch.dtype | None:
    """The one floating dtype of a state dict's tensors (None if none or several)."""
    dtypes = {v.dtype for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def export_checkpoint(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the sharded checkpoint ``src`` as ONE ordinary checkpoint file ``dest`` (full tables; for
    models that fit one process), through a temporary file renamed into place."""
    src, dest = Path(src), Path(dest)
    if not is_sharded_checkpoint(src):
        raise CheckpointError(f"{src} is not a sharded checkpoint directory (nothing to export)")
    checkpoint = consolidate(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(dest.parent)
    return dest
