"""Hydra multirun: one output dir per job and a summary of every job's metrics in the sweep dir."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from entry_points import run_entry_point

from gmeta.data.schema import STATES


def test_multirun_writes_one_dir_per_job_and_a_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_entry_point(
        "train.py",
        "-m",
        "+experiment=synthetic_maml",
        "debug=fdr",
        "meta=maml,none",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp_path,
    )

    assert (sweep / "0" / "cold_start_metrics.json").is_file()
    assert (sweep / "1" / "cold_start_metrics.json").is_file()
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["job"], r["method"]) for r in rows} == {("0", "maml"), ("1", "none")}
    assert {r["state"] for r in rows} == set(STATES)
    assert len(rows) == 2 * len(STATES) * 2  # jobs x states x (adapted, not adapted)
    assert all("meta=" in r["overrides"] for r in rows)


@pytest.mark.slow  # ~24 s; tests/slurm runs 2-rank jobs in a multirun for real
def test_multirun_with_two_process_jobs_runs_each_job_once_in_its_own_dir(tmp_path: Path) -> None:
    """Lightning+Hydra pitfall: the script launcher re-ran ``-m`` (a sweep per child) and leaked
    LOCAL_RANK into the next job, which then waited forever for children (``gmeta.parallel.launch``)."""
    sweep = tmp_path / "sweep"
    run_entry_point(
        "train.py",
        "-m",
        "+experiment=synthetic_maml",
        "cluster=ddp_cpu",
        "trainer.strategy.collective_timeout_s=90",  # a stuck rendezvous or collective fails fast
        "trainer.max_epochs=1",
        "meta=maml,fomaml",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp_path,
    )
    for job, method in (("0", "maml"), ("1", "fomaml")):
        job_dir = sweep / job
        assert (job_dir / "cold_start_metrics.json").is_file()
        assert (job_dir / "train_ddp_process_1.log").is_file()  # its second rank wrote here
        assert (job_dir / ".hydra" / "overrides.yaml").read_text().count("meta=") == 1
        assert f"meta={method}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["job"], r["method"]) for r in rows} == {("0", "maml"), ("1", "fomaml")}
    assert len(rows) == 2 * len(STATES) * 2


@pytest.mark.slow  # ~7 s
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_entry_point(
        "train.py",
        "-m",
        "hparams_search=movielens_optuna",
        "+experiment=synthetic_maml",
        "debug=fdr",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp_path,
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= results["best_value"] <= 1.0  # val/auc_adapted, returned by train.py
    assert set(results["best_params"]) == {
        "meta.inner_lr",
        "meta.inner_steps",
        "meta.support_loss_weight",
        "model.embedding_optimizer.lr",
        "model.task_key_oov_rate",
    }
    for job in ("0", "1"):  # each trial is a normal run in its own folder
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert "meta.inner_lr=" in overrides and (sweep / job / "cold_start_metrics.json").is_file()
