"""Dense part of a DLRM: bottom MLP for dense features, feature interaction, top MLP -> one logit,
plus (``id_bias``) a first-order term per id: the sum of the ids' scalar biases, as in a wide & deep
or factorization-machine model, and (``generator``) a small MLP that generates one field's vector
from other fields' vectors (an item's from its side features, MetaEmb-style).

Embeddings come in already gathered (``gmeta.model.embedding``), so this module holds only the
dense towers. Parameter names start with ``bottom.`` or ``top.``: meta algorithms pick the groups
they adapt in the inner loop by these prefixes. ``forward_with`` evaluates the model at any
parameter dict (fast weights) and works under ``torch.func.vmap`` with any leading dims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

Interaction = Literal["dot", "concat"]


def mlp(in_dim: int, sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    """Linear layers of the given output sizes with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, out in enumerate(sizes):
        layers.append(nn.Linear(in_dim, out))
        if i < len(sizes) - 1 or last_activation:
            layers.append(nn.ReLU())
        in_dim = out
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class GeneratorSpec:
    """Where the generator reads and writes: field ``target`` gets the generated vector added, made
    from the vectors of fields ``sources`` (indices into the F id fields); ``hidden``: hidden sizes."""

    target: int
    sources: tuple[int, ...]
    hidden: tuple[int, ...] = (32,)

    def check(self, num_fields: int) -> None:
        fields = (self.target, *self.sources)
        if not self.sources or any(not 0 <= f < num_fields for f in fields) or self.target in self.sources:
            raise ValueError(
                f"generator: target {self.target} and sources {list(self.sources)} must be distinct "
                f"fields among 0..{num_fields - 1}, with at least one source"
            )


def generator_input(emb: Tensor, spec: GeneratorSpec, dim: int) -> Tensor:
    """(..., F, row_dim) rows -> (..., len(sources) * dim): the source fields' vectors side by side
    (without the bias column)."""
    return emb[..., list(spec.sources), :dim].flatten(-2)


def add_generated(emb: Tensor, generated: Tensor, spec: GeneratorSpec, dim: int) -> Tensor:
    """``emb`` with ``generated`` (..., dim) added to the target field's vector (its bias column, if
    any, untouched); out of place, so it is differentiable and works under ``vmap``."""
    onehot = torch.zeros(emb.shape[-2], 1, dtype=emb.dtype, device=emb.device)
    onehot[spec.target] = 1.0
    pad = emb.shape[-1] - dim  # the bias column
    if pad:
        generated = torch.nn.functional.pad(generated, (0, pad))
    return emb + onehot * generated.unsqueeze(-2)


