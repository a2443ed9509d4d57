"""scripts/bench_build.py on a tiny click log: the JSON lines are present, well formed and consistent.

No timing is compared against anything: only presence, type and sign of the measured numbers, and
the built task counts against the bounds the generator's users put on them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROWS = 20_000


def positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def engines_in_config() -> list[str]:
    """pandas always; duckdb too once conf/data/tabular.yaml has data.engine."""
    conf = yaml.safe_load((ROOT / "conf" / "data" / "tabular.yaml").read_text())
    return ["duckdb", "pandas"] if "engine" in conf else ["pandas"]


def run(tmp: Path, *args: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_build.py"), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # ~13 s: four subprocess builds
def test_bench_build_tiny(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "b.jsonl"
    engines = engines_in_config()
    args = ["--rows", "20k", "--engines", ",".join(engines), "--work-dir", str(work), "--timeout-s", "150"]
    lines = run(tmp_path, *args, "--out", str(out))
    (data,) = [r for r in lines if r.get("variant") == "data"]
    (summary,) = [r for r in lines if r.get("variant") == "summary"]
    builds = [r for r in lines if "variant" not in r]
    assert [json.loads(x) for x in out.read_text().splitlines()] == [*builds, summary]

    # the generated log: exact rows, the documented schema, ~33 rows per user, a realistic CTR
    path = Path(data["path"])
    assert data["rows"] == ROWS and not data["cached"] and path.parent == work
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == ROWS and data["parquet_bytes"] == path.stat().st_size
    schema = yaml.safe_load((work / "clicks_schema.yaml").read_text())
    assert schema["task_key"] == "user_id" and schema["label"] == "click" and schema["time"] == "ts"
    assert schema["sparse"][:2] == ["user_id", "item_id"] and len(schema["sparse"]) == 7
    assert len(schema["dense"]) == 3
    assert set(meta.schema.names) == {*schema["sparse"], *schema["dense"], "click", "ts"}
    assert data["users"] == round(ROWS / 33) and 0 < data["users_ge_min_interactions"] < data["users"]
    assert 0.1 <= data["ctr"] <= 0.3

    assert sorted(r["engine"] for r in builds) == sorted(engines)
    for r in builds:
        assert r["status"] == "ok" and r["rows"] == ROWS and r["returncode"] == 0
        assert positive(r["seconds"]) and math.isclose(r["rows_per_s"], ROWS / r["seconds"], rel_tol=1e-3)
        assert positive(r["peak_rss_gib"]) and positive(r["child_maxrss_gib"]) and r["max_procs"] >= 1
        assert r["engine_override"] == (len(engines) > 1)
        # every user is a task key; each gets at most one train task (warm, >= 13 rows), and at most
        # 4 evaluation tasks (3 cold states + a held-out warm one)
        assert r["interactions"] == ROWS and r["task_keys"] == data["users"]
        split = r["tasks_by_split"]
        assert set(split) == {"train", "val", "test"} and r["tasks"] == sum(split.values())
        assert 0 < split["train"] <= data["users_ge_min_interactions"]
        assert 0 < split["val"] + split["test"] <= 4 * data["users"]
        assert sum(r["tasks_by_state"].values()) == r["tasks"] and r["tasks_by_state"]["user_cold"] > 0
        assert abs(r["positive_rate"] - data["ctr"]) < 1e-6
        assert not (work / "shards" / f"20k_{r['engine']}").exists()  # cleaned up without --keep
    assert {b["engine"]: b["tasks"] for b in summary["builds"]} == {r["engine"]: r["tasks"] for r in builds}

    # a second run reuses the cached log and skips pandas above --max-rows-pandas
    again = run(
        tmp_path, "--rows", "20k", "--engines", "pandas", "--work-dir", str(work), "--max-rows-pandas", "10k"
    )
    assert [r["cached"] for r in again if r.get("variant") == "data"] == [True]
    assert [r["status"] for r in again if "variant" not in r] == ["skipped"]
