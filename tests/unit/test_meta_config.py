"""MetaConfig: the algorithms' defining settings come from one table, contradictions are refused."""

from __future__ import annotations

import pytest

from gmeta.errors import ConfigError
from gmeta.meta.config import ALGORITHMS, META_ALGORITHMS, MetaConfig


def test_algorithm_defaults_come_from_one_table():
    assert MetaConfig("anil").adapt_groups == ("top",)
    assert MetaConfig("fomaml").first_order and not MetaConfig("maml").first_order
    assert MetaConfig("maml", adapt_groups=["top"]).adapt_groups == ("top",)  # Hydra hands lists
    for name in META_ALGORITHMS:
        cfg = MetaConfig(name)
        assert cfg.first_order == ALGORITHMS[name].first_order
        assert cfg.adapt_groups == ALGORITHMS[name].adapt_groups
        # an explicit value equal to the default is the same config
        assert cfg == MetaConfig(name, first_order=cfg.first_order, adapt_groups=cfg.adapt_groups)
    assert MetaConfig("none").is_meta is False and MetaConfig("anil").is_meta


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "fomaml", "first_order": False},
            "meta.name=fomaml with meta.first_order=False.*meta.name=maml",
        ),
        (
            {"name": "maml", "first_order": True},
            "meta.name=maml with meta.first_order=True.*meta.name=fomaml",
        ),
        (
            {"name": "anil", "adapt_groups": ["bottom", "top"]},
            r"meta.name=anil adapts \['top'\] by definition",
        ),
        ({"name": "none", "support_loss_weight": 0.5}, "only applies to meta algorithms"),
        ({"name": "reptile"}, "meta.name must be one of"),
        ({"adapt_groups": ("embedding",)}, "meta.adapt_groups"),
        ({"backend": "jit"}, "meta.backend must be one of"),
        ({"inner_steps": -1}, "meta.inner_steps"),
        ({"inner_lr": 0.0}, "meta.inner_lr"),
    ],
)
def test_contradictory_or_invalid_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MetaConfig(**kwargs)


def test_checkpoints_naming_the_backend_implementation_still_load():
    old = {"name": "maml", "inner_steps": 2, "inner_lr": 0.1, "first_order": False, "implementation": "vmap"}
    assert MetaConfig.from_dict(old) == MetaConfig("maml", inner_steps=2, inner_lr=0.1, backend="vmap")


def test_anil_may_adapt_the_task_rows_with_the_top_tower():
    """MeLU-style: the decision layers and the task's looked-up rows adapt."""
    cfg = MetaConfig("anil", adapt_embeddings=True, inner_steps=2)
    assert cfg.adapts and cfg.adapt_groups == ("top",)
    assert not MetaConfig("maml", inner_steps=0).adapts
    assert not MetaConfig("maml", adapt_groups=()).adapts
