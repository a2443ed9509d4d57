"""Meta-learning settings: the algorithms, their defining defaults (in one place), and validation.

An algorithm is a name plus the settings that define it: ``fomaml`` IS first-order MAML, ``anil``
adapts only the top tower. Those settings default to ``None`` in ``MetaConfig`` and are filled in from
``ALGORITHMS``; a value that contradicts the name (``fomaml`` with ``first_order=False``) is refused
with a ``ConfigError`` instead of silently running another algorithm. ``conf/meta/*.yaml`` therefore
only names the algorithm and leaves these keys ``null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gmeta.errors import ConfigError

#: dense parameter groups (name prefixes of ``DLRM`` parameters) the inner loop can adapt
PARAM_GROUPS: tuple[str, ...] = ("bottom", "top")
#: how the meta step is computed: ``fast`` the closed-form inner loop on the DLRM towers
#: (``gmeta.meta.fast``), ``vmap`` ``torch.func.vmap`` over tasks of ``torch.func.grad`` steps,
#: ``reference`` a Python loop over tasks and unpadded samples (slow; the tests' yardstick)
BACKENDS: tuple[str, ...] = ("fast", "vmap", "reference")


@dataclass(frozen=True)
class Algorithm:
    """What defines an algorithm: defaults, and the values it cannot take.

    Attributes:
        first_order: the default of ``MetaConfig.first_order``; ``fixed_order``: no other value allowed.
        adapt_groups: the default of ``MetaConfig.adapt_groups``; ``fixed_groups``: no other allowed.
        meta: whether training runs an inner loop (``none`` trains plainly on support + query).
        description: one line for messages and docs.
    """

    first_order: bool
    adapt_groups: tuple[str, ...]
    meta: bool
    description: str
    fixed_order: bool = False
    fixed_groups: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(
        first_order=False,
        adapt_groups=("bottom", "top"),
        meta=True,
        fixed_order=True,
        description="second-order MAML (first order is meta.name=fomaml)",
    ),
    "fomaml": Algorithm(
        first_order=True,
        adapt_groups=("bottom", "top"),
        meta=True,
        fixed_order=True,
        description="first-order MAML: the inner gradients are constants in the outer update",
    ),
    "anil": Algorithm(
        first_order=False,
        adapt_groups=("top",),
        meta=True,
        fixed_groups=True,
        description="ANIL: only the top (decision) tower adapts, MeLU-style",
    ),
    "none": Algorithm(
        first_order=False,
        adapt_groups=("bottom", "top"),
        meta=False,
        description="plain training on support + query; 'adapted' evaluation fine-tunes on the support set",
    ),
}
META_ALGORITHMS: tuple[str, ...] = tuple(ALGORITHMS)


@dataclass(frozen=True)
class MetaConfig:
    """Inner-loop settings (the ``meta`` config group).

    Attributes:
        name: one of ``META_ALGORITHMS``.
        inner_steps: SGD steps on the support set per task (>= 0).
        inner_lr: inner SGD learning rate (> 0).
        adapt_groups: dense parameter groups adapted per task; None: the algorithm's.
        adapt_embeddings: also adapt each task's copy of the looked-up embedding rows.
        adapt_embedding_fields: with ``adapt_embeddings``, only the rows of these id fields adapt
            (e.g. ``[user_id]``: a per-user vector, MeLU-style, with ``adapt_groups=[top]``); None:
            every id field's.
        first_order: drop second-order terms (gradient through the inner gradients); None: the
            algorithm's.
        support_loss_weight: meta algorithms only: add this times the support loss at the shared
            (un-adapted) weights to the query loss. MAML alone learns from query labels only (a
            quarter of MovieLens' training labels); this auxiliary term lets every label train the
            embeddings, while the query term still trains for post-adaptation performance.
        backend: one of ``BACKENDS``. ``fast`` falls back to ``vmap`` for a model structure it does not
            know (``gmeta.meta.fast.towers_of`` says which); all compute the same numbers.
        episode_support_sizes / episode_rate: meta algorithms only: k-shot episodes. In training, an
            ``episode_rate`` share of the tasks keeps only its first k support samples, k drawn from
            ``episode_support_sizes`` (the sizes met at evaluation; ``gmeta.meta.episodes``).
        learn_inner_lr: meta algorithms only: learn one inner learning rate per layer and inner step
            (Meta-SGD / MAML++), initialised to ``inner_lr`` (``gmeta.meta.inner_lr``).
    """

    name: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    adapt_groups: tuple[str, ...] | None = None
    adapt_embeddings: bool = False
    adapt_embedding_fields: tuple[str, ...] | None = None
    first_order: bool | None = None
    support_loss_weight: float = 0.0
    backend: str = "fast"
    episode_support_sizes: tuple[int, ...] = ()
    episode_rate: float = 0.0
    learn_inner_lr: bool = False

    def __post_init__(self) -> None:
        algo = ALGORITHMS.get(self.name)
        if algo is None:
            raise ConfigError(f"meta.name must be one of {list(META_ALGORITHMS)}, got {self.name!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"meta.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.inner_steps < 0:
            raise ConfigError(f"meta.inner_steps must be >= 0, got {self.inner_steps}")
        if not self.inner_lr > 0:
            raise ConfigError(f"meta.inner_lr must be > 0, got {self.inner_lr}")
        if self.support_loss_weight < 0:
            raise ConfigError(f"meta.support_loss_weight must be >= 0, got {self.support_loss_weight}")
        if not 0.0 <= self.episode_rate <= 1.0:
            raise ConfigError(f"meta.episode_rate must be in [0, 1], got {self.episode_rate}")
        sizes = tuple(int(k) for k in self.episode_support_sizes or ())
        if any(k < 1 for k in sizes):
            raise ConfigError(f"meta.episode_support_sizes must be >= 1, got {list(sizes)}")
        if self.episode_rate > 0 and not sizes:
            raise ConfigError(
                "meta.episode_rate > 0 needs meta.episode_support_sizes (e.g. [1, 2, 3, 5, 10])"
            )
        object.__setattr__(self, "episode_support_sizes", sizes)
        groups = algo.adapt_groups if self.adapt_groups is None else tuple(self.adapt_groups)
        unknown = sorted(set(groups) - set(PARAM_GROUPS))
        if unknown:
            raise ConfigError(
                f"meta.adapt_groups {unknown} unknown; expected a subset of {list(PARAM_GROUPS)}"
            )
        order = algo.first_order if self.first_order is None else bool(self.first_order)
        self._refuse_contradictions(algo, groups, order)
        # Resolved in place (frozen: via object.__setattr__) so equal settings compare equal and the
        # config stays hashable (Hydra hands lists).
        object.__setattr__(self, "adapt_groups", groups)
        object.__setattr__(self, "first_order", order)

    def _refuse_contradictions(self, algo: Algorithm, groups: tuple[str, ...], first_order: bool) -> None:
        name = self.name
        if algo.fixed_order and first_order != algo.first_order:
            other = "fomaml" if name == "maml" else "maml"
            raise ConfigError(
                f"meta.name={name} with meta.first_order={first_order} contradicts the algorithm "
                f"({algo.description}); use meta.name={other}, or leave meta.first_order unset"
            )
        if algo.fixed_groups and set(groups) != set(algo.adapt_groups):
            raise ConfigError(
                f"meta.name={name} adapts {list(algo.adapt_groups)} by definition ({algo.description}), "
                f"got meta.adapt_groups={list(groups)}; use meta.name=maml with those groups, or leave "
                "meta.adapt_groups unset"
            )
        if not algo.meta and self.support_loss_weight > 0:
            raise ConfigError(
                f"meta.support_loss_weight={self.support_loss_weight} only applies to meta algorithms: "
                "meta.name=none already trains on every support label"
            )
        if self.adapt_embedding_fields is not None:
            fields = tuple(str(f) for f in self.adapt_embedding_fields)
            if not self.adapt_embeddings or not fields:
                raise ConfigError(
                    f"meta.adapt_embedding_fields={list(fields)} needs meta.adapt_embeddings=true and at "
                    "least one id field (null: every id field's rows adapt)"
                )
            object.__setattr__(self, "adapt_embedding_fields", fields)
        if self.learn_inner_lr and not (algo.meta and self.inner_steps > 0):
            raise ConfigError(
                f"meta.learn_inner_lr needs an inner loop to learn from (a meta algorithm with "
                f"meta.inner_steps >= 1), got meta.name={name}, meta.inner_steps={self.inner_steps}"
            )
        if not algo.meta and self.episode_rate > 0:
            raise ConfigError(
                f"meta.episode_rate={self.episode_rate} only applies to meta algorithms: for meta.name=none "
                "truncating support sets would only drop training labels"
            )

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.name]

    @property
    def is_meta(self) -> bool:
        """Whether training runs the inner loop (all algorithms but ``none``)."""
        return self.algorithm.meta

    @property
    def groups(self) -> tuple[str, ...]:
        """``adapt_groups``, resolved (never None after construction)."""
        assert self.adapt_groups is not None
        return self.adapt_groups

    @property
    def adapts(self) -> bool:
        """Whether the inner loop changes anything (steps > 0 and something to adapt)."""
        return self.inner_steps > 0 and bool(self.groups or self.adapt_embeddings)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetaConfig:
        """From a ``meta`` config dict (checkpoints written before ``backend`` named it ``implementation``)."""
        values = dict(values)
        if "implementation" in values:
            values.setdefault("backend", values.pop("implementation"))
        return cls(**values)


def adapted_names(names: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The parameter names in the given groups (name prefixes ``group.``)."""
    return [n for n in names if n.split(".", 1)[0] in groups]
