"""cluster=slurm: the composed launcher/trainer settings, the sbatch script they produce, the
step-boundary requeue callback, and a real 2-job multirun through hydra/launcher=submitit_local."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from entry_points import run_entry_point
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gmeta.parallel import HybridParallelStrategy, shutdown_process_group
from gmeta.parallel.launch import LAUNCH_ENV, isolated_launch_env
from gmeta.parallel.requeue import SlurmRequeue, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "slurm"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from sbatch_preview import sbatch_text  # noqa: E402
from worker import BARE_TRAINER, batch_loader, local_batch, make_module  # noqa: E402


def slurm_cfg(*overrides: str):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cluster = [] if any(o.startswith("cluster=") for o in overrides) else ["cluster=slurm"]
        return compose("train", overrides=[*cluster, *overrides], return_hydra_config=True)


def test_slurm_config_agrees_between_submitit_and_lightning() -> None:
    cfg = slurm_cfg("trainer.num_nodes=3", "trainer.devices=4")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # one srun task per GPU: Lightning's SLURMEnvironment maps SLURM_PROCID to the global rank
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)
    assert launcher.max_num_timeout == 0  # submitit never requeues...
    assert launcher.additional_parameters.signal == "USR1@300"  # ...its USR2 handler never fires
    (plugin,) = cfg.trainer.plugins
    env = instantiate(plugin)
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    requeue = instantiate(cfg.callbacks.slurm_requeue)
    assert isinstance(requeue, SlurmRequeue) and requeue.signum == signal.SIGUSR1  # the sbatch signal
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, HybridParallelStrategy) and strategy.process_group_backend == "nccl"


def test_sbatch_script_for_two_nodes_of_eight_gpus(tmp_path: Path) -> None:
    text = sbatch_text(["+experiment=movielens_maml", "hydra.launcher.partition=gpu"], str(tmp_path))
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --time=1440",
    ):
        assert line in text.splitlines(), line
    assert "srun --unbuffered" in text and "submitit.core._submit" in text


class SignalAtStep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM does signal_delay_s before the kill


def _trainer(root: Path, callbacks: list, max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=HybridParallelStrategy(),
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=callbacks,
        **BARE_TRAINER,
    )


@pytest.fixture
def one_process_group():
    # Lightning's launcher writes LOCAL_RANK/WORLD_SIZE/MASTER_* into os.environ: left in pytest's
    # environment, every later train.py subprocess would think it was launched externally and wait
    # for ranks that never come.
    with isolated_launch_env():
        yield
        shutdown_process_group(grace_s=0.1)  # the strategy initialised a 1-process gloo group


def test_requeue_signal_checkpoints_at_the_next_step_boundary_and_resumes(
    tmp_path: Path, one_process_group: None
) -> None:
    batches = batch_loader([local_batch(s, 0, 1) for s in range(6)])
    requeue = SlurmRequeue(requeue=False)
    trainer = _trainer(tmp_path, [SignalAtStep(), requeue], max_steps=6)
    with pytest.raises(TrainingInterrupted) as stopped:  # never a success status: 128 + SIGUSR1
        trainer.fit(make_module("maml"), train_dataloaders=batches)
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert requeue.requested and trainer.global_step == 2  # stopped right after the signalled step
    assert signal.getsignal(signal.SIGUSR1) is not requeue._handler  # handler removed after fit
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "embedding.weight" in ckpt["state_dict"]

    resumed = _trainer(tmp_path, [], max_steps=6)
    resumed.fit(make_module("maml"), train_dataloaders=batches, ckpt_path="hpc")  # what SLURM restart does
    assert resumed.global_step == 6


@pytest.mark.slow  # ~8 s; tests/slurm submits real jobs
def test_submitit_local_multirun_runs_two_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_entry_point(
        "train.py",
        "-m",
        "+experiment=synthetic_maml",
        "debug=fdr",
        "hydra/launcher=submitit_local",
        "meta=maml,none",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp_path,
    )
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    assert len(jobs) == 2  # two submitit jobs (separate processes)
    for job in ("0", "1"):
        assert (sweep / job / "cold_start_metrics.json").is_file()
    with open(sweep / "sweep_summary.csv") as f:
        assert {(r["job"], r["method"]) for r in csv.DictReader(f)} == {("0", "maml"), ("1", "none")}


@pytest.mark.slow  # ~10 s: a train.py -m process up to submission
def test_slurm_cpu_without_a_controller_fails_at_submission_saying_how_to_start_one(tmp_path: Path) -> None:
    """No hang and no traceback: a clear error before anything is submitted (whether or not the SLURM
    client commands are installed here). Real jobs: tests/slurm (make test-slurm)."""
    conf = tmp_path / "slurm.conf"  # a controller that nobody runs (nothing listens on port 9)
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
        "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=cpu Nodes=ALL Default=YES\n"
    )
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PROJECT_ROOT=str(ROOT), PYTHONWARNINGS="ignore", SLURM_CONF=str(conf))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "+experiment=synthetic_maml",
            "cluster=slurm_cpu",
            f"paths.data_dir={tmp_path}/data",
            f"paths.log_dir={tmp_path}/logs",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.py: error: cannot submit to SLURM" in proc.stderr
    assert "scripts/slurm/local_cluster.sh start" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (sweep / ".submitit").exists()  # nothing submitted


def test_slurm_cpu_is_cluster_slurm_with_two_cpu_ranks_on_one_node(tmp_path: Path) -> None:
    cfg = slurm_cfg("cluster=slurm_cpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 2, None)
    assert (launcher.partition, launcher.cpus_per_task, launcher.max_num_timeout) == ("cpu", 1, 0)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("cpu", 2, 1)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, HybridParallelStrategy) and strategy.process_group_backend == "gloo"
    # the batches of cluster=ddp_cpu: a job's metrics equal the same job there (tests/slurm)
    assert cfg.data.rank_split == "batches"
    assert isinstance(instantiate(cfg.callbacks.slurm_requeue), SlurmRequeue)
    check = cfg.hydra.callbacks.slurm_controller
    assert check._target_ == "gmeta.parallel.slurm_controller.RequireSlurmController"
    assert "scripts/slurm/local_cluster.sh start" in check.hint
    lines = sbatch_text(["cluster=slurm_cpu", "+experiment=synthetic_maml"], str(tmp_path)).splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --partition=cpu", "#SBATCH --signal=USR1@120"):
        assert line in lines, line
    assert not any("gpus" in line for line in lines)


def test_squeue_watcher_reads_job_states_as_submitit_reads_sacct() -> None:
    """Without accounting (the local cluster) submitit follows jobs with squeue: a cancelled job must
    count as finished (else train.py -m waits forever), a pending or requeued one as running."""
    from gmeta.parallel.slurm_controller import SqueueInfoWatcher

    watcher = SqueueInfoWatcher(delay_s=30)
    for job in ("12_0", "12_1", "13", "14_0", "14_1"):
        watcher.register_job(job)
    assert watcher._make_command()[-2:] == ["-j", "12,13,14"]
    # squeue --noheader --array --states=all -o "%i|%T|%N"
    watcher._info_dict.update(
        watcher.read_info(b"12_0|COMPLETED|vm\n12_1|RUNNING|vm\n13|CANCELLED|vm\n14_[0-1]|PENDING|\n")
    )
    done = {job: watcher.is_done(job, mode="cache") for job in ("12_0", "12_1", "13", "14_0", "14_1")}
    assert done == {"12_0": True, "12_1": False, "13": True, "14_0": False, "14_1": False}
    assert watcher.get_state("13", mode="cache") == "CANCELLED"


def test_a_missing_slurm_conf_is_named_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """scontrol would retry reading a missing SLURM_CONF for 60 s: the check names it instead."""
    from gmeta.parallel.slurm_controller import controller_problem

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere" / "slurm.conf"))
    problem = controller_problem()
    assert problem is not None
    assert (
        "not on PATH" in problem
        or f"SLURM_CONF={tmp_path / 'nowhere' / 'slurm.conf'} does not exist" in problem
    )
