"""The shard part of the bad-input corpus: a good shard folder, changed in one way each.

A case's ``change(root)`` edits the folder in place; reading it (``read_manifest``, ``verify_shards``
with checksums, ``read_shard`` of every shard) must fail with ``message``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gmeta.data.checksums import sha256_file
from gmeta.data.shards import read_manifest, read_shard, write_tar


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _save(root: Path, data: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def _edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        data = _manifest(root)
        fn(data)
        _save(root, data)

    return change


def _first_shard(root: Path, split: str = "train") -> tuple[dict, Path]:
    entry = _manifest(root)["splits"][split]["shards"][0]
    return entry, root / entry["path"]


def _relist(root: Path, split: str = "train") -> None:
    """Make the manifest agree with the first shard's new bytes (size and sha256): only reading finds it."""
    data = _manifest(root)
    entry = data["splits"][split]["shards"][0]
    path = root / entry["path"]
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    _save(root, data)


def _truncate(keep: float, relist: bool) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _, path = _first_shard(root)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        if relist:
            _relist(root)

    return change


def _flip_byte(root: Path) -> None:
    _, path = _first_shard(root)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(root: Path) -> None:
    _, path = _first_shard(root)
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))
    _relist(root)


def _empty(root: Path) -> None:
    _, path = _first_shard(root)
    path.write_bytes(b"")
    _relist(root)


def _id_out_of_vocabulary(root: Path) -> None:
    m = read_manifest(root)
    _, path = _first_shard(root)
    chunk = read_shard(path, m.schema)
    records = [chunk.record(i) for i in range(chunk.num_tasks)]
    vocab = m.schema.field("item").vocab_size
    records[0].arrays["query.sparse"][0, 1] = vocab
    write_tar(path, records)
    _relist(root)


def _drop_split(data: dict) -> None:
    del data["splits"]["test"]


def _more_tasks_in_split(data: dict) -> None:
    data["splits"]["train"]["tasks"] += 1


def _more_tasks_in_shard(data: dict) -> None:
    data["splits"]["train"]["shards"][0]["tasks"] += 1
    data["splits"]["train"]["tasks"] += 1  # the split's total agrees: only the shard is short


def _bad_field_kind(data: dict) -> None:
    data["schema"]["fields"][0]["kind"] = "categorical"


@dataclass(frozen=True)
class ShardCase:
    id: str
    what: str
    change: Callable[[Path], None]
    message: str


SHARD_CASES: list[ShardCase] = [
    ShardCase(
        "manifest-missing",
        "no manifest.json",
        lambda root: (root / "manifest.json").unlink(),
        r"manifest.json not found: build the shards first",
    ),
    ShardCase(
        "manifest-not-json",
        "manifest.json cut short",
        lambda root: (root / "manifest.json").write_text('{"format": '),
        r"manifest.json: not valid JSON",
    ),
    ShardCase(
        "manifest-old-format",
        "shards of an older format version",
        _edit(lambda d: d.update(format_version=1)),
        r"format 'gmeta-task-shards' v1, expected 'gmeta-task-shards' v2: these shards were written by another "
        r"gmeta version; rebuild them",
    ),
    ShardCase(
        "manifest-foreign",
        "a manifest.json of something else",
        _edit(lambda d: d.update(format="my-dataset")),
        r"format 'my-dataset' v2, expected 'gmeta-task-shards' v2",
    ),
    ShardCase(
        "manifest-no-split",
        "a manifest without the test split",
        _edit(_drop_split),
        r"manifest.json: missing split\(s\) \['test'\]",
    ),
    ShardCase(
        "manifest-no-schema",
        "a manifest without its schema",
        _edit(lambda d: d.pop("schema")),
        r"manifest.json: missing key 'schema'",
    ),
    ShardCase(
        "manifest-bad-schema",
        "a schema field of an unknown kind",
        _edit(_bad_field_kind),
        r"field 'uid': kind must be one of \('sparse', 'multi_hot', 'dense'\), got 'categorical'",
    ),
    ShardCase(
        "split-count",
        "a split's task count that its shards do not add up to",
        _edit(_more_tasks_in_split),
        r"split train lists \d+ tasks but its shards add up to \d+",
    ),
    ShardCase(
        "shard-count",
        "a shard holding fewer tasks than listed",
        _edit(_more_tasks_in_shard),
        r"train/shard-\d+(-\d+)?.tar: holds \d+ tasks, manifest says \d+",
    ),
    ShardCase(
        "shard-missing",
        "a listed shard deleted",
        lambda root: _first_shard(root)[1].unlink(),
        r"shard .*train/shard-.*.tar listed in .*manifest.json is missing",
    ),
    ShardCase(
        "shard-truncated",
        "a shard cut in half",
        _truncate(0.5, relist=False),
        r"train/shard-.*.tar: \d+ bytes, manifest says \d+ \(truncated or replaced\?\)",
    ),
    ShardCase(
        "shard-flipped-byte",
        "one byte of a shard changed",
        _flip_byte,
        r"train/shard-.*.tar: sha256 mismatch with .*manifest.json \(corrupt or replaced\)",
    ),
    ShardCase(
        "shard-truncated-relisted",
        "a shard cut in half, its size and sha256 updated in the manifest",
        _truncate(0.5, relist=True),
        r"train/shard-.*.tar: corrupt or truncated tar after \d+ tasks",
    ),
    ShardCase(
        "shard-garbage-relisted",
        "a shard replaced by other bytes, relisted",
        _garbage,
        r"train/shard-.*.tar: corrupt or truncated tar after 0 tasks",
    ),
    ShardCase(
        "shard-empty-relisted",
        "a shard emptied, relisted",
        _empty,
        r"train/shard-.*.tar: holds 0 tasks, manifest says \d+",
    ),
    ShardCase(
        "id-out-of-vocabulary",
        "a record with an id outside its field's vocabulary, relisted",
        _id_out_of_vocabulary,
        r"in shard-.*.tar: query field 'item' has id \d+ outside \[0, \d+\)",
    ),
]
