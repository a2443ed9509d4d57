"""Fixtures shared by the unit tests of the fast meta step."""

from __future__ import annotations

import pytest

from gmeta.meta.fast import step


@pytest.fixture(params=["low_rank", "materialized"])
def layer_form(request, monkeypatch) -> str:
    """Force every adapted layer of the fast path into one form (the cost model would pick per
    layer), so that both the low-rank factors and the materialized per-task weights are tested."""
    monkeypatch.setattr(step, "materialize_layer", lambda layer, rows: request.param == "materialized")
    return request.param
