"""Initial embedding rows as a pure function of (seed, field, row id): the same table on 1 or N ranks.

A row-wise sharded table is built by every rank for its own rows only (``gmeta.parallel``), so the
initial value of a row cannot come from a sequential generator (``torch.normal_`` over the whole
table): rank 3 would have to draw and discard everything before its rows. Instead each pair of
elements is drawn from a counter-based generator, SplitMix64 (Steele, Lea and Flood, OOPSLA 2014):
the n-th value of a stream is ``mix(key + n * GAMMA)``, so any value can be computed on its own, in
any order, on any rank. ``key`` depends on the seed and the field; the counter on the row (within
its field) and the column pair. One 64-bit value gives two 24-bit uniforms and, by Box-Muller, two
standard normals (float32 precision; |z| < 5.8).

Bit-exact whatever the layout: elementwise float kernels take a vectorised path for full SIMD
vectors and a scalar one for a remainder, and the two may differ in the last bit. Each row is padded
to a multiple of 16 values (so no element ever falls in a remainder) and the kernels run on one
thread (so no thread split creates one). Cost: 1-2 s per million rows of dim 64 (one core, measured).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor


def _int64(x: int) -> int:
    """The int64 with the same 64 bits as ``x`` (torch has wrapping int64, not uint64, arithmetic)."""
    x %= 2**64
    return x - 2**64 if x >= 2**63 else x


_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
#: rows drawn per pass (bounds the temporaries: ~ BLOCK_ROWS * dim * 20 bytes)
BLOCK_ROWS = 8192
_LANES = 16  # values per row are padded to a multiple of this (>= any SIMD width in floats)


def _shift_right(z: Tensor, s: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: Tensor) -> Tensor:
    """SplitMix64's output function, in place on int64 bits (wrapping arithmetic)."""
    z ^= _shift_right(z, 30)
    z *= _MIX1
    z ^= _shift_right(z, 27)
    z *= _MIX2
    z ^= _shift_right(z, 31)
    return z


def field_key(seed: int, field: int) -> int:
    """The stream key of one field: the seed and the field index, mixed."""
    z = torch.tensor([_int64(seed) ^ _int64((field + 1) * 0x9E3779B97F4A7C15)], dtype=torch.int64)
    return int(_mix_(_mix_(z))[0])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def normal_rows(seed: int, field: int, rows: Tensor, dim: int) -> Tensor:
    """Standard normal values of ``rows`` (int64 row ids within ``field``): (len(rows), dim) float32.

    Element (r, c) depends only on (seed, field, r, c). Call it under ``_one_thread`` for bit-exactness.
    """
    pairs = math.ceil(dim / 2 / (_LANES // 2)) * (_LANES // 2)  # values per row: a multiple of _LANES
    counters = rows.to(torch.int64)[:, None] * pairs + torch.arange(pairs)
    bits = _mix_(counters.mul_(_GAMMA).add_(field_key(seed, field)))
    u1 = (_shift_right(bits, 40).float() + 1.0) * 2.0**-24  # (0, 1]: log is finite
    u2 = (bits & 0xFFFFFF).float() * 2.0**-24
    radius = u1.log_().mul_(-2.0).sqrt_()
    angle = u2.mul_(2.0 * math.pi)
    out = torch.empty(rows.shape[0], pairs, 2)
    torch.mul(radius, torch.cos(angle), out=out[..., 0])
    torch.mul(radius, torch.sin(angle), out=out[..., 1])
    return out.reshape(rows.shape[0], 2 * pairs)[:, :dim]


@torch.no_grad()
def fill_normal_rows_(out: Tensor, seed: int, offsets: Tensor, global_rows: Tensor, std: float) -> Tensor:
    """``out[i] = std * N(0, 1)`` values of global row ``global_rows[i]``, in place, in blocks of rows.

    Args:
        out: (R, d) table (or shard) to fill, any floating dtype.
        seed: the table's init seed.
        offsets: (F,) first global row of each field (``gmeta.model.embedding.RowLayout``).
        global_rows: (R,) int64 global row ids, field offsets included.
        std: standard deviation.
    """
    if out.shape[0] != global_rows.shape[0]:
        raise ValueError(f"{out.shape[0]} rows to fill but {global_rows.shape[0]} row ids")
    offsets = offsets.cpu()
    dim = out.shape[1]
    with _one_thread():
        for start in range(0, out.shape[0], BLOCK_ROWS):
            g = global_rows[start : start + BLOCK_ROWS].cpu()
            field = torch.searchsorted(offsets, g, right=True) - 1
            block = torch.empty(g.shape[0], dim)
            for f in torch.unique(field).tolist():  # a block of rows lies in one or a few fields
                sel = field == f
                block[sel] = normal_rows(seed, f, g[sel] - offsets[f], dim)
            out[start : start + g.shape[0]] = (block * std).to(device=out.device, dtype=out.dtype)
    return out
