"""The one embedding gather (gmeta.model.gather) against a per-sample loop; double backward; vmap."""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from gmeta.model.embedding import LocalIndex
from gmeta.model.gather import gather, set_index


def make_index(seed: int = 0, T: int = 3, N: int = 4, fs: int = 2, fm: int = 2, L: int = 3, U: int = 9):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, U, (T, N, fs), generator=g)
    mask = torch.rand(T, N, fm, L, generator=g) < 0.6
    mask[0, 0, 0] = False  # an all-padding list pools to zeros
    multi_hot = torch.where(mask, torch.randint(0, U, (T, N, fm, L), generator=g), U)  # U: the pad row
    return LocalIndex(sparse, multi_hot, mask), U


def loop_gather(rows: torch.Tensor, idx: LocalIndex) -> torch.Tensor:
    T, N, fs = idx.sparse.shape
    fm = idx.multi_hot.shape[2]
    out = torch.zeros(T, N, fs + fm, rows.shape[1], dtype=rows.dtype)
    for t in range(T):
        for n in range(N):
            for f in range(fs):
                out[t, n, f] = rows[idx.sparse[t, n, f]]
            for f in range(fm):
                ids = idx.multi_hot[t, n, f][idx.multi_hot_mask[t, n, f]]
                if len(ids):
                    out[t, n, fs + f] = rows[ids].mean(0)
    return out


def test_gather_equals_a_per_sample_loop_and_pools_padding_to_zero():
    idx, U = make_index()
    rows = torch.randn(U, 5, dtype=torch.float64)
    got = gather(rows, set_index(idx, rows.dtype))
    torch.testing.assert_close(got, loop_gather(rows, idx), rtol=0, atol=1e-15)
    assert (got[0, 0, 2] == 0).all()


def test_gather_is_twice_differentiable_and_works_under_vmap():
    idx, U = make_index(1)
    rows = torch.randn(U, 5, dtype=torch.float64, requires_grad=True)
    ix = set_index(idx, rows.dtype)

    def f(r: torch.Tensor) -> torch.Tensor:
        return (gather(r, ix) ** 3).sum()

    def f_loop(r: torch.Tensor) -> torch.Tensor:
        return (loop_gather(r, idx) ** 3).sum()

    (g,) = torch.autograd.grad(f(rows), rows, create_graph=True)
    (g_ref,) = torch.autograd.grad(f_loop(rows), rows, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    v = torch.randn_like(rows)
    (hv,) = torch.autograd.grad((g * v).sum(), rows)
    (hv_ref,) = torch.autograd.grad((g_ref * v).sum(), rows)
    torch.testing.assert_close(hv, hv_ref)

    # per-task rows (the vmap backend's adapted embeddings): vmap of grad equals a loop over tasks
    per_task = rows.detach().unsqueeze(0).repeat(idx.sparse.shape[0], 1, 1)

    def task_grad(r: torch.Tensor, sp: torch.Tensor, mh: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from gmeta.model.gather import SetIndex

        return grad(lambda x: (gather(x, SetIndex(sp, mh, w)) ** 2).sum())(r)

    got = vmap(task_grad)(per_task, ix.sparse, ix.multi_hot, ix.weight)
    for t in range(per_task.shape[0]):
        r = per_task[t].clone().requires_grad_(True)
        (want,) = torch.autograd.grad((gather(r, ix.task(t)) ** 2).sum(), r)
        torch.testing.assert_close(got[t], want)
