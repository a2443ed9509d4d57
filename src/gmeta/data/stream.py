"""Shard streams as webdataset pipelines: shard URLs -> shuffle -> slot split -> open -> decode.

The DataModule's read path (``TaskStreamDataset``) gets its decoded shards from a
``webdataset.DataPipeline`` per (rank, worker) slot::

    SimpleShardList(urls)            local paths, file://, http(s)://, pipe:<command>, fsspec URLs
    -> number_shards                 attach each shard's manifest index, task count and size
    -> shuffle_shards(seed, epoch)   training: one permutation of the shard order per epoch
    -> split_slots(slot, slots)      the node x worker split, rank and worker passed in explicitly
    -> read_shards                   each URL opened with webdataset's gopen (fsspec for schemes
                                     gopen does not know) and read whole
    -> decode_shards(schema)         the fast whole-shard decoder (``_scan_tar`` + ``_Decoder``)

``split_slots`` replaces webdataset's ``split_by_node`` / ``split_by_worker`` (which read the rank
from ``torch.distributed``, uninitialised inside DataLoader workers, and split shards only): with at
least as many shards as slots, slot ``k`` takes every ``slots``-th shard of the (shuffled) order;
otherwise every slot reads every shard and keeps every ``slots``-th task of the concatenated stream.

No stage has an error handler that skips: an unreachable, truncated or malformed shard raises
``ShardError`` naming its URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import webdataset as wds
from webdataset.gopen import Pipe, gopen, gopen_schemes

from gmeta.data.batch import TaskChunk
from gmeta.data.schema import Schema
from gmeta.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ShardError,
    _decoder,
    _scan_tar,
    read_manifest,
    verify_shards,
)
from gmeta.data.tasks import SPLITS

#: a shard or data folder: a local path, or a URL string
Location = str | Path

#: what ``TaskDataModule(verify=...)`` accepts
VERIFY_MODES = ("sizes", "full")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$")
#: curl exit statuses (webdataset opens http(s) URLs with ``curl -f``) worth a plain-words reason
_CURL_STATUS = {
    6: "could not resolve the host",
    7: "could not connect to the server",
    22: "the server answered with an HTTP error (e.g. 404 not found)",
    28: "timed out",
}


# -- locations ---------------------------------------------------------------------------------
def is_url(location: Location) -> bool:
    """Whether ``location`` is a URL (``scheme://...`` or ``pipe:<command>``) rather than a path."""
    return isinstance(location, str) and (location.startswith("pipe:") or bool(_URL.match(location)))


def as_location(location: Location) -> Location:
    """A data folder as a ``Path`` when it is local (``file://`` URLs included), else the URL string."""
    if isinstance(location, str) and location.startswith("file://"):
        return Path(url2pathname(urlparse(location).path))
    return location if is_url(location) else Path(location)


def join(root: Location, relative: str) -> Location:
    """``root`` + a manifest-relative path (a URL stays a URL)."""
    if isinstance(root, Path):
        return root / relative
    return f"{str(root).rstrip('/')}/{relative.lstrip('/')}"


def open_url(location: Location) -> IO[bytes]:
    """Open a shard for reading: webdataset's ``gopen`` (local paths, ``file://``, ``pipe:``,
    ``http(s)://`` through curl, ...), or fsspec for URL schemes gopen has no handler for
    (``s3://``, ``memory://``, ... with the matching fsspec backend installed)."""
    if isinstance(location, Path):
        # absolute, so that a relative folder such as "pipe:x" is never taken for a URL
        return gopen(str(location if location.is_absolute() else location.absolute()))
    scheme = urlparse(location).scheme
    if location.startswith("pipe:") or not scheme or scheme == "file" or scheme in gopen_schemes:
        return gopen(location)
    import fsspec

    return fsspec.open(location, "rb").open()


def _reason(exc: BaseException, stream: Any = None) -> str:
    if isinstance(stream, Pipe) and stream.status not in (None, 0):
        cmd = stream.args[0][0]
        cmd = " ".join(cmd) if isinstance(cmd, list | tuple) else str(cmd)
        program = cmd.split()[0] if cmd.split() else cmd
        why = _CURL_STATUS.get(stream.status, "") if program == "curl" else ""
        return f"command {cmd!r} exited with status {stream.status}" + (f": {why}" if why else "")
    return f"{type(exc).__name__}: {exc}"


def read_url(location: Location, what: str = "shard") -> bytes:
    """All bytes at ``location``; any failure is a ``ShardError`` naming it (never a skip)."""
    try:
        stream = open_url(location)
    except Exception as e:
        raise ShardError(f"{what} {location}: cannot be opened ({_reason(e)})") from e
    try:
        data = stream.read()
        stream.close()  # a pipe (pipe:, curl) waits for its command here and raises on a bad exit
    except Exception as e:
        with contextlib.suppress(Exception):
            stream.close()
        raise ShardError(f"{what} {location}: cannot be read ({_reason(e, stream)})") from e
    return bytes(data)


# -- manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlManifest(Manifest):
    """A manifest read from a URL: shard locations are ``root`` + ``/`` + their relative path."""

    root: str  # type: ignore[assignment]

    @property
    def schema(self) -> Schema:
        return Schema.from_dict(self.data["schema"], where=f"{self.root.rstrip('/')}/{MANIFEST}")

    def shard_paths(self, split: str) -> list[str]:  # type: ignore[override]
        return [str(join(self.root, s["path"])) for s in self.shards(split)]


def shard_locations(manifest: Manifest, split: str) -> list[Location]:
    """Where each shard of ``split`` lives: paths for a local manifest, URLs for a remote one."""
    return list(manifest.shard_paths(split))


def manifest_location(manifest: Manifest) -> Location:
    return join(manifest.root, MANIFEST)


def load_manifest(location: Location) -> Manifest:
    """``read_manifest`` for a local folder, or ``manifest.json`` under a URL read through gopen/fsspec."""
    location = as_location(location)
    if isinstance(location, Path):
        return read_manifest(location)
    where = join(location, MANIFEST)
    raw = read_url(where, what="manifest")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: not valid JSON ({e})") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or data.get("format_version") != FORMAT_VERSION
    ):
        data = data if isinstance(data, dict) else {}
        hint = (
            ": these shards were written by another gmeta version; rebuild them"
            if data.get("format") == FORMAT
            else ""
        )
        raise ShardError(
            f"{where}: format {data.get('format')!r} v{data.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}{hint}"
        )
    for key in ("schema", "splits", "task_config"):
        if key not in data:
            raise ShardError(f"{where}: missing key {key!r}")
    missing = [s for s in SPLITS if s not in data["splits"]]
    if missing:
        raise ShardError(f"{where}: missing split(s) {missing}")
    for split in SPLITS:
        for s in data["splits"][split].get("shards", []):
            # appended to a URL, or to a pipe: command: plain relative paths only
            rel = s.get("path") if isinstance(s, dict) else None
            if not isinstance(rel, str) or not _SAFE_PATH.match(rel) or ".." in rel.split("/"):
                raise ShardError(
                    f"{where}: shard path {rel!r} of split {split} is not a plain relative path "
                    "(letters, digits, '._-/' only)"
                )
    return UrlManifest(root=location.rstrip("/"), data=data)


