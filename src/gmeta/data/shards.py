"""Task-grouped WebDataset tar shards: one record = one task (support and query arrays + identity).

Layout::

    out_dir/manifest.json         format version, schema (with vocab sizes), task config, seed,
                                  counts per split/state, filter stats, shards with sha256, the
                                  feature encoder's settings (``encoder``: label threshold, item key)
    out_dir/vocab.parquet         raw value of every id (gmeta.data.vocab); with the manifest's schema
                                  and ``encoder`` entry it is the fitted ``gmeta.data.encoder.FeatureEncoder``
    out_dir/{train,val,test}/shard-000000.tar

Format 2: every task is ONE tar member ``<key>.task`` (a WebDataset sample ``{"__key__", "task"}``)
holding a compact binary record (little-endian)::

    header   magic b"GMTK", format u16, len(task_id) u16, len(state) u16, then for each of the
             8 arrays in ``ARRAY_MEMBERS`` order: dtype str (4 bytes, e.g. b"<i8"), ndim u8,
             3 pad bytes, 3 dims u32 (unused dims 0)
    strings  task_id and state (utf-8); header + strings zero-padded to a multiple of 8 bytes
    arrays   the 8 arrays' bytes (C order), each zero-padded to a multiple of 8 bytes

Format 1 stored 8 ``.npy`` members and a ``meta.json`` per task; parsing 9 tar headers (with
PAX extensions) and 8 npy headers per task cost most of the read time (docs/benchmarks.md, Meta-IO).
Format-1 folders are rejected by ``read_manifest`` with a message saying how to rebuild them
(``prepare_shards`` rebuilds them by itself when it has the source).

Keys are ``<index>_<sanitised task id>`` (no dots: WebDataset splits the member name at the first
dot). Bytes are deterministic for a given input and seed (USTAR headers, fixed mtime, owner, mode,
member order), so two builds can be compared by checksum.

Reading (``read_shard``) parses the tar headers directly (checksums, sizes, member names; an
end-of-archive block must be present), decodes a whole shard into one ``TaskChunk`` and validates
it with a few vectorised checks; when a check fails, the failing task is located and the error is
raised by the same per-task rules as ``decode_task``. It never skips silently: a truncated or
corrupt shard, a malformed record, a shard holding fewer tasks than the manifest lists, or an array
that does not match the schema raises ``ShardError`` naming the shard file, the task and the field.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gmeta.data.batch import SET_ARRAYS, TaskChunk, TaskRecord
from gmeta.data.checksums import sha256_file
from gmeta.data.schema import MULTI_HOT_PAD, STATES, Schema, SchemaError
from gmeta.data.sources.base import Source
from gmeta.data.tasks import SPLITS, TaskConfig, TaskSplits, build_tasks
from gmeta.data.vocab import VOCAB_FILE
from gmeta.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "gmeta-task-shards"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
VOCAB = VOCAB_FILE  # older folders hold vocab.json: the manifest names the file
SETS: tuple[str, ...] = ("support", "query")
ARRAY_MEMBERS: tuple[str, ...] = tuple(f"{s}.{a}" for s in SETS for a in SET_ARRAYS)
#: the one tar member (WebDataset extension) of a task record
TASK_MEMBER = "task"
_EXPECTED_DTYPE = {"sparse": np.int64, "multi_hot": np.int64, "dense": np.float32, "label": np.float32}
_MAGIC = b"GMTK"
_HEADER = struct.Struct("<4sHHH" + "4sB3xIII" * len(ARRAY_MEMBERS))
_BLOCK = 512
_PAD_VALUE = {"sparse": 0, "multi_hot": MULTI_HOT_PAD, "dense": 0.0, "label": 0.0}
_ZERO_BLOCK = bytes(_BLOCK)
_TAR_MTIME = 0


class ShardError(SchemaError):
    """A shard file or record that does not match its manifest or schema."""


def _pad8(n: int) -> int:
    return (n + 7) & ~7


# -- writing -----------------------------------------------------------------------------------
def safe_key(index: int, task_id: str) -> str:
    """A WebDataset-safe, unique record key: no dots or slashes."""
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', task_id)[:80]}"


def encode_record(record: TaskRecord) -> bytes:
    """One task as a format-2 binary record (see the module docstring)."""
    tid, state = record.task_id.encode(), record.state.encode()
    head: list[Any] = [_MAGIC, FORMAT_VERSION, len(tid), len(state)]
    body: list[bytes] = []
    for m in ARRAY_MEMBERS:
        a = np.ascontiguousarray(record.arrays[m])
        if a.ndim > 3 or len(a.dtype.str) > 4:
            raise ValueError(f"task {record.task_id}: array {m} with shape {a.shape} / dtype {a.dtype}")
        head += [a.dtype.str.encode(), a.ndim, *a.shape, *[0] * (3 - a.ndim)]
        raw = a.tobytes()
        body.append(raw + bytes(_pad8(len(raw)) - len(raw)))
    prefix = _HEADER.pack(*head) + tid + state
    return b"".join([prefix, bytes(_pad8(len(prefix)) - len(prefix)), *body])


def encode_task(record: TaskRecord, index: int) -> dict[str, Any]:
    """One task as a WebDataset sample: ``{"__key__": key, "task": record bytes}``."""
    return {"__key__": safe_key(index, record.task_id), TASK_MEMBER: encode_record(record)}


def write_tar(path: Path, records: Sequence[TaskRecord], first_index: int = 0) -> None:
    """Write tasks as one deterministic USTAR tar shard (keys numbered from ``first_index``)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, r in enumerate(records):
            sample = encode_task(r, first_index + i)
            data = sample[TASK_MEMBER]
            info = tarfile.TarInfo(f"{sample['__key__']}.{TASK_MEMBER}")
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
            info.uname = info.gname = "gmeta"
            tf.addfile(info, io.BytesIO(data))


