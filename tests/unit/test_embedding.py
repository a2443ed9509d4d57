"""EmbeddingCollection (the table held whole): one lookup per meta-batch, functional gather, row-wise
optimizers."""

from __future__ import annotations

import pytest
import torch
from tiny_tasks import random_batch

from gmeta.data.schema import FieldSpec, Schema
from gmeta.model.embedding import EmbeddingCollection, LocalIndex
from gmeta.model.gather import gather, set_index
from gmeta.model.row_optim import RowWiseAdagrad, RowWiseAdam, RowWiseSGD

VOCAB = (7, 5, 9, 6)  # two sparse then two multi-hot fields
NUM_SPARSE = 2


def make_collection(dim: int = 4, **kwargs) -> EmbeddingCollection:
    torch.manual_seed(0)
    return EmbeddingCollection(VOCAB, NUM_SPARSE, dim, init_std=0.5, **kwargs).double()


def test_one_lookup_covers_support_and_query_ids():
    emb = make_collection()
    batch = random_batch(1, [4, 2, 5], [3, 1, 2])
    lk = emb.lookup(batch)
    offsets = [0, 7, 12, 21]
    expected = set()
    for s in (batch.support, batch.query):
        for f in range(NUM_SPARSE):
            expected |= {int(i) + offsets[f] for i in s.sparse[..., f].flatten()}
        for j in range(len(VOCAB) - NUM_SPARSE):
            ids = s.multi_hot[..., j, :].flatten()
            expected |= {int(i) + offsets[NUM_SPARSE + j] for i in ids if i >= 0}
    assert lk.unique_ids.tolist() == sorted(expected)
    assert lk.rows.is_leaf and lk.rows.requires_grad
    torch.testing.assert_close(lk.rows, emb.weight[lk.unique_ids], rtol=0, atol=0)


def embed(rows: torch.Tensor, idx: LocalIndex) -> torch.Tensor:
    return gather(rows, set_index(idx, rows.dtype))


def test_gather_equals_direct_table_indexing_and_hand_mean_pooling():
    emb = make_collection()
    batch = random_batch(2, [4, 2, 5], [3, 1, 2], max_len=4)
    lk = emb.lookup(batch)
    tables = torch.split(emb.weight, VOCAB)  # per-field views of the concatenated weight
    for idx, s in ((lk.support, batch.support), (lk.query, batch.query)):
        out = embed(lk.rows, idx)
        t, n = s.label.shape
        assert out.shape == (t, n, len(VOCAB), emb.dim)
        for f in range(NUM_SPARSE):
            torch.testing.assert_close(out[..., f, :], tables[f][s.sparse[..., f]], rtol=0, atol=0)
        for ti in range(t):
            for ni in range(n):
                for j in range(len(VOCAB) - NUM_SPARSE):
                    ids = [int(i) for i in s.multi_hot[ti, ni, j] if i >= 0]
                    table = tables[NUM_SPARSE + j]
                    want = sum((table[i] for i in ids), torch.zeros(emb.dim, dtype=torch.float64))
                    want = want / max(len(ids), 1)  # an all-padding list pools to zeros
                    torch.testing.assert_close(out[ti, ni, NUM_SPARSE + j], want)
    assert (batch.support.multi_hot == -1).all(-1).any(), "fixture should contain an all-padding list"


def test_row_grads_are_per_unique_id_sums_of_the_dense_table_grad():
    emb = make_collection()
    batch = random_batch(3, [4, 2, 5], [3, 1, 2])
    lk = emb.lookup(batch)
    target = torch.randn(3, 5, len(VOCAB), emb.dim, dtype=torch.float64)

    def loss_of(rows):
        e = embed(rows, lk.support)
        q = embed(rows, lk.query)
        return (e * target[:, : e.shape[1]]).sum() + q.pow(2).sum()

    loss_of(lk.rows).backward()
    dense_weight = emb.weight.clone().requires_grad_(True)
    loss_of(dense_weight[lk.unique_ids]).backward()
    torch.testing.assert_close(lk.rows.grad, dense_weight.grad[lk.unique_ids])
    untouched = torch.ones(emb.num_total_rows, dtype=torch.bool)
    untouched[lk.unique_ids] = False
    assert (dense_weight.grad[untouched] == 0).all()