def check_manifest(manifest: Manifest) -> None:
    """The manifest's own consistency: every shard entry complete, task counts adding up per split."""
    where = manifest_location(manifest)
    for split in SPLITS:
        shards = manifest.shards(split)
        for k, s in enumerate(shards):
            lacking = [key for key in ("path", "tasks", "bytes") if key not in s]
            if lacking:
                raise ShardError(f"{where}: shard {k} of split {split} has no {', '.join(lacking)}")
        listed = sum(s["tasks"] for s in shards)
        if listed != manifest.num_tasks(split):
            raise ShardError(
                f"{where}: split {split} lists {manifest.num_tasks(split)} tasks "
                f"but its shards add up to {listed}"
            )


def check_sizes(manifest: Manifest, split: str, indices: Iterable[int]) -> None:
    """Existence and byte size of some shards of ``split`` (local ones: one ``stat`` each).

    Remote shards cannot be sized cheaply in general: their size and task count are checked when
    they are read (``read_shards`` / ``decode_shards``), before any of their tasks is used.
    """
    if not isinstance(manifest.root, Path):
        return
    shards = manifest.shards(split)
    for i in indices:
        s = shards[i]
        path = manifest.root / s["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"shard {path} listed in {manifest.root / MANIFEST} is missing") from None
        if size != s["bytes"]:
            raise ShardError(
                f"shard {path}: {size} bytes, manifest says {s['bytes']} (truncated or replaced?)"
            )


def verify_full(manifest: Manifest) -> None:
    """Every shard of every split: size, sha256 and task count against the manifest (read in full)."""
    if isinstance(manifest.root, Path):
        verify_shards(manifest, check_checksums=True)
        return
    check_manifest(manifest)
    for split in SPLITS:
        for url, s in zip(manifest.shard_paths(split), manifest.shards(split), strict=True):
            data = read_url(url)
            if len(data) != s["bytes"]:
                raise ShardError(
                    f"shard {url}: {len(data)} bytes, manifest says {s['bytes']} (truncated or replaced?)"
                )
            if hashlib.sha256(data).hexdigest() != s.get("sha256"):
                raise ShardError(
                    f"shard {url}: sha256 mismatch with {manifest_location(manifest)} (corrupt or replaced)"
                )
            found = len(_scan_tar(data, url)[0])
            if found != s["tasks"]:
                raise ShardError(f"shard {url}: holds {found} tasks, manifest says {s['tasks']}")


# -- decoding ----------------------------------------------------------------------------------
def shard_name(location: Location) -> str:
    """How decode errors name a shard: a local file by its name (as ``read_shard``), a URL in full."""
    return location.name if isinstance(location, Path) else str(location)


def decode_shard(
    data: bytes,
    location: Location,
    schema: Schema,
    expected_tasks: int | None = None,
    expected_bytes: int | None = None,
) -> TaskChunk:
    """A whole shard's bytes as one validated ``TaskChunk`` (the checks of ``read_shard``, plus size)."""
    if expected_bytes is not None and len(data) != expected_bytes:
        raise ShardError(
            f"shard {location}: {len(data)} bytes, manifest says {expected_bytes} (truncated or replaced?)"
        )
    members, complete = _scan_tar(data, location)  # type: ignore[arg-type]
    chunk = _decoder(schema).decode(data, members, shard_name(location))
    if expected_tasks is not None and chunk.num_tasks != expected_tasks:
        raise ShardError(
            f"shard {location}: yielded {chunk.num_tasks} tasks, manifest says {expected_tasks} (truncated shard?)"
        )
    if not complete:
        raise ShardError(
            f"shard {location}: corrupt or truncated tar after {chunk.num_tasks} tasks (no end-of-archive block)"
        )
    return chunk


# -- pipeline stages ---------------------------------------------------------------------------
def _number_shards(
    src: Iterable[dict[str, Any]], tasks: Sequence[int], nbytes: Sequence[int | None]
) -> Iterator[dict[str, Any]]:
    for i, sample in enumerate(src):
        yield {**sample, "index": i, "tasks": tasks[i], "bytes": nbytes[i]}


def _shuffle_shards(src: Iterable[dict[str, Any]], seed: int, epoch: int) -> Iterator[dict[str, Any]]:
    items = list(src)
    for i in np.random.default_rng([seed, epoch]).permutation(len(items)):
        yield items[int(i)]


def _split_slots(src: Iterable[dict[str, Any]], slot: int, num_slots: int) -> Iterator[dict[str, Any]]:
    """This slot's shards, each with ``first`` / ``step``: the task indices it keeps of the shard."""
    items = list(src)
    if len(items) >= num_slots:
        for sample in items[slot::num_slots]:
            yield {**sample, "first": 0, "step": 1}
        return
    index = 0  # tasks of the shards before this one, in stream order
    for sample in items:
        yield {**sample, "first": (slot - index) % num_slots, "step": num_slots}
        index += sample["tasks"]


def _read_shards(src: Iterable[dict[str, Any]], locations: Sequence[Location]) -> Iterator[dict[str, Any]]:
    for sample in src:
        yield {**sample, "data": read_url(locations[sample["index"]])}


def _decode_shards(
    src: Iterable[dict[str, Any]], schema: Schema, locations: Sequence[Location]
) -> Iterator[dict[str, Any]]:
    for sample in src:
        data = sample.pop("data")
        chunk = decode_shard(data, locations[sample["index"]], schema, sample["tasks"], sample["bytes"])
        yield {**sample, "chunk": chunk}


number_shards = wds.pipelinefilter(_number_shards)
shuffle_shards = wds.pipelinefilter(_shuffle_shards)
split_slots = wds.pipelinefilter(_split_slots)
read_shards = wds.pipelinefilter(_read_shards)
decode_shards = wds.pipelinefilter(_decode_shards)


def plan(
    shard_tasks: Sequence[int], slot: int, num_slots: int, shuffle: bool, seed: int, epoch: int
) -> list[dict[str, Any]]:
    """The shards (``index``, ``first``, ``step``) a slot reads: the pipeline's planning stages alone."""
    samples: Iterable[dict[str, Any]] = ({"index": i, "tasks": n} for i, n in enumerate(shard_tasks))
    if shuffle:
        samples = shuffle_shards(seed, epoch)(samples)
    return list(split_slots(slot, num_slots)(samples))


def shard_pipeline(
    locations: Sequence[Location],
    shard_tasks: Sequence[int],
    schema: Schema,
    slot: int,
    num_slots: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    shard_bytes: Sequence[int | None] | None = None,
) -> wds.DataPipeline:
    """The decoded shards of one (rank, worker) slot: samples ``{"url", "index", "tasks", "first",
    "step", "chunk"}`` (``chunk`` a ``TaskChunk``; keep tasks ``first::step`` of it)."""
    nbytes = list(shard_bytes) if shard_bytes is not None else [None] * len(locations)
    urls = [os.fspath(u) if isinstance(u, Path) else u for u in locations]
    return wds.DataPipeline(
        wds.SimpleShardList(urls) if urls else [],
        number_shards(list(shard_tasks), nbytes),
        shuffle_shards(seed, epoch) if shuffle else None,
        split_slots(slot, num_slots),
        read_shards(list(locations)),
        decode_shards(schema, list(locations)),
    )