def write_shards(
    splits: TaskSplits,
    out_dir: str | Path,
    task_config: TaskConfig,
    seed: int = 0,
    tasks_per_shard: int = 256,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write all splits as shards plus the encoder (``vocab.parquet`` and its manifest entries) and
    ``manifest.json`` (last); return the manifest.

    Train tasks are shuffled once with ``seed`` before sharding so every shard mixes users;
    val/test keep ``build_tasks`` order.
    """
    if tasks_per_shard < 1:
        raise ConfigError(f"data.tasks_per_shard must be >= 1, got {tasks_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task_config": task_config.to_dict(),
        "seed": seed,
        "source": source,
        "counts": splits.stats["counts"],
        "filtered": splits.stats["filtered"],
        "stats": {k: v for k, v in splits.stats.items() if k not in ("counts", "filtered")},
        "splits": {},
    }
    for split in SPLITS:
        records = list(splits.split(split))
        if split == "train":
            perm = np.random.default_rng([seed, 7]).permutation(len(records))
            records = [records[i] for i in perm]
        (out / split).mkdir(exist_ok=True)
        shards: list[dict[str, Any]] = []
        for k, start in enumerate(range(0, len(records), tasks_per_shard)):
            chunk = records[start : start + tasks_per_shard]
            rel = f"{split}/shard-{k:06d}.tar"
            write_tar(out / rel, chunk, start)
            shards.append(
                {
                    "path": rel,
                    "tasks": len(chunk),
                    "samples": sum(r.num("support") + r.num("query") for r in chunk),
                    "bytes": (out / rel).stat().st_size,
                    "sha256": sha256_file(out / rel),
                }
            )
        manifest["splits"][split] = {
            "tasks": len(records),
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
        }
    manifest.update(splits.encoder.save(out))  # schema, encoder settings, vocab.parquet
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info("wrote %s: %s", out, {s: manifest["splits"][s]["tasks"] for s in SPLITS})
    return manifest


# -- manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` and the folder it lives in (shard paths are relative to it)."""

    root: Path
    data: dict[str, Any]

    @property
    def schema(self) -> Schema:
        return Schema.from_dict(self.data["schema"], where=str(self.root / MANIFEST))

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.data["splits"][split]["shards"])

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["path"] for s in self.shards(split)]

    def num_tasks(self, split: str) -> int:
        return int(self.data["splits"][split]["tasks"])