def _steps(seed: int, num_rows: int, dim: int):
    """Three sparse steps on overlapping row subsets: (ids, grads) with unique ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for ids in ([1, 4, 5], [4, 6, 9], [1, 9]):
        out.append((torch.tensor(ids), torch.randn(len(ids), dim, generator=gen, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("dim", [1, 4])
def test_rowwise_adagrad_matches_dense_reference(dim):
    num_rows, lr, eps = 12, 0.3, 1e-8
    opt = RowWiseAdagrad(num_rows, dim, lr=lr, eps=eps, initial_accumulator_value=0.1).double()
    w = torch.randn(num_rows, dim, dtype=torch.float64)
    ref_w, ref_acc = w.clone(), torch.full((num_rows,), 0.1, dtype=torch.float64)
    torch_w = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.Adagrad([torch_w], lr=lr, eps=eps, initial_accumulator_value=0.1)
    for ids, g in _steps(0, num_rows, dim):
        opt.step(w, ids, g)
        dense_g = torch.zeros(num_rows, dim, dtype=torch.float64).index_copy(0, ids, g)
        # Dense row-wise Adagrad: an untouched row has g = 0, so neither its state nor it moves.
        ref_acc += dense_g.pow(2).mean(1)
        ref_w -= lr * dense_g / (ref_acc.sqrt()[:, None] + eps)
        torch_w.grad = dense_g
        torch_opt.step()
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(opt.sum_sq, ref_acc)
    if dim == 1:  # one element per row: row-wise Adagrad is exactly torch's Adagrad
        torch.testing.assert_close(w, torch_w.detach())


def test_rowwise_sgd_matches_torch_sgd_and_leaves_other_rows():
    num_rows, dim, lr = 12, 3, 0.2
    opt = RowWiseSGD(num_rows, dim, lr=lr)
    w = torch.randn(num_rows, dim, dtype=torch.float64)
    w0 = w.clone()
    torch_w = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.SGD([torch_w], lr=lr)
    touched = set()
    for ids, g in _steps(1, num_rows, dim):
        opt.step(w, ids, g)
        torch_w.grad = torch.zeros(num_rows, dim, dtype=torch.float64).index_copy(0, ids, g)
        torch_opt.step()
        touched |= set(ids.tolist())
    torch.testing.assert_close(w, torch_w.detach())
    others = [r for r in range(num_rows) if r not in touched]
    assert torch.equal(w[others], w0[others])


def test_rowwise_adam_equals_fresh_dense_adam_per_row():
    num_rows, dim, lr = 12, 3, 0.1
    opt = RowWiseAdam(num_rows, dim, lr=lr).double()
    w = torch.randn(num_rows, dim, dtype=torch.float64)
    w0 = w.clone()
    steps = _steps(2, num_rows, dim)
    for ids, g in steps:
        opt.step(w, ids, g)
    # Each row must equal dense Adam run over only the steps that touched it.
    for r in range(num_rows):
        grads = [g[(ids == r).nonzero()[0, 0]] for ids, g in steps if (ids == r).any()]
        p = torch.nn.Parameter(w0[r].clone())
        ref = torch.optim.Adam([p], lr=lr)
        for g in grads:
            p.grad = g.clone()
            ref.step()
        torch.testing.assert_close(w[r], p.detach())
        assert int(opt.steps[r]) == len(grads)


def test_apply_row_gradients_updates_exactly_those_rows_and_state_is_checkpointed():
    emb = make_collection(optimizer="adagrad", optimizer_kwargs={"lr": 0.5})
    assert list(emb.parameters()) == []  # the table is not for the dense optimizer
    batch = random_batch(4, [3, 2], [2, 2])
    lk = emb.lookup(batch)
    w0 = emb.weight.clone()
    grads = torch.randn_like(lk.rows)
    emb.apply_row_gradients(lk.unique_ids, grads)
    acc = grads.pow(2).mean(1)
    torch.testing.assert_close(
        emb.weight[lk.unique_ids], w0[lk.unique_ids] - 0.5 * grads / (acc.sqrt() + 1e-8)[:, None]
    )
    untouched = torch.ones(emb.num_total_rows, dtype=torch.bool)
    untouched[lk.unique_ids] = False
    assert torch.equal(emb.weight[untouched], w0[untouched])

    state = emb.state_dict()
    assert set(state) == {"weight", "optimizer.sum_sq"}
    restored = EmbeddingCollection(VOCAB, NUM_SPARSE, 4).double()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.optimizer.sum_sq, emb.optimizer.sum_sq, rtol=0, atol=0)
    torch.testing.assert_close(restored.weight, emb.weight, rtol=0, atol=0)


def test_oov_rows_are_initialised_like_other_rows_and_bad_ids_name_the_field():
    schema = Schema(
        task_key="user",
        label="rating",
        fields=(
            FieldSpec("user", "sparse", vocab_size=7),
            FieldSpec("item", "sparse", vocab_size=5),
            FieldSpec("genres", "multi_hot", vocab_size=9, max_len=3),
            FieldSpec("tags", "multi_hot", vocab_size=6, max_len=3),
            FieldSpec("age", "dense"),
        ),
    )
    emb = EmbeddingCollection.from_schema(schema, dim=8, init_std=0.1)
    assert emb.offsets.tolist() == [0, 7, 12, 21] and emb.weight.shape == (27, 8)
    assert (emb.weight[emb.offsets] != 0).all()  # the OOV rows are learned, not zero
    batch = random_batch(5, [3, 2], [2, 2])
    batch.query.multi_hot[1, 0, 1, 0] = 6  # "tags" has vocab 6: ids 0..5
    with pytest.raises(ValueError, match=r"query set, task 1, sample 0, field 'tags'"):
        emb.lookup(batch)
