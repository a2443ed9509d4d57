"""The towers at each task's adapted weights: forward of a set, and the inner loop's backward by hand.

A layer adapted by k inner steps is ``W - sum_j lr_j D_j^T X_j``; ``State`` keeps either those
factors (low rank: the layer's output is the shared product plus a small per-task correction) or,
when cheaper, per-task weights (``materialize_layer``). With one inner lr for every layer and step
the factors are stored as they are and the correction applies the lr; with learned rates
(``gmeta.meta.inner_lr``) each step's D is stored multiplied by its own rate. ``inner_backward`` is
the support loss's backward through the towers written as ordinary tensor ops, so second-order MAML
differentiates it with one plain ``loss.backward()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmeta.meta.fast.ops import DotFeatures, DotGrad, LowRank, PairsOfFirst, relu_grad, unsafe_view
from gmeta.meta.fast.towers import Layer, Towers
from gmeta.model.dlrm import split_id_bias

Factors = tuple[Tensor, Tensor]  # X (T, R, in), D (T, R, out)


@dataclass
class State:
    """What the inner loop has learned so far.

    factor_lr: the rate the low-rank correction applies to the stored factors: the inner lr, or 1.0
        when each step's D is stored already multiplied by its own (learned, tensor) rate.
    factors: per low-rank adapted layer (index into bottom + top), the stacked (X, D) of all steps.
    weights: per materialized layer, the (T, out, in) weights and (T, out) biases of the tasks.
    row_delta: (C + 1, d) deltas of the tasks' own rows (``TaskRows``).
    """

    factor_lr: float = 0.0
    factors: dict[int, Factors] = field(default_factory=dict)
    weights: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    row_delta: Tensor | None = None

    def update(
        self, i: int, layer: Layer, x: Tensor, d: Tensor, lr: float | Tensor, materialize: bool
    ) -> None:
        """Add one SGD step at rate ``lr`` with support inputs x (T, S, in) and output gradients
        d (T, S, out)."""
        if isinstance(lr, Tensor):  # a learned rate: it goes into D (factor_lr is 1)
            assert self.factor_lr == 1.0, "learned rates need State(factor_lr=1.0)"
            d, lr = d * lr, 1.0
        if not materialize:
            self.factors[i] = _grow(self.factors.get(i), (x, d))
            return
        w, b = self.weights.get(i, (layer.weight.unsqueeze(0), layer.bias.unsqueeze(0)))
        self.weights[i] = (torch.baddbmm(w, d.transpose(1, 2), x, alpha=-lr), b - lr * d.sum(1))


def materialize_layer(layer: Layer, rows: int) -> bool:
    """Per-task weights beat the low-rank form when the factor rows (steps x support) cost more per
    sample than twice the weight: rows * (in + out) > 2 * in * out (the factor 2 and its measurement:
    docs/benchmarks.md, "How the fast path gets its speed")."""
    out_f, in_f = layer.weight.shape
    return rows * (in_f + out_f) > 2 * in_f * out_f


def linear(x: Tensor, layer: Layer, st: State, i: int) -> Tensor:
    """(T, M, in) -> (T, M, out) at each task's adapted weights (the shared ones if not adapted)."""
    T, M, _ = x.shape
    if i in st.weights:
        w, b = st.weights[i]
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    fac = st.factors.get(i)
    if fac is None:
        return torch.addmm(layer.bias, x.reshape(T * M, -1), layer.weight.t()).view(T, M, -1)
    z = unsafe_view(torch.addmm(layer.bias, x.reshape(T * M, -1), layer.weight.t()), (T, M, -1))
    X, D = fac
    return LowRank.apply(z, x, X, D, st.factor_lr, True)


def linear_input_grad(delta: Tensor, layer: Layer, st: State, i: int, cols: int | None) -> Tensor:
    """(T, S, out) output gradients -> (T, S, cols) gradients w.r.t. the first ``cols`` inputs."""
    T, S, _ = delta.shape
    if i in st.weights:
        w = st.weights[i][0]
        return torch.bmm(delta, w if cols is None else w[..., :cols])
    w = layer.weight if cols is None else layer.weight[:, :cols]
    fac = st.factors.get(i)
    if fac is None:
        return (delta.reshape(T * S, -1) @ w).view(T, S, -1)
    g = unsafe_view(delta.reshape(T * S, -1) @ w, (T, S, -1))
    X, D = fac
    if cols is not None:
        X = X[..., :cols]
    return LowRank.apply(g, delta, D, X, st.factor_lr, False)


@dataclass
class Cache:
    """A set's forward at some state: each layer's input, the interaction's vectors, the logits."""

    bottom_in: list[Tensor]
    bottom_out: Tensor | None
    emb: Tensor
    top_in: list[Tensor]
    logits: Tensor
    vecs: Tensor | None = None  # dot: (T*M, n, d)


def interaction(tw: Towers, bottom_out: Tensor | None, emb: Tensor) -> tuple[Tensor, Tensor | None]:
    """(T, M, P) top-tower inputs, and the (T*M, n, d) vectors for ``dot``."""
    T, M, F, d = emb.shape
    vecs = emb if bottom_out is None else torch.cat([bottom_out.unsqueeze(-2), emb], dim=-2)
    if tw.interaction == "concat":
        return vecs.reshape(T, M, -1), None
    assert tw.pairs is not None
    v = vecs.reshape(T * M, vecs.shape[-2], d)
    feats = DotFeatures.apply(v, tw.pairs, 0 if bottom_out is None else d).view(T, M, -1)
    return feats, v