def split_id_bias(emb: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(..., F, dim + 1) rows -> the (..., F, dim) vectors and the (...) first-order term, the sum of
    the F ids' biases (the last column)."""
    return emb[..., :dim], emb[..., dim].sum(-1)


class DLRM(nn.Module):
    """DLRM towers.

    Args:
        num_fields: F, number of id fields (embeddings per sample).
        num_dense: Fd, number of dense features; 0 drops the bottom MLP.
        dim: d, embedding dim; the bottom MLP maps dense features to one more d-vector.
        bottom_mlp: hidden sizes of the bottom MLP (its output layer of size d is appended).
        top_mlp: hidden sizes of the top MLP (its output layer of size 1 is appended).
        interaction: ``concat``: flatten all vectors (F*d [+ d]); ``dot``: pairwise dot products
            of the F [+ 1] vectors (strict upper triangle), concatenated with the bottom output as in
            the DLRM paper.
        id_bias: each embedding row carries one more column, the id's scalar bias; the logit is the
            top MLP's output plus the sum of the F (pooled) biases. On MovieLens-1M it changed no
            state's AUC (validation, 2 seeds; docs/results.md), so it is off by default.
        generator: an MLP (ReLU between its layers, ``generator.*`` parameters, never adapted in the
            inner loop) from the ``sources`` fields' vectors to one d-vector, added to the ``target``
            field's vector before the interaction. A new item arrives with the OOV row, so its
            vector becomes the OOV row plus one generated from its side features (MetaEmb's
            generated embedding for a new id); a known item's own row learns the residual.
    """

    # index buffers of the strict upper triangle, registered for ``dot`` interaction only
    triu_rows: Tensor
    triu_cols: Tensor

    def __init__(
        self,
        num_fields: int,
        num_dense: int,
        dim: int,
        bottom_mlp: Sequence[int] = (64,),
        top_mlp: Sequence[int] = (64, 32),
        interaction: Interaction = "dot",
        id_bias: bool = False,
        generator: GeneratorSpec | None = None,
    ) -> None:
        super().__init__()
        if interaction not in ("dot", "concat"):
            raise ValueError(f"interaction must be 'dot' or 'concat', got {interaction!r}")
        self.num_fields = num_fields
        self.num_dense = num_dense
        self.dim = dim
        self.interaction = interaction
        self.id_bias = id_bias
        #: width of the embedding rows the model reads: d, plus the bias column with ``id_bias``
        self.row_dim = dim + (1 if id_bias else 0)
        # ReLU after the bottom output too, as in the reference DLRM.
        self.bottom = mlp(num_dense, [*bottom_mlp, dim], last_activation=True) if num_dense > 0 else None
        n_vec = num_fields + (1 if self.bottom is not None else 0)
        if interaction == "concat":
            top_in = n_vec * dim
        else:
            top_in = n_vec * (n_vec - 1) // 2 + (dim if self.bottom is not None else 0)
            iu = torch.triu_indices(n_vec, n_vec, offset=1)
            self.register_buffer("triu_rows", iu[0], persistent=False)
            self.register_buffer("triu_cols", iu[1], persistent=False)
        if top_in == 0:
            raise ValueError(
                f"interaction {interaction!r} of {n_vec} vector(s) gives no features for the top MLP"
            )
        self.top = mlp(top_in, [*top_mlp, 1], last_activation=False)
        self.generator_spec = generator
        self.generator: nn.Sequential | None = None
        if generator is not None:
            generator.check(num_fields)
            self.generator = mlp(
                len(generator.sources) * dim, [*generator.hidden, dim], last_activation=False
            )

    def forward(self, emb: Tensor, dense: Tensor) -> Tensor:
        """Logits.

        Args:
            emb: (..., F, row_dim) embeddings (the last column the ids' biases with ``id_bias``).
            dense: (..., Fd) dense features (ignored when Fd = 0).

        Returns:
            (...) logits.
        """
        if emb.shape[-1] != self.row_dim:
            raise ValueError(
                f"embeddings of width {emb.shape[-1]}, the model reads rows of {self.row_dim} "
                f"(dim {self.dim}{' + the id bias' if self.id_bias else ''})"
            )
        if self.generator is not None and self.generator_spec is not None:
            spec = self.generator_spec
            emb = add_generated(emb, self.generator(generator_input(emb, spec, self.dim)), spec, self.dim)
        emb, id_bias = split_id_bias(emb, self.dim) if self.id_bias else (emb, None)
        vecs = emb
        bottom_out = None
        if self.bottom is not None:
            bottom_out = self.bottom(dense)  # (..., d)
            vecs = torch.cat([bottom_out.unsqueeze(-2), emb], dim=-2)  # (..., F+1, d)
        if self.interaction == "concat":
            feats = vecs.flatten(-2)
        else:
            z = vecs @ vecs.transpose(-1, -2)  # (..., n, n)
            feats = z[..., self.triu_rows, self.triu_cols]  # (..., n(n-1)/2)
            if bottom_out is not None:
                feats = torch.cat([bottom_out, feats], dim=-1)
        logits = self.top(feats).squeeze(-1)
        return logits if id_bias is None else logits + id_bias

    def forward_with(self, params: Mapping[str, Tensor], emb: Tensor, dense: Tensor) -> Tensor:
        """``forward`` at the given parameters (missing names fall back to the module's own)."""
        return functional_call(self, dict(params), (emb, dense), strict=False)
