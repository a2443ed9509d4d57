"""The DLRM towers as a list of linear layers, the form the closed-form inner loop computes with.

``towers_of`` reads a ``DLRM`` whose towers are Linear/ReLU stacks (``gmeta.model.dlrm.mlp``) with a
``dot`` or ``concat`` interaction; for any other structure it returns None and the caller uses the
vmap backend. ``generate`` applies the model's generator (``DLRM.generator``) to gathered embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gmeta.model.dlrm import DLRM, GeneratorSpec, add_generated, generator_input


@dataclass
class Layer:
    """One linear layer: ``weight`` (out, in), ``bias`` (out,), whether the inner loop adapts it, and
    its module name (``top.0``: its slot of learned inner learning rates, ``gmeta.meta.inner_lr``)."""

    weight: Tensor
    bias: Tensor
    adapted: bool
    name: str = ""


@dataclass
class Towers:
    """The DLRM towers at some parameter values (attached or detached)."""

    bottom: list[Layer]  # ReLU after every layer (the last one too)
    top: list[Layer]  # ReLU between layers, the last one gives the logit
    interaction: str
    dim: int
    num_fields: int
    pairs: Tensor | None  # dot: (2, n(n-1)/2) flat indices i*n+j and j*n+i (i < j) of (n, n) products
    id_bias: bool = False  # the rows carry a bias column, added to the logit (``DLRM.id_bias``)
    # ``DLRM.generator``: its layers (never adapted; ReLU between them) and where it reads and writes
    generator: list[Layer] = field(default_factory=list)
    generator_spec: GeneratorSpec | None = None

    @property
    def has_bottom(self) -> bool:
        return bool(self.bottom)

    @property
    def n_vec(self) -> int:
        return self.num_fields + (1 if self.has_bottom else 0)

    def _map(self, f: Callable[[Tensor], Tensor]) -> Towers:
        def each(layers: list[Layer]) -> list[Layer]:
            return [Layer(f(x.weight), f(x.bias), x.adapted, x.name) for x in layers]

        return Towers(
            each(self.bottom),
            each(self.top),
            self.interaction,
            self.dim,
            self.num_fields,
            self.pairs,
            self.id_bias,
            each(self.generator),
            self.generator_spec,
        )

    def detached(self) -> Towers:
        return self._map(Tensor.detach)

    def to(self, dtype: torch.dtype) -> Towers:
        """The towers with every weight cast to ``dtype`` (differentiable: gradients reach the
        original weights in their own dtype)."""
        return self._map(lambda t: t.to(dtype))


def generate(tw: Towers, emb: Tensor) -> Tensor:
    """Gathered (..., F, row_dim) embeddings as the towers read them: with a generator, its output
    added to the target field's vectors (``DLRM.forward``'s first step); else ``emb`` itself."""
    spec = tw.generator_spec
    if spec is None:
        return emb
    h = generator_input(emb, spec, tw.dim)
    for i, layer in enumerate(tw.generator):
        h = torch.nn.functional.linear(h, layer.weight, layer.bias)
        if i < len(tw.generator) - 1:
            h = torch.relu(h)
    return add_generated(emb, h, spec, tw.dim)


def _linear_names(seq: nn.Sequential | None, prefix: str, last_relu: bool) -> list[str] | None:
    """Param name prefixes of the Linear layers of a Linear/ReLU stack; None if it is not one."""
    if seq is None:
        return []
    mods = list(seq)
    names = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            if m.bias is None:
                return None
            after = mods[i + 1] if i + 1 < len(mods) else None
            is_last = not any(isinstance(x, nn.Linear) for x in mods[i + 1 :])
            wants_relu = last_relu or not is_last
            if wants_relu != isinstance(after, nn.ReLU):
                return None
            names.append(f"{prefix}.{i}")
        elif not isinstance(m, nn.ReLU):
            return None
    return names


def towers_of(model: nn.Module, params: Mapping[str, Tensor], adapt_groups: tuple[str, ...]) -> Towers | None:
    """The towers of a ``DLRM`` at ``params`` (missing names: the module's own), or None if the model
    is not a structure the fast path knows (then use the vmap path)."""
    if not isinstance(model, DLRM) or model.interaction not in ("dot", "concat"):
        return None
    bottom = _linear_names(model.bottom, "bottom", last_relu=True)
    top = _linear_names(model.top, "top", last_relu=False)
    generator = _linear_names(model.generator, "generator", last_relu=False)
    if bottom is None or top is None or not top or generator is None:
        return None
    own = dict(model.named_parameters())

    def layers(names: list[str], group: str) -> list[Layer]:
        get = lambda k: params[k] if k in params else own[k]  # noqa: E731
        return [Layer(get(f"{p}.weight"), get(f"{p}.bias"), group in adapt_groups, p) for p in names]

    pairs = None
    if model.interaction == "dot":
        n = model.num_fields + (1 if model.bottom is not None else 0)
        i, j = torch.as_tensor(model.triu_rows), torch.as_tensor(model.triu_cols)
        pairs = torch.stack([i * n + j, j * n + i])
    return Towers(
        layers(bottom, "bottom"),
        layers(top, "top"),
        model.interaction,
        model.dim,
        model.num_fields,
        pairs,
        model.id_bias,
        layers(generator, "generator"),  # "generator" is no adaptable group: never adapted
        model.generator_spec,
    )
