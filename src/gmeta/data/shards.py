"""Task-grouped WebDataset tar shards: one record = one task (support and query arrays + meta).

Layout::

    out_dir/manifest.json         format version, schema (with vocab sizes), task config, seed,
                                  counts per split/state, filter stats, shards with sha256
    out_dir/vocab.json            raw value of every id (for serving new users)
    out_dir/{train,val,test}/shard-000000.tar

Record members: ``<key>.support.sparse.npy`` ... ``<key>.query.label.npy`` and ``<key>.meta.json``
(task_id, state). Keys are ``<index>_<sanitised task id>`` (no dots: WebDataset splits the member
name at the first dot). Bytes are deterministic for a given input and seed (fixed mtime, owner,
mode, member order), so two builds can be compared by checksum.

Reading never skips silently: a truncated or corrupt shard, a record missing a member, a shard
yielding fewer tasks than the manifest lists, or an array that does not match the schema raises
``ShardError`` naming the shard file, the task and the field.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from gmeta.data.batch import SET_ARRAYS, TaskRecord
from gmeta.data.checksums import sha256_file
from gmeta.data.schema import MULTI_HOT_PAD, STATES, Schema, SchemaError
from gmeta.data.sources.base import Source
from gmeta.data.tasks import SPLITS, TaskConfig, TaskSplits, build_tasks

log = logging.getLogger(__name__)

FORMAT = "gmeta-task-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
SETS: tuple[str, ...] = ("support", "query")
ARRAY_MEMBERS: tuple[str, ...] = tuple(f"{s}.{a}" for s in SETS for a in SET_ARRAYS)
MEMBERS: tuple[str, ...] = tuple(f"{m}.npy" for m in ARRAY_MEMBERS) + ("meta.json",)
_EXPECTED_DTYPE = {"sparse": np.int64, "multi_hot": np.int64, "dense": np.float32, "label": np.float32}


class ShardError(SchemaError):
    """A shard file or record that does not match its manifest or schema."""


# -- writing -----------------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def safe_key(index: int, task_id: str) -> str:
    """A WebDataset-safe, unique record key: no dots or slashes."""
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', task_id)[:80]}"


def encode_task(record: TaskRecord, index: int) -> dict[str, Any]:
    """One task as a WebDataset sample (bytes per member)."""
    sample: dict[str, Any] = {"__key__": safe_key(index, record.task_id)}
    for m in ARRAY_MEMBERS:
        sample[f"{m}.npy"] = _npy(record.arrays[m])
    sample["meta.json"] = json.dumps(
        {"task_id": record.task_id, "state": record.state}, sort_keys=True
    ).encode()
    return sample


def write_tar(path: Path, records: Sequence[TaskRecord], first_index: int = 0) -> None:
    """Write tasks as one deterministic tar shard (keys numbered from ``first_index``)."""
    with (
        open(path, "wb") as f,
        wds.TarWriter(f, user="gmeta", group="gmeta", mode=0o444, mtime=0.0, encoder=False) as w,
    ):
        for i, r in enumerate(records):
            w.write(encode_task(r, first_index + i))


def write_shards(
    splits: TaskSplits,
    out_dir: str | Path,
    task_config: TaskConfig,
    seed: int = 0,
    tasks_per_shard: int = 256,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write all splits as shards plus ``vocab.json`` and ``manifest.json`` (last); return the manifest.

    Train tasks are shuffled once with ``seed`` before sharding so every shard mixes users;
    val/test keep ``build_tasks`` order.
    """
    if tasks_per_shard < 1:
        raise ValueError("tasks_per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema": splits.schema.to_dict(),
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
        shards = []
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
    (out / VOCAB).write_text(json.dumps(splits.vocabs, sort_keys=True, ensure_ascii=False))
    manifest["vocab"] = {"path": VOCAB, "sha256": sha256_file(out / VOCAB)}
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
        raise ShardError(
            f"{path}: format {data.get('format')!r} v{data.get('format_version')}, expected {FORMAT!r} v{FORMAT_VERSION}"
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
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                keys.add(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {path}: corrupt or truncated tar ({e})") from None
    return len(keys)


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


def decode_task(sample: dict[str, Any], shard_name: str, schema: Schema) -> TaskRecord:
    """Decode and validate one WebDataset sample into a TaskRecord (raises ShardError)."""
    key = sample.get("__key__", "?")
    if "meta.json" not in sample:
        raise ShardError(f"record {key!r} in {shard_name} has no meta.json (truncated shard?)")
    try:
        meta = json.loads(sample["meta.json"])
        task_id, state = str(meta["task_id"]), str(meta["state"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"record {key!r} in {shard_name}: bad meta.json ({e})") from None
    where = f"task {task_id} in {shard_name}"
    if state not in STATES:
        raise ShardError(f"{where}: state {state!r} is not one of {STATES}")
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise ShardError(f"{where}: missing member(s) {missing} (truncated shard?)")
    arrays: dict[str, np.ndarray] = {}
    for m in ARRAY_MEMBERS:
        try:
            a = np.load(io.BytesIO(sample[f"{m}.npy"]), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt member
            raise ShardError(f"{where}: member {m}.npy is not a valid .npy array ({e})") from None
        arrays[m] = a
    for which in SETS:
        n = arrays[f"{which}.label"].shape[0] if arrays[f"{which}.label"].ndim == 1 else -1
        if n == 0:
            raise ShardError(f"{where} has no {which} samples")
        for name in SET_ARRAYS:
            a = arrays[f"{which}.{name}"]
            if a.dtype != _EXPECTED_DTYPE[name]:
                raise ShardError(
                    f"{where}: {which}.{name} has dtype {a.dtype}, expected {np.dtype(_EXPECTED_DTYPE[name])}"
                )
            want = _expected_shape(name, n, schema)
            if a.shape != want:
                raise ShardError(
                    f"{where}: {which}.{name} has shape {a.shape}, expected {want} for this schema"
                )
        _check_ids(arrays[f"{which}.sparse"], schema.sparse, where, which, 0)
        _check_ids(arrays[f"{which}.multi_hot"], schema.multi_hot, where, which, MULTI_HOT_PAD)
        label = arrays[f"{which}.label"]
        if not np.isfinite(label).all() or not np.isin(label, (0.0, 1.0)).all():
            bad = label[~(np.isfinite(label) & np.isin(label, (0.0, 1.0)))][0]
            raise ShardError(f"{where}: {which}.label holds {bad}, expected finite 0/1 labels")
        if not np.isfinite(arrays[f"{which}.dense"]).all():
            raise ShardError(f"{where}: {which}.dense holds non-finite values")
    return TaskRecord(task_id=task_id, state=state, arrays=arrays)


def iter_shard(path: str | Path, schema: Schema, expected_tasks: int | None = None) -> Iterator[TaskRecord]:
    """Stream the tasks of one shard with WebDataset, validating each; never skip silently."""
    path = Path(path)
    count = 0
    samples = wds.tariterators.tarfile_samples([{"url": str(path)}])
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - tarfile/OS/webdataset errors: all mean a bad shard
            raise ShardError(
                f"shard {path}: corrupt or truncated tar after {count} tasks ({e.args[0] if e.args else e})"
            ) from e
        yield decode_task(sample, path.name, schema)
        count += 1
    if expected_tasks is not None and count != expected_tasks:
        raise ShardError(
            f"shard {path}: yielded {count} tasks, manifest says {expected_tasks} (truncated shard?)"
        )


# -- build everything --------------------------------------------------------------------------
def prepare_shards(
    source: Source,
    task_config: TaskConfig,
    out_dir: str | Path,
    tasks_per_shard: int = 256,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build shards from ``source`` unless ``out_dir`` already holds a manifest for the same inputs.

    An existing manifest built from another source, task config or seed is an error (stale shards)
    unless ``force`` is set, which rebuilds from scratch. The build happens in a temporary folder
    next to ``out_dir`` and is moved into place at the end, so an interrupted build leaves nothing.
    """
    out = Path(out_dir)
    want = {"source": source.describe(), "task_config": task_config.to_dict(), "seed": seed}
    want = json.loads(json.dumps(want))  # normalise (tuples -> lists) for comparison
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
    df, schema = source.load()
    splits = build_tasks(df, schema, task_config, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_shards(
            splits, tmp, task_config, seed=seed, tasks_per_shard=tasks_per_shard, source=want["source"]
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("prepared shards in %s: %s tasks", out, {s: len(splits.split(s)) for s in SPLITS})
    return out
