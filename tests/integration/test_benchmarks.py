"""Smoke test of the benchmark scripts: they run with tiny sizes and print well-formed JSON lines.

No timing is compared against anything: only the presence, type and sign of the reported numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_json(script: str, *args: str, tmp: Path) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~13-20 s (six variants); unit tests check the learner it times
def test_bench_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    args = ["--config", "criteo", "--rows", "1000", "--tasks", "8", "--steps", "2", "--warmup", "1"]
    lines = run_json("bench_train.py", *args, "--json-out", str(out), tmp=tmp_path)
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    rows = [r for r in lines if r["variant"] != "ratios"]
    assert {r["variant"] for r in rows} == {
        "plain",
        "maml",
        "fomaml",
        "maml_loop",
        "maml_vmap",
        "fomaml_vmap",
    }
    for r in rows:
        assert r["bench"] == "criteo" and r["device"] == "cpu"
        assert positive(r["samples_per_s"]) and positive(r["step_ms"])
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
        assert positive(r["gflop_per_step"]) and positive(r["peak_tensor_mb"])
        assert r["malloc"] in ("heap", "default") and r["precision"] == "fp32"
    by = {r["variant"]: r for r in rows}
    # the same objective, the same FLOPs: the loop and vmap references count what the fast path avoids
    assert by["maml_loop"]["gflop_per_step"] == by["maml_vmap"]["gflop_per_step"]
    assert by["maml"]["gflop_per_step"] < by["maml_vmap"]["gflop_per_step"]
    (ratios,) = [r for r in lines if r["variant"] == "ratios"]
    keys = ("maml/plain", "fomaml/plain", "maml/maml_loop", "maml/maml_vmap", "fomaml/fomaml_vmap")
    keys += ("maml/plain paired", "maml/plain flop bound", "maml/plain peak tensor memory")
    for key in keys:
        assert positive(ratios[key])
    assert ratios["maml/plain flop bound"] == by["plain"]["gflop_per_step"] / by["maml"]["gflop_per_step"]


@pytest.mark.slow  # ~4 s
def test_bench_train_bf16_autocast_smoke(tmp_path: Path) -> None:
    args = ["--config", "criteo", "--rows", "1000", "--tasks", "8", "--steps", "1", "--warmup", "1"]
    lines = run_json("bench_train.py", *args, "--precision", "bf16", "--variants", "plain,maml", tmp=tmp_path)
    rows = [r for r in lines if r["variant"] != "ratios"]
    assert {r["variant"] for r in rows} == {"plain", "maml"}
    assert all(r["precision"] == "bf16" and positive(r["samples_per_s"]) for r in rows)


@pytest.mark.slow  # ~3 s
def test_bench_train_op_times_smoke(tmp_path: Path) -> None:
    args = ["--config", "criteo", "--rows", "1000", "--tasks", "8", "--profile-steps", "1"]
    lines = run_json("bench_train.py", *args, "--op-times", "--variants", "plain,maml", tmp=tmp_path)
    by_variant: dict[str, float] = {}
    for r in lines:
        assert r["variant"] == "op_times" and r["calls_per_step"] >= 0
        by_variant[r["of"]] = by_variant.get(r["of"], 0.0) + r["ms_per_step"]
    assert set(by_variant) == {"plain", "maml"} and all(positive(x) for x in by_variant.values())


@pytest.mark.slow  # ~12 s (a loader worker process); make test's 5-minute budget
def test_bench_io_smoke(tmp_path: Path) -> None:
    args = ["--synthetic", "--synthetic-users", "150", "--batch-tasks", "8", "--max-batches", "3"]
    lines = run_json("bench_io.py", *args, "--consume-steps", "2", "--workers", "0,1", tmp=tmp_path)
    rows = {r["variant"]: r for r in lines}
    assert {"loader_w0", "loader_w1", "naive", "consumed", "ratios"} <= set(rows)
    for name in ("loader_w0", "loader_w1", "naive", "consumed"):
        r = rows[name]
        assert r["bench"] == "io"
        assert positive(r["tasks_per_s"]) and positive(r["samples_per_s"])
    for key in ("loader_w0/consumed", "loader_w0/naive", "loader_w1/naive"):
        assert positive(rows["ratios"][key])
