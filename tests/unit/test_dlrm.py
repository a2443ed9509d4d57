"""DLRM towers: shapes, interactions computed by hand, functional forward."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from gmeta.model.dlrm import DLRM

F_, FD, D = 4, 3, 5


def make(interaction: str, num_dense: int = FD) -> DLRM:
    torch.manual_seed(0)
    return DLRM(F_, num_dense, D, bottom_mlp=(8,), top_mlp=(16, 8), interaction=interaction).double()


@pytest.mark.parametrize("interaction", ["dot", "concat"])
@pytest.mark.parametrize("num_dense", [FD, 0])
def test_shapes_and_param_groups(interaction, num_dense):
    model = make(interaction, num_dense)
    n_vec = F_ + (num_dense > 0)
    if interaction == "concat":
        top_in = n_vec * D
    else:
        top_in = n_vec * (n_vec - 1) // 2 + (D if num_dense else 0)
    assert model.top[0].in_features == top_in
    assert all(n.startswith(("bottom.", "top.")) for n, _ in model.named_parameters())
    assert any(n.startswith("bottom.") for n, _ in model.named_parameters()) == (num_dense > 0)
    for lead in [(7,), (2, 3, 4)]:
        out = model(
            torch.randn(*lead, F_, D, dtype=torch.float64), torch.randn(*lead, num_dense, dtype=torch.float64)
        )
        assert out.shape == lead


def test_dot_and_concat_interactions_by_hand():
    emb = torch.randn(6, F_, D, dtype=torch.float64)
    dense = torch.randn(6, FD, dtype=torch.float64)
    for interaction in ["dot", "concat"]:
        model = make(interaction)
        b = model.bottom(dense)
        vecs = torch.cat([b[:, None], emb], dim=1)
        if interaction == "concat":
            feats = vecs.reshape(6, -1)
        else:
            pairs = [vecs[:, i] @ vecs[:, j].T for i in range(F_ + 1) for j in range(i + 1, F_ + 1)]
            pairs = torch.stack([p.diagonal() for p in pairs], dim=1)
            feats = torch.cat([b, pairs], dim=1)
        torch.testing.assert_close(model(emb, dense), model.top(feats).squeeze(-1))
    assert not torch.allclose(make("dot")(emb, dense), make("concat")(emb, dense))


def test_forward_with_equals_module_forward_and_vmaps_over_per_task_params():
    model = make("dot")
    emb = torch.randn(3, 5, F_, D, dtype=torch.float64)
    dense = torch.randn(3, 5, FD, dtype=torch.float64)
    params = dict(model.named_parameters())
    torch.testing.assert_close(model.forward_with(params, emb, dense), model(emb, dense), rtol=0, atol=0)

    # Per-task params (leading T) under vmap == a loop of modules holding those params.
    per_task = {k: v.detach() + 0.1 * torch.randn(3, *v.shape, dtype=v.dtype) for k, v in params.items()}
    out = vmap(model.forward_with)(per_task, emb, dense)
    for t in range(3):
        ref = make("dot")
        ref.load_state_dict({k: v[t] for k, v in per_task.items()})
        torch.testing.assert_close(out[t], ref(emb[t], dense[t]))
    # Missing names fall back to the module's own parameters.
    top_only = {k: v for k, v in per_task.items() if k.startswith("top.")}
    out = vmap(model.forward_with, in_dims=(0, 0, 0))(top_only, emb, dense)
    ref = make("dot")
    ref.load_state_dict(
        {**{k: v.detach() for k, v in params.items()}, **{k: v[1] for k, v in top_only.items()}}
    )
    torch.testing.assert_close(out[1], ref(emb[1], dense[1]))


@pytest.mark.parametrize("interaction", ["dot", "concat"])
def test_id_bias_adds_the_fields_biases_to_the_towers_logit(interaction):
    """``id_bias``: rows one column wider; the logit is the same towers' output on the first d
    columns plus the sum of the F last ones."""
    torch.manual_seed(0)
    plain = DLRM(F_, FD, D, bottom_mlp=(8,), top_mlp=(16, 8), interaction=interaction).double()
    torch.manual_seed(0)
    biased = DLRM(F_, FD, D, bottom_mlp=(8,), top_mlp=(16, 8), interaction=interaction, id_bias=True)
    biased = biased.double()
    assert (plain.row_dim, biased.row_dim) == (D, D + 1)
    rows = torch.randn(2, 7, F_, D + 1, dtype=torch.float64)
    dense = torch.randn(2, 7, FD, dtype=torch.float64)
    expected = plain(rows[..., :D], dense) + rows[..., D].sum(-1)
    torch.testing.assert_close(biased(rows, dense), expected, rtol=0, atol=1e-14)
    params = dict(biased.named_parameters())
    torch.testing.assert_close(biased.forward_with(params, rows, dense), expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=f"width {D}, the model reads rows of {D + 1}"):
        biased(rows[..., :D], dense)
