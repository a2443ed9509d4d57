"""train.py with cluster=ddp_cpu: 2 gloo processes under HybridParallelStrategy, end to end.

The run's checkpoint (written by 2 ranks, full tables) is then evaluated by eval.py on ONE process:
the metrics must be the ones the 2-process test loop reported, counted once per task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from entry_points import run_entry_point as run_script

from gmeta.data.schema import STATES
from gmeta.data.shards import read_manifest

EPOCHS = 2
# task-key dropout is drawn from a hash of (seed, step, task id): the same on 1 or 2 processes
OOV = "model.task_key_oov_rate=0.5"


def records(path: Path) -> dict[tuple[str, bool], dict]:
    return {(r["state"], r["adapted"]): r for r in json.loads(path.read_text())}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "run"
    proc = run_script(
        "train.py",
        "+experiment=synthetic_maml",
        OOV,
        "cluster=ddp_cpu",
        "trainer.strategy.collective_timeout_s=90",  # a stuck rendezvous or collective fails fast
        f"trainer.max_epochs={EPOCHS}",
        f"hydra.run.dir={run_dir}",
        tmp=tmp,
    )
    return {"tmp": tmp, "run_dir": run_dir, "out": proc.stdout + proc.stderr}


@pytest.mark.slow  # ~30 s: a 2-process train.py; tests/distributed checks 2 ranks == 1 (fast)
def test_two_processes_train_and_count_every_test_task_once(ddp_run: dict) -> None:
    assert "Starting with 2 processes" in ddp_run["out"]
    assert (ddp_run["run_dir"] / "train_ddp_process_1.log").is_file()  # the second rank really ran
    manifest = read_manifest(ddp_run["tmp"] / "data" / "synthetic" / "shards")
    counts = manifest.data["counts"]["test"]
    recs = records(ddp_run["run_dir"] / "cold_start_metrics.json")
    assert set(recs) == {(s, a) for s in STATES for a in (False, True)}
    for (state, _), r in recs.items():
        assert r["tasks"] == counts[state]["tasks"] and r["samples"] == counts[state]["query"], state
        assert math.isfinite(r["auc"]) and math.isfinite(r["logloss"])
    ckpt = torch.load(
        ddp_run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    # rank_split=batches: one meta-step per 1-process meta-batch of 16 tasks (8 per rank)
    assert ckpt["global_step"] == EPOCHS * math.ceil(manifest.num_tasks("train") / 16)
    table = ckpt["state_dict"]["embedding.weight"]
    assert table.shape[0] == sum(
        f["vocab_size"] for f in manifest.schema.to_dict()["fields"] if f["kind"] != "dense"
    )


@pytest.mark.slow  # ~13 s more on the 2-process run above
def test_one_process_evaluates_the_two_rank_checkpoint_to_the_same_metrics(ddp_run: dict) -> None:
    run_dir = ddp_run["run_dir"]
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    eval_dir = ddp_run["tmp"] / "eval"
    run_script(
        "eval.py",
        "data=synthetic",
        f"ckpt_path={best}",
        "report=false",
        f"hydra.run.dir={eval_dir}",
        tmp=ddp_run["tmp"],
    )
    distributed, single = (
        records(run_dir / "cold_start_metrics.json"),
        records(eval_dir / "cold_start_metrics.json"),
    )
    assert distributed.keys() == single.keys()
    for key, r in distributed.items():
        for metric in ("auc", "logloss", "gauc"):
            assert single[key][metric] == pytest.approx(r[metric], abs=2e-6, nan_ok=True), (key, metric)
        assert single[key]["tasks"] == r["tasks"]


@pytest.mark.slow  # ~14 s: a 1-process train.py; tests/distributed checks 2 ranks == 1 (fast, float64)
def test_two_processes_reach_the_one_process_metrics(ddp_run: dict) -> None:
    """Same seed, same meta-batches (rank_split=batches): the runs differ only by float summation order."""
    tmp = ddp_run["tmp"]
    run_dir = tmp / "single"
    run_script(
        "train.py",
        "+experiment=synthetic_maml",
        OOV,
        f"trainer.max_epochs={EPOCHS}",
        f"hydra.run.dir={run_dir}",
        tmp=tmp,
    )
    single, distributed = (
        records(run_dir / "cold_start_metrics.json"),
        records(ddp_run["run_dir"] / "cold_start_metrics.json"),
    )
    assert single.keys() == distributed.keys()
    for key, r in single.items():  # measured: AUC identical, logloss within 6e-8
        assert distributed[key]["auc"] == pytest.approx(r["auc"], abs=1e-4), key
        assert distributed[key]["logloss"] == pytest.approx(r["logloss"], abs=1e-4), key
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        for d in (run_dir, ddp_run["run_dir"])
    )
    for name, value in a.items():  # every dense weight and embedding row (measured: within 2e-7)
        if value.is_floating_point():
            torch.testing.assert_close(b[name], value, rtol=0, atol=1e-5, msg=name)
