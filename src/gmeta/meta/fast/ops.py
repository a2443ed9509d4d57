"""Custom autograd Functions of the fast meta step: each exists for speed (why: in its docstring).

All are differentiable once more where second-order MAML needs it (their backward is built from
ordinary ops or from another Function of this module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _sym_from_pairs(g: Tensor, pairs: Tensor, n: int) -> Tensor:
    """(M, n(n-1)/2) pair values -> (M, n, n) symmetric matrix with them at (i, j) and (j, i).

    ``pairs``: (2, n(n-1)/2) flat indices i*n+j and j*n+i of the pairs (i < j).
    """
    m = g.new_zeros(g.shape[0], n * n)
    m.index_copy_(1, pairs[0], g)
    m.index_copy_(1, pairs[1], g)
    return m.view(-1, n, n)


_SYM_CHUNK = 1024  # rows of G built at a time by _sym_bmm


def _sym_bmm(gp: Tensor, pairs: Tensor, x: Tensor) -> Tensor:
    """``(G + G^T) x`` for (M, n(n-1)/2) pair values ``gp`` and (M, n, k) ``x``: (M, n, k).

    G is built ``_SYM_CHUNK`` rows at a time: the whole (M, n, n) matrix would be a temporary at the
    memory peak of the backward. Unchunked when a graph
    is recorded (``out=`` cannot be differentiated).
    """
    n, m = x.shape[1], x.shape[0]
    if torch.is_grad_enabled() or m <= _SYM_CHUNK:
        return torch.bmm(_sym_from_pairs(gp, pairs, n), x)
    out = x.new_empty(m, n, x.shape[2])
    for a in range(0, m, _SYM_CHUNK):
        b = min(a + _SYM_CHUNK, m)
        torch.bmm(_sym_from_pairs(gp[a:b], pairs, n), x[a:b], out=out[a:b])
    return out


class DotFeatures(torch.autograd.Function):
    """(M, n, d) vectors -> (M, off + n(n-1)/2) top-tower inputs: ``v[:, 0]`` (the bottom output,
    ``off`` = d; 0 without a bottom tower), then the pairwise dot products (strict upper triangle).

    autograd's own backward of ``v @ v.mT`` does two batched products, one with a transposed operand
    (slow on CPU); this one uses ``dv = (G + G^T) v`` (``DotGrad``).
    """

    @staticmethod
    def forward(v: Tensor, pairs: Tensor, off: int) -> Tensor:
        n = v.shape[1]
        prods = torch.bmm(v, v.transpose(1, 2)).view(-1, n * n).index_select(1, pairs[0])
        return torch.cat([v[:, 0], prods], dim=1) if off else prods

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        v, pairs, off = inputs
        ctx.save_for_backward(v, pairs)
        ctx.off = off

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        v, pairs = ctx.saved_tensors
        return DotGrad.apply(v, g, pairs, ctx.off), None, None


class DotGrad(torch.autograd.Function):
    """The backward of ``DotFeatures`` as a differentiable op: (v, g) -> dv.

    ``dv = (G + G^T) v`` with G the pair gradients ``g[:, off:]`` placed at (i, j), plus ``g[:, :off]``
    on ``dv[:, 0]``. The inner loop calls it for the support gradients w.r.t. the interaction's
    inputs; the outer backward of second-order MAML differentiates it once: d v = (G + G^T) dout, and
    dg[(i, j)] = (dout v^T)[i, j] + (dout v^T)[j, i], dg[:, :off] = dout[:, 0].
    """

    @staticmethod
    def forward(v: Tensor, g: Tensor, pairs: Tensor, off: int) -> Tensor:
        out = _sym_bmm(g[:, off:], pairs, v)
        if off:
            out[:, 0] += g[:, :off]
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        v, g, pairs, off = inputs
        ctx.save_for_backward(v, g, pairs)
        ctx.off = off

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        v, g, pairs = ctx.saved_tensors
        n, off = v.shape[1], ctx.off
        dv = dg = None
        if ctx.needs_input_grad[0]:
            dv = _sym_bmm(g[:, off:], pairs, dout)
        if ctx.needs_input_grad[1]:
            p = torch.bmm(dout, v.transpose(1, 2)).view(-1, n * n)
            dp = p.index_select(1, pairs[0]) + p.index_select(1, pairs[1])
            dg = torch.cat([dout[:, 0], dp], dim=1) if off else dp
        return dv, dg, None, None


class PairsOfFirst(torch.autograd.Function):
    """(M, n-1) weights, (M, n, d) vectors -> (M, d) weighted sum of vectors 1..n-1 (the bottom
    output's gradient from its dot pairs (0, j), whose derivative w.r.t. v_0 is v_j).

    It takes all n vectors, not the slice ``v[:, 1:]``: the interaction's backward saves ``v``
    anyway, and the gradient of a slice would be materialized as a second full-size tensor. The
    backward's outer product is a broadcast multiply (a batched product with an inner dimension of 1
    is slow on CPU)."""

    @staticmethod
    def forward(w: Tensor, v: Tensor) -> Tensor:
        return torch.bmm(w.unsqueeze(1), v[:, 1:]).squeeze(1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, v = ctx.saved_tensors
        dw = dv = None
        if ctx.needs_input_grad[0]:
            dw = torch.bmm(v[:, 1:], dout.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[1]:  # weight 0 for v_0: one (M, n, d) gradient, no slice to fill
            w0 = torch.nn.functional.pad(w, (1, 0))
            dv = w0.unsqueeze(-1) * dout.unsqueeze(1)
        return dw, dv


class LowRank(torch.autograd.Function):
    """``base - lr * (x Y^T [+ 1]) V``, added in place to ``base`` (a fresh shared product): the
    per-task correction of a low-rank adapted layer. x: (T, M, k), Y: (T, R, k), V: (T, R, n).

    Its own backward so that every gradient is a batched product in row-major layout: autograd's
    backward of ``x @ Y.mT`` gives dY as the transpose of a product, and strided gradients slow
    down every elementwise op downstream (measured: docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx: Any, base: Tensor, x: Tensor, Y: Tensor, V: Tensor, lr: float, plus_one: bool) -> Tensor:
        a = torch.bmm(x, Y.transpose(1, 2))
        if plus_one:
            a.add_(1.0)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, Y, V, a)  # a: (T, M, R), small
        ctx.lr = lr
        return base.baddbmm_(a, V, alpha=-lr)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, Y, V, a = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dY = dV = None
        if need[1] or need[2]:
            # -lr folded into the small (T, M, R) factor, not the large results
            da = torch.bmm(g, V.transpose(1, 2)).mul_(-ctx.lr)
            if need[1]:
                dx = torch.bmm(da, Y)
            if need[2]:
                dY = torch.bmm(da.transpose(1, 2), x)
        if need[3]:
            dV = torch.bmm(a.transpose(1, 2).mul(-ctx.lr), g)
        return g, dx, dY, dV, None, None


def unsafe_view(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``x.view(shape)`` that autograd does not track as a view (as ``torch.matmul`` does), so the
    low-rank correction can be added in place (``baddbmm_``) without copying the shared product:
    an in-place op on a tracked view would clone the gradient in the backward (``CopySlices``).
    Only for fresh results of ops that do not save their output (``mm``/``addmm``)."""
    return torch.ops.aten._unsafe_view(x, shape)


def relu_grad(g: Tensor, relu_out: Tensor) -> Tensor:
    """g * (relu_out > 0) in one op, differentiable w.r.t. g only (the mask is a constant: without the
    detach autograd would build and accumulate a zero gradient for relu_out)."""
    return torch.ops.aten.threshold_backward(g, relu_out.detach(), 0.0)