def read_manifest(directory: str | Path) -> Manifest:
    """Load and sanity-check ``directory/manifest.json``."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the shards first (prepare_shards / TaskDataModule.prepare_data)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        hint = ""
        if data.get("format") == FORMAT:
            hint = (
                ": these shards were written by another gmeta version; rebuild them "
                "(data.force=true, or delete the folder and run make data / prepare_shards)"
            )
        raise ShardError(
            f"{path}: format {data.get('format')!r} v{data.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}{hint}"
        )
    for key in ("schema", "splits", "task_config"):
        if key not in data:
            raise ShardError(f"{path}: missing key {key!r}")
    missing = [s for s in SPLITS if s not in data["splits"]]
    if missing:
        raise ShardError(f"{path}: missing split(s) {missing}")
    return Manifest(root=root, data=data)


def _count_tasks(path: Path) -> int:
    """Records in a shard, from the tar headers alone (raises ShardError on a corrupt tar)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"shard {path}: cannot be read ({e})") from None
    return len(_scan_tar(data, path)[0])


def verify_shards(manifest: Manifest, check_checksums: bool = True) -> None:
    """Check that every shard the manifest lists exists with its size, checksum and task count."""
    for split in SPLITS:
        listed = sum(s["tasks"] for s in manifest.shards(split))
        if listed != manifest.num_tasks(split):
            raise ShardError(
                f"{manifest.root / MANIFEST}: split {split} lists {manifest.num_tasks(split)} tasks "
                f"but its shards add up to {listed}"
            )
        for s in manifest.shards(split):
            path = manifest.root / s["path"]
            if not path.is_file():
                raise ShardError(f"shard {path} listed in {manifest.root / MANIFEST} is missing")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ShardError(
                    f"shard {path}: {size} bytes, manifest says {s['bytes']} (truncated or replaced?)"
                )
            if check_checksums and sha256_file(path) != s["sha256"]:
                raise ShardError(
                    f"shard {path}: sha256 mismatch with {manifest.root / MANIFEST} (corrupt or replaced)"
                )
            found = _count_tasks(path)
            if found != s["tasks"]:
                raise ShardError(f"shard {path}: holds {found} tasks, manifest says {s['tasks']}")


# -- reading -----------------------------------------------------------------------------------
def _octal(field: bytes) -> int:
    digits = field.strip(b"\0 ")
    if not digits:
        raise ValueError("empty numeric field")
    return int(digits, 8)


