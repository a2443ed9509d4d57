"""The one place where gmeta talks to other processes.

Every collective of a meta-step goes through a ``Communicator``, so that it can be audited (how many
collectives, which, how many bytes: see ``Communicator.audit``) and so that a failure — another rank
that raised, died or timed out — surfaces as a ``CollectiveError`` naming the collective, this rank
and the time limit instead of a bare backend message.

Collectives used per training meta-step (world size W > 1, see ``docs/parallelism.md``):

* ``lookup/header``  all_to_all of W x 8 int64: per destination how many ids this rank sends, its
  loss weight, and a bad-id report (a flag, the set, task, sample, field and id: so that bad input
  fails on every rank at once, not by timeout);
* ``lookup/ids``     all_to_all of the unique ids (support AND query of all local tasks), to owners;
* ``lookup/rows``    all_to_all of the requested rows, back from the owners;
* ``dense/grads``    one all_reduce of all dense gradients, flattened into one buffer;
* ``rows/grads``     all_to_all of the row gradients, to the owners.

Timeouts are those of the process group (``HybridParallelStrategy(collective_timeout_s=...)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class CollectiveError(RuntimeError):
    """A collective failed: another rank raised, exited or did not arrive within the timeout."""


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call as seen by this rank (bytes of tensor payload, not backend overhead)."""

    op: str
    tag: str
    bytes_sent: int
    bytes_received: int


class RowExchange(Protocol):
    """The collectives a row-sharded table makes (``ShardedEmbeddingCollection``): ``Communicator``
    provides them; a test may substitute ranks that are threads of one process."""

    rank: int
    world_size: int

    def all_to_all(
        self, send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], tag: str
    ) -> Tensor: ...

    def all_gather_rows(self, tensor: Tensor, tag: str) -> list[Tensor]: ...


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """Collectives over the default process group, counted and with errors that say what failed.

    With one process (or no process group) every collective is the identity and nothing is recorded.

    Args:
        timeout_s: the process group's collective timeout, only quoted in error messages.
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.timeout_s = timeout_s
        self._records: list[CollectiveRecord] | None = None

    # -- audit ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def audit(self) -> Iterator[list[CollectiveRecord]]:
        """Record every collective made inside the block into the yielded list."""
        previous = self._records
        records: list[CollectiveRecord] = []
        self._records = records
        try:
            yield records
        finally:
            self._records = previous

    def _record(self, op: str, tag: str, sent: int, received: int) -> None:
        if self._records is not None:
            self._records.append(CollectiveRecord(op, tag, sent, received))

    def _call(self, op: str, tag: str, fn, /, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # backend errors have several types (DistBackendError, RuntimeError)
            limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the process group's timeout"
            raise CollectiveError(
                f"rank {self.rank}/{self.world_size}: collective {op} {tag!r} failed — another rank raised, "
                f"exited, or did not reach it within {limit}. Look for the first error in the other "
                f"ranks' logs. Backend said: {exc}"
            ) from exc

    # -- collectives -----------------------------------------------------------------------------
    def all_to_all(
        self, send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], tag: str
    ) -> Tensor:
        """Send ``send[rows of block j]`` to rank j, receive rank j's block for us (rows along dim 0).

        Args:
            send: (sum(send_counts), ...) rows grouped by destination rank, in rank order.
            send_counts / recv_counts: rows per destination / per source rank (length world size).
        """
        if not self.distributed or self.world_size == 1:
            return send
        recv = send.new_empty((int(sum(recv_counts)), *send.shape[1:]))
        self._call(
            "all_to_all",
            tag,
            dist.all_to_all_single,
            recv,
            send.contiguous(),
            output_split_sizes=[int(c) for c in recv_counts],
            input_split_sizes=[int(c) for c in send_counts],
        )
        self._record("all_to_all", tag, _nbytes(send), _nbytes(recv))
        return recv

    def all_reduce_sum(self, tensor: Tensor, tag: str) -> Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if not self.distributed or self.world_size == 1:
            return tensor
        self._call("all_reduce", tag, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        self._record("all_reduce", tag, _nbytes(tensor), _nbytes(tensor))
        return tensor

    def broadcast(self, tensor: Tensor, src: int, tag: str) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place; returns it."""
        if not self.distributed or self.world_size == 1:
            return tensor
        self._call("broadcast", tag, dist.broadcast, tensor, src=src)
        n = _nbytes(tensor)
        self._record("broadcast", tag, n if self.rank == src else 0, 0 if self.rank == src else n)
        return tensor

    def all_gather_rows(self, tensor: Tensor, tag: str) -> list[Tensor]:
        """Every rank's ``tensor`` (their first dims may differ; the other dims must agree)."""
        if not self.distributed or self.world_size == 1:
            return [tensor]
        sizes = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        self._call("all_gather", tag + "/sizes", dist.all_gather, all_sizes, sizes)
        counts = [int(s) for s in all_sizes]
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._call("all_gather", tag, dist.all_gather, out, padded)
        self._record("all_gather", tag, _nbytes(padded), _nbytes(padded) * self.world_size)
        return [o[:c] for o, c in zip(out, counts, strict=True)]

    def broadcast_object(self, obj: Any, src: int, tag: str) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        self._call("broadcast_object", tag, dist.broadcast_object_list, box, src=src)
        self._record("broadcast_object", tag, 0, 0)
        return box[0]

    def barrier(self, tag: str) -> None:
        if not self.distributed or self.world_size == 1:
            return
        self._call("barrier", tag, dist.barrier)
        self._record("barrier", tag, 0, 0)


def shutdown_process_group(grace_s: float = 0.5) -> None:
    """Destroy the default process group, if any, then wait ``grace_s``.

    Without it gloo (torch 2.13, an open upstream bug) sometimes aborts a rank at interpreter exit
    after the work finished ("terminate called without an active exception", exit 134): measured in
    7 of 20 multi-process runs without it, 0 of 25 with it.
    """
    import time

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(grace_s)