def forward_set(
    tw: Towers,
    st: State,
    emb: Tensor,
    dense: Tensor,
    feats: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
) -> Cache:
    """Logits of a (T, M) set at the state's adapted weights; ``feats`` reuses a computed
    (top input, vecs, bottom output) when neither the bottom tower nor the embeddings adapt.
    ``emb``: (T, M, F, d), or (T, M, F, d + 1) with the ids' biases (``tw.id_bias``)."""
    emb, id_bias = split_id_bias(emb, tw.dim) if tw.id_bias else (emb, None)
    n_bottom = len(tw.bottom)
    bottom_in: list[Tensor] = []
    bottom_out = None
    if feats is None:
        if tw.has_bottom:
            h = dense
            for i, layer in enumerate(tw.bottom):
                bottom_in.append(h)
                h = torch.relu(linear(h, layer, st, i))
            bottom_out = h
        x, vecs = interaction(tw, bottom_out, emb)
    else:
        x, vecs, bottom_out = feats
    top_in = []
    for j, layer in enumerate(tw.top):
        top_in.append(x)
        x = linear(x, layer, st, n_bottom + j)
        if j < len(tw.top) - 1:
            x = torch.relu(x)
    logits = x.squeeze(-1)
    if id_bias is not None:  # the first-order term: no weight of the towers touches it
        logits = logits + id_bias
    return Cache(bottom_in, bottom_out, emb, top_in, logits, vecs)


@dataclass
class InnerGrads:
    """Support-loss gradients of one inner step: per adapted layer (input, output-gradient) pairs,
    and the (T, S, F, d) gradients w.r.t. the support embeddings (if asked; d + 1 columns with
    the ids' biases)."""

    layers: dict[int, Factors]
    emb: Tensor | None


def inner_backward(tw: Towers, st: State, c: Cache, dlogit: Tensor, need_emb: bool) -> InnerGrads:
    """Backward of the support loss through the towers, by hand, down to the lowest adapted layer."""
    n_bottom = len(tw.bottom)
    need_bottom = any(x.adapted for x in tw.bottom)
    out: dict[int, Factors] = {}
    delta = dlogit.unsqueeze(-1)
    go_below_top = need_bottom or need_emb
    g_emb = None
    for j in range(len(tw.top) - 1, -1, -1):
        i = n_bottom + j
        layer = tw.top[j]
        if layer.adapted:
            out[i] = (c.top_in[j], delta)
        lower_top_adapted = any(x.adapted for x in tw.top[:j])
        if j > 0:
            if not (lower_top_adapted or go_below_top):
                break
            g = linear_input_grad(delta, layer, st, i, None)
            delta = relu_grad(g, c.top_in[j])
            continue
        if not go_below_top:
            break
        d = tw.dim
        n = tw.n_vec
        if need_emb:
            g_feat = linear_input_grad(delta, layer, st, i, None)
        else:  # only what reaches the bottom output: its d direct columns (+ its n-1 dot pairs)
            cols = d if tw.interaction == "concat" else d + n - 1
            g_feat = linear_input_grad(delta, layer, st, i, cols)
        T, S = g_feat.shape[:2]
        g_bottom = None
        if tw.interaction == "concat":
            if tw.has_bottom:
                g_bottom = g_feat[..., :d]
            if need_emb:
                g_emb = g_feat[..., (d if tw.has_bottom else 0) :].reshape(T, S, tw.num_fields, d)
        else:
            assert tw.pairs is not None and c.vecs is not None
            off = d if tw.has_bottom else 0
            if need_emb:
                g_v = DotGrad.apply(c.vecs, g_feat.reshape(T * S, -1), tw.pairs, off).view(T, S, n, d)
                if tw.has_bottom:
                    g_bottom = g_v[:, :, 0]
                    g_emb = g_v[:, :, 1:]
                else:
                    g_emb = g_v
            elif tw.has_bottom:  # d(pair (0, j))/d v_0 = v_j
                pair0 = g_feat[..., d : d + n - 1].reshape(T * S, n - 1)
                # the interaction's vectors, which its backward saves anyway: saving the gathered
                # (T, S, F, d) embeddings too would keep a second copy alive until the backward
                g_pairs = PairsOfFirst.apply(pair0, c.vecs)
                g_bottom = g_feat[..., :d] + g_pairs.view(T, S, d)
        if need_bottom and g_bottom is not None:
            assert c.bottom_out is not None
            delta = relu_grad(g_bottom, c.bottom_out)
            for i in range(n_bottom - 1, -1, -1):
                layer = tw.bottom[i]
                if layer.adapted:
                    out[i] = (c.bottom_in[i], delta)
                if i == 0 or not any(x.adapted for x in tw.bottom[:i]):
                    break
                g = linear_input_grad(delta, layer, st, i, None)
                delta = relu_grad(g, c.bottom_in[i])
    if g_emb is not None and tw.id_bias:  # d logit / d bias of each field = 1
        T, S, F, _ = g_emb.shape
        g_emb = torch.cat([g_emb, dlogit.view(T, S, 1, 1).expand(T, S, F, 1)], dim=-1)
    return InnerGrads(out, g_emb)


def bce_grad(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """d(per-task masked-mean BCE)/d logits: (sigmoid(z) - y) * mask / count (0 at padding)."""
    return torch.where(weight > 0, torch.sigmoid(logits) - label, 0.0) * weight


def _grow(fac: Factors | None, new: Factors) -> Factors:
    if fac is None:
        return new
    return torch.cat([fac[0], new[0]], dim=1), torch.cat([fac[1], new[1]], dim=1)