def _bad_checksum(u8: np.ndarray, header_offsets: list[int], checksums: list[int]) -> int | None:
    """Index of the first header whose checksum does not match, or None (one vectorised pass)."""
    if not header_offsets:
        return None
    blocks = u8[: len(u8) // _BLOCK * _BLOCK].reshape(-1, _BLOCK)
    headers = np.take(blocks, np.asarray(header_offsets) // _BLOCK, axis=0)
    field = headers[:, 148:156].sum(axis=1, dtype=np.int64)
    computed = headers.sum(axis=1, dtype=np.int64) - field + 8 * ord(" ")
    bad = np.flatnonzero(computed != np.asarray(checksums, dtype=np.int64))
    return int(bad[0]) if bad.size else None


def _scan_tar(data: bytes, path: Path) -> tuple[list[tuple[str, int, int]], bool]:
    """((key, data offset, size) of every task member, end-of-archive block seen) of a tar file.

    Strict: every header must be a valid USTAR header of a regular file named ``<key>.task`` with a
    matching checksum, each member's data must lie inside the file, and keys must be unique.
    A file that stops exactly between two members (no end-of-archive block) returns False as the
    second value, so that the caller can report the task count first.
    """
    u8 = np.frombuffer(data, dtype=np.uint8)
    members: list[tuple[str, int, int]] = []
    header_offsets: list[int] = []
    checksums: list[int] = []
    off, end, complete = 0, len(data), False

    def fail(reason: str) -> ShardError:
        bad = _bad_checksum(u8, header_offsets, checksums)
        if bad is not None:
            reason = f"header checksum mismatch at byte {header_offsets[bad]}"
            count = bad
        else:
            count = len(members)
        return ShardError(f"shard {path}: corrupt or truncated tar after {count} tasks ({reason})")

    while off < end:
        if off + _BLOCK > end:
            raise fail(f"{end - off} stray bytes at the end, expected a 512-byte header")
        header = data[off : off + _BLOCK]
        if header == _ZERO_BLOCK:
            complete = True
            break
        try:
            size, checksum = _octal(header[124:136]), _octal(header[148:156])
        except ValueError:
            raise fail(f"unreadable header at byte {off}") from None
        header_offsets.append(off)
        checksums.append(checksum)
        if header[257:262] != b"ustar":
            raise fail(f"no ustar magic in the header at byte {off}")
        if header[156:157] not in (b"0", b"\0"):
            raise fail(f"member at byte {off} is not a regular file (type {header[156:157]!r})")
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        start = off + _BLOCK
        if start + size > end:
            raise fail(f"member {name.decode(errors='replace')!r} needs {size} bytes, the file ends first")
        key, dot, ext = name.decode(errors="replace").partition(".")
        if ext != TASK_MEMBER:
            raise fail(
                f"member {name.decode(errors='replace')!r} is not a '<key>.{TASK_MEMBER}' task record "
                f"of format v{FORMAT_VERSION} (shards written by another gmeta version must be rebuilt)"
            )
        members.append((key, start, size))
        off = start + ((size + _BLOCK - 1) // _BLOCK) * _BLOCK
    bad = _bad_checksum(u8, header_offsets, checksums)
    if bad is not None:
        raise ShardError(
            f"shard {path}: corrupt or truncated tar after {bad} tasks "
            f"(header checksum mismatch at byte {header_offsets[bad]})"
        )
    if len({k for k, _, _ in members}) != len(members):
        seen: set[str] = set()
        dup = next(k for k, _, _ in members if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ShardError(f"shard {path}: record key {dup!r} appears more than once")
    return members, complete


def _expected_shape(name: str, n: int, schema: Schema) -> tuple[int, ...]:
    fm = len(schema.multi_hot)
    return {
        "sparse": (n, len(schema.sparse)),
        "multi_hot": (n, fm, schema.max_multi_hot_len if fm else 0),
        "dense": (n, len(schema.dense)),
        "label": (n,),
    }[name]


def _check_ids(arr: np.ndarray, fields: Sequence[Any], where: str, which: str, lowest: int) -> None:
    for j, f in enumerate(fields):
        col = arr[:, j]
        bad = (col < lowest) | (col >= f.vocab_size)
        if bad.any():
            v = int(col[bad].flat[0])
            raise ShardError(
                f"{where}: {which} field {f.name!r} has id {v} outside [{lowest}, {f.vocab_size}) "
                f"(vocab_size={f.vocab_size})"
            )


def _check_values(record: TaskRecord, where: str, schema: Schema) -> None:
    """Per-task value checks (ids in range, finite 0/1 labels, finite dense), in a fixed order."""
    for which in SETS:
        arrays = record.arrays
        _check_ids(arrays[f"{which}.sparse"], schema.sparse, where, which, 0)
        _check_ids(arrays[f"{which}.multi_hot"], schema.multi_hot, where, which, MULTI_HOT_PAD)
        label = arrays[f"{which}.label"]
        ok = np.isfinite(label) & np.isin(label, (0.0, 1.0))
        if not ok.all():
            raise ShardError(f"{where}: {which}.label holds {label[~ok][0]}, expected finite 0/1 labels")
        if not np.isfinite(arrays[f"{which}.dense"]).all():
            raise ShardError(f"{where}: {which}.dense holds non-finite values")


class _Decoder:
    """Decodes and validates format-2 task records of one schema (expected headers cached per size)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        fm = len(schema.multi_hot)
        self.tails = {
            "sparse": (len(schema.sparse),),
            "multi_hot": (fm, schema.max_multi_hot_len if fm else 0),
            "dense": (len(schema.dense),),
            "label": (),
        }
        self.row_items = {name: int(np.prod(tail, dtype=np.int64)) for name, tail in self.tails.items()}
        self.dtypes = {name: np.dtype(dt) for name, dt in _EXPECTED_DTYPE.items()}
        self.states = {s.encode(): i for i, s in enumerate(STATES)}
        self.sparse_vocab = np.array([f.vocab_size for f in schema.sparse], dtype=np.uint64)
        self.multi_vocab = np.array(
            [f.vocab_size - MULTI_HOT_PAD for f in schema.multi_hot], dtype=np.uint64
        ).reshape(fm, 1)
        self._layouts: dict[tuple[int, int], tuple[tuple[Any, ...], int]] = {}

    def layout(self, ns: int, nq: int) -> tuple[tuple[Any, ...], int]:
        """(expected array header fields, bytes of the arrays) of a record with these set sizes."""
        got = self._layouts.get((ns, nq))
        if got is None:
            fields: list[Any] = []
            pos = 0
            for n in (ns, nq):
                for name in SET_ARRAYS:
                    shape = (n, *self.tails[name])
                    dt = self.dtypes[name]
                    fields += [dt.str.encode().ljust(4, b"\0"), len(shape), *shape, *[0] * (3 - len(shape))]
                    pos += _pad8(n * self.row_items[name] * dt.itemsize)
            got = self._layouts[(ns, nq)] = (tuple(fields), pos)
        return got

    def _header_error(self, fields: tuple[Any, ...], where: str) -> str:
        """The first header problem of a record whose array headers differ from the expected ones."""
        for s, which in enumerate(SETS):
            label = fields[(4 * s + 3) * 5 : (4 * s + 4) * 5]
            n = label[2] if label[1] == 1 else -1
            if n == 0:
                return f"{where} has no {which} samples"
            for k, name in enumerate(SET_ARRAYS):
                raw, ndim, *dims = fields[(4 * s + k) * 5 : (4 * s + k + 1) * 5]
                try:
                    dtype = np.dtype(raw.rstrip(b"\0").decode())
                except (TypeError, ValueError, UnicodeDecodeError):
                    return f"{where}: {which}.{name} has an unknown dtype {raw!r}"
                if dtype != self.dtypes[name]:
                    return f"{where}: {which}.{name} has dtype {dtype}, expected {self.dtypes[name]}"
                shape, want = tuple(dims[:ndim]), _expected_shape(name, n, self.schema)
                if ndim > 3 or shape != want:
                    return f"{where}: {which}.{name} has shape {shape}, expected {want} for this schema"
        return f"{where}: malformed record header"

    def decode(self, data: bytes, members: Sequence[tuple[str, int, int]], shard_name: str) -> TaskChunk:
        """Decode the records at ``members`` ((key, offset, size) in ``data``) into one validated chunk."""
        task_ids: list[str] = []
        states: list[int] = []
        sizes: list[tuple[int, int]] = []
        starts: list[int] = []
        error: str | None = None
        hsize = _HEADER.size
        for key, off, size in members:
            if size < hsize:
                error = f"record {key!r} in {shard_name}: {size} bytes, too short for a task record"
                break
            head = _HEADER.unpack_from(data, off)
            magic, version, id_len, state_len = head[:4]
            if magic != _MAGIC or version != FORMAT_VERSION:
                error = (
                    f"record {key!r} in {shard_name}: not a format-v{FORMAT_VERSION} task record "
                    f"(magic {magic!r}, version {version})"
                )
                break
            strings_end = off + hsize + id_len + state_len
            if strings_end > off + size:
                error = f"record {key!r} in {shard_name}: truncated record ({size} bytes)"
                break
            try:
                task_id = data[off + hsize : off + hsize + id_len].decode()
            except UnicodeDecodeError:
                error = f"record {key!r} in {shard_name}: task id is not valid utf-8"
                break
            state_raw = data[off + hsize + id_len : strings_end]
            where = f"task {task_id} in {shard_name}"
            state = self.states.get(state_raw)
            if state is None:
                error = f"{where}: state {state_raw.decode(errors='replace')!r} is not one of {STATES}"
                break
            fields = head[4:]
            ns = fields[17] if fields[16] == 1 else -1
            nq = fields[37] if fields[36] == 1 else -1
            if ns <= 0 or nq <= 0:
                error = self._header_error(fields, where)
                break
            expected, nbytes = self.layout(ns, nq)
            if fields != expected:
                error = self._header_error(fields, where)
                break
            data_start = off + _pad8(hsize + id_len + state_len)
            if data_start - off + nbytes != size:
                error = (
                    f"{where}: record is {size} bytes, its header describes {data_start - off + nbytes} "
                    "(truncated or corrupt record)"
                )
                break
            task_ids.append(task_id)
            states.append(state)
            sizes.append((ns, nq))
            starts.append(data_start)
        chunk = self._gather(data, task_ids, states, sizes, starts)
        self._validate(chunk, shard_name)
        if error is not None:
            raise ShardError(error)
        return chunk

    def _gather(
        self,
        data: bytes,
        task_ids: list[str],
        states: list[int],
        sizes: list[tuple[int, int]],
        starts: list[int],
    ) -> TaskChunk:
        """Copy every array of every task out of ``data`` with one vectorised gather per array."""
        n = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        base = np.asarray(starts, dtype=np.int64)
        offsets = {which: np.concatenate([[0], np.cumsum(n[:, s])]) for s, which in enumerate(SETS)}
        views: dict[int, np.ndarray] = {  # by item size in bytes
            8: np.frombuffer(data, dtype=np.int64, count=len(data) // 8),
            4: np.frombuffer(data, dtype=np.float32, count=len(data) // 4),
        }
        # byte offset of each array inside a record: the padded sizes of the arrays before it
        pos = np.zeros(len(base), dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        padded: dict[str, np.ndarray] = {}
        for s, which in enumerate(SETS):
            rows = int(n[:, s].sum())
            for name in SET_ARRAYS:
                dt = self.dtypes[name]
                items = n[:, s] * self.row_items[name]
                tail = self.tails[name]
                key = f"{which}.{name}"
                # one extra row at the end: the padding row collation gathers padded slots from
                padded[key] = full = np.empty((rows + 1, *tail), dtype=dt)
                full[rows] = _PAD_VALUE[name]
                arrays[key] = full[:rows]
                if self.row_items[name] and rows:
                    first = (base + pos) // dt.itemsize
                    total = int(items.sum())
                    idx = np.repeat(first - (np.cumsum(items) - items), items) + np.arange(total)
                    np.take(views[dt.itemsize], idx, out=full[:rows].reshape(-1))
                pos += (items * dt.itemsize + 7) & ~7
        return TaskChunk(
            task_ids=task_ids,
            states=np.asarray(states, dtype=np.int64),
            offsets=offsets,
            arrays=arrays,
            padded=padded,
        )

    def _validate(self, chunk: TaskChunk, shard_name: str) -> None:
        """Vectorised value checks over the whole chunk; on failure, name the first bad task."""
        ok = True
        for which in SETS:
            a = chunk.arrays
            sparse, multi, label = a[f"{which}.sparse"], a[f"{which}.multi_hot"], a[f"{which}.label"]
            ok = ok and not (sparse.view(np.uint64) >= self.sparse_vocab).any()
            ok = ok and not ((multi - MULTI_HOT_PAD).view(np.uint64) >= self.multi_vocab).any()
            ok = ok and bool(((label == 0.0) | (label == 1.0)).all())
            ok = ok and bool(np.isfinite(a[f"{which}.dense"]).all())
        if ok:
            return
        for i in range(chunk.num_tasks):
            _check_values(chunk.record(i), f"task {chunk.task_ids[i]} in {shard_name}", self.schema)
        raise ShardError(f"{shard_name}: invalid values (not located to a task)")  # pragma: no cover


@functools.lru_cache(maxsize=8)
def _decoder(schema: Schema) -> _Decoder:
    """One decoder per schema, so its per-size header cache lives across shards."""
    return _Decoder(schema)


def read_shard(path: str | Path, schema: Schema, expected_tasks: int | None = None) -> TaskChunk:
    """All tasks of one shard as one validated ``TaskChunk`` (raises ShardError; never skips)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"shard {path}: cannot be read ({e})") from None
    members, complete = _scan_tar(data, path)
    chunk = _decoder(schema).decode(data, members, path.name)
    if expected_tasks is not None and chunk.num_tasks != expected_tasks:
        raise ShardError(
            f"shard {path}: yielded {chunk.num_tasks} tasks, manifest says {expected_tasks} (truncated shard?)"
        )
    if not complete:
        raise ShardError(
            f"shard {path}: corrupt or truncated tar after {chunk.num_tasks} tasks (no end-of-archive block)"
        )
    return chunk


def iter_shard(path: str | Path, schema: Schema, expected_tasks: int | None = None) -> Iterator[TaskRecord]:
    """The tasks of one shard as ``TaskRecord``s, validated (see ``read_shard``)."""
    chunk = read_shard(path, schema, expected_tasks)
    for i in range(chunk.num_tasks):
        yield chunk.record(i)


def decode_task(sample: dict[str, Any], shard_name: str, schema: Schema) -> TaskRecord:
    """Decode and validate one WebDataset sample (``{"__key__", "task"}``) into a TaskRecord."""
    key = str(sample.get("__key__", "?"))
    blob = sample.get(TASK_MEMBER)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ShardError(
            f"record {key!r} in {shard_name} has no .{TASK_MEMBER} member "
            f"(truncated shard, or a format-1 record: rebuild the shards)"
        )
    data = bytes(blob)
    return _decoder(schema).decode(data, [(key, 0, len(data))], shard_name).record(0)


# -- build everything --------------------------------------------------------------------------
def _older_format(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` if it is a gmeta shard manifest of an older format version, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    version = data.get("format_version")
    older = data.get("format") == FORMAT and isinstance(version, int) and version < FORMAT_VERSION
    return data if older else None


def prepare_shards(
    source: Source,
    task_config: TaskConfig,
    out_dir: str | Path,
    tasks_per_shard: int = 256,
    seed: int = 0,
    force: bool = False,
    engine: str = "duckdb",
    build_options: Any = None,
) -> Path:
    """Build shards from ``source`` unless ``out_dir`` already holds a manifest for the same inputs.

    ``engine``: ``duckdb`` (out of core, ``gmeta.data.build``; ``build_options`` a ``BuildOptions``),
    ``spark`` (the same plan on Apache Spark) or ``pandas`` (the in-memory reference builder). All
    produce the same tasks, so the engine is not part of the inputs compared with an existing manifest.

    An existing manifest built from another source, task config or seed is an error (stale shards)
    unless ``force`` is set, which rebuilds from scratch. Shards of an older format version are
    rebuilt (same inputs, new layout) with a warning. The build happens in a temporary folder
    next to ``out_dir`` and is moved into place at the end, so an interrupted build leaves nothing.
    """
    out = Path(out_dir)
    want = {"source": source.describe(), "task_config": task_config.to_dict(), "seed": seed}
    want = json.loads(json.dumps(want))  # normalise (tuples -> lists) for comparison
    old = _older_format(out / MANIFEST) if not force else None
    if old is not None:
        diff = [k for k in want if old.get(k) != want[k]]
        if diff:
            raise ShardError(
                f"{out / MANIFEST} holds shards of an older format built with a different "
                f"{', '.join(diff)}; use force=True (data.force=true) or another data_dir to rebuild"
            )
        log.warning("%s holds shards of an older format: rebuilding them as v%d", out, FORMAT_VERSION)
        force = True
    if (out / MANIFEST).is_file() and not force:
        have = read_manifest(out).data
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise ShardError(
                f"{out / MANIFEST} was built with a different {', '.join(diff)}; "
                "use force=True (data.force=true) or another data_dir to rebuild"
            )
        log.info("shards already present in %s", out)
        return out
    if engine not in ("duckdb", "pandas", "spark"):
        raise ConfigError(f"data.engine must be 'duckdb', 'pandas' or 'spark', got {engine!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if engine == "pandas":
            df, schema = source.load()
            splits = build_tasks(df, schema, task_config, seed=seed)
            manifest = write_shards(
                splits, tmp, task_config, seed=seed, tasks_per_shard=tasks_per_shard, source=want["source"]
            )
        else:
            from gmeta.data.build import BuildOptions, build_shards  # the build imports this module

            options = (
                build_options
                if isinstance(build_options, BuildOptions)
                else BuildOptions(**(build_options or {}))
            )
            manifest = build_shards(
                source,
                task_config,
                tmp,
                seed=seed,
                tasks_per_shard=tasks_per_shard,
                source_description=want["source"],
                options=options,
                engine=engine,
            )
        if not any(manifest["splits"][s]["tasks"] for s in SPLITS):
            raise SchemaError(
                f"no task left after filtering ({manifest['stats']['interactions']} interactions, "
                f"filtered: {manifest['filtered']}): check min_interactions / max_interactions and the task key"
            )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("prepared shards in %s: %s tasks", out, {s: manifest["splits"][s]["tasks"] for s in SPLITS})
    return out
