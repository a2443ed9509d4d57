"""TensorMemoryTracker against allocations whose sizes are known."""

from __future__ import annotations

import torch

from gmeta.tensor_memory import TensorMemoryTracker

MB = 2**20


def test_peak_counts_what_is_alive_at_once_and_frees():
    before = torch.ones(1024, 1024)  # allocated outside: never counted
    with TensorMemoryTracker() as t:
        a = torch.zeros(256, 1024)  # 1 MB
        b = torch.zeros(512, 1024)  # 2 MB: 3 MB alive
        del a
        c = torch.zeros(256, 1024)  # 1 MB: 3 MB alive again
        del b, c
        d = before * 2  # 4 MB: the peak
        del d
    assert t.peak_bytes == 4 * MB
    assert t.live_bytes == 0


def test_views_and_in_place_ops_allocate_nothing():
    x = torch.zeros(1024, 1024)
    with TensorMemoryTracker() as t:
        y = x.view(-1)[:10]
        x.add_(1.0)
        x.t_()
        del y
    assert t.peak_bytes == 0


def test_autograd_saved_tensors_and_the_backward_are_counted():
    w = torch.randn(1024, 1024, requires_grad=True)  # 4 MB, outside
    with TensorMemoryTracker() as t:
        h = torch.relu(torch.ones(256, 1024) @ w)  # input 1 MB, product 1 MB, relu 1 MB
        h.sum().backward()
        del h
    # the graph keeps the input and the relu output; the backward adds w's 4 MB gradient
    assert t.peak_bytes >= 4 * MB + 2 * MB
    assert w.grad is not None and t.live_bytes == 4 * MB  # only the gradient outlives the step
