"""Real SLURM jobs through the Hydra submitit launcher (``cluster=slurm_cpu``): submit, pre-empt,
requeue, resume, cancel.

Needs a SLURM controller: ``make test-slurm`` starts a one-node cluster on this machine
(``scripts/slurm/local_cluster.sh``), runs these tests and stops it. Without a controller they are
skipped, or fail when ``GMETA_SLURM_REQUIRED=1`` (as ``make test-slurm`` sets).

Every run is a tiny synthetic MAML run (one epoch of 18 meta-steps on 2 ranks). The references:
the same jobs under ``cluster=ddp_cpu`` (2 gloo processes started by Lightning, same batches), and
for a pre-empted job, the same job run without interruption.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gmeta.parallel.launch import LAUNCH_ENV
from gmeta.parallel.slurm_controller import controller_problem

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from entry_points import run_entry_point  # noqa: E402

pytestmark = pytest.mark.slurm

#: one epoch: 18 meta-steps of 16 tasks (8 per rank), then validation and the test split
TINY = ("+experiment=synthetic_maml", "trainer.max_epochs=1", "trainer.strategy.collective_timeout_s=90")
#: the longest a test waits for SLURM jobs to finish (they take about a minute each here)
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module", autouse=True)
def slurm_controller() -> None:
    problem = controller_problem()
    if problem:
        message = f"{problem}; start one with scripts/slurm/local_cluster.sh start, or run make test-slurm"
        if os.environ.get("GMETA_SLURM_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)


def start_train(*overrides: str, tmp: Path, log: Path) -> subprocess.Popen:
    """Start ``train.py -m`` (the submitting process) in the background; data and logs under ``tmp``.

    The jobs inherit this environment (sbatch's default ``--export=ALL``): SLURM_CONF, and
    ``tests/slurm`` on PYTHONPATH for the ``preempt_trigger`` callback.
    """
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *overrides,
        f"paths.data_dir={tmp}/data",
        f"paths.log_dir={tmp}/logs",
        "callbacks.progress_bar=null",
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    pythonpath = [str(ROOT / "tests" / "slurm"), *filter(None, [env.get("PYTHONPATH")])]
    env.update(PROJECT_ROOT=str(ROOT), PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(pythonpath))
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"train.py -m still running after {timeout_s} s:\n{log.read_text()[-4000:]}"
        ) from None


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job_ids(sweep: Path) -> list[str]:
    """SLURM job ids of a sweep, from submitit's folders (``<job>`` or ``<array job>_<task>``)."""
    folder = sweep / ".submitit"
    if not folder.is_dir():
        return []
    # a job's folder holds its pickled submission (an array's own folder only the sbatch script)
    return sorted(p.name for p in folder.iterdir() if (p / f"{p.name}_submitted.pkl").is_file())


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (finished jobs stay visible for MinJobAge)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def ended_job_info(job_id: str) -> dict[str, str]:
    """``job_info`` once the job has ended: its result file comes before SLURM has finished it."""
    ended = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    return wait_for(
        lambda: (i := job_info(job_id)).get("JobState") in ended and i, 60, f"job {job_id} to end"
    )


def records(job_dir: Path) -> list[dict]:
    return json.loads((job_dir / "cold_start_metrics.json").read_text())


def job_log(sweep: Path, job_id: str) -> str:
    """Every rank's stdout and stderr of every run (submitit appends a requeued run's output)."""
    return "\n".join(p.read_text() for p in sorted((sweep / ".submitit" / job_id).glob("*_log.*")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's runs: they share the synthetic shards in ``data/``."""
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def sweeps(workdir: Path) -> dict:
    """``meta=maml,fomaml`` under ``cluster=ddp_cpu`` (the reference; builds the shards), then as two
    SLURM jobs under ``cluster=slurm_cpu``."""
    tmp = workdir
    reference = tmp / "ddp_cpu"
    run_entry_point(
        "train.py",
        "-m",
        *TINY,
        "cluster=ddp_cpu",
        "meta=maml,fomaml",
        f"hydra.sweep.dir={reference}",
        tmp=tmp,
    )
    sweep, log = tmp / "slurm_cpu", tmp / "slurm_cpu.log"
    proc = start_train(
        *TINY, "cluster=slurm_cpu", "meta=maml,fomaml", f"hydra.sweep.dir={sweep}", tmp=tmp, log=log
    )
    code = finish(proc, log)
    assert code == 0, log.read_text()[-4000:]
    return {"tmp": tmp, "reference": reference, "sweep": sweep, "log": log.read_text()}


def test_sweep_submits_two_jobs_of_two_ranks_with_the_ddp_cpu_metrics(sweeps: dict) -> None:
    sweep = sweeps["sweep"]
    ids = job_ids(sweep)
    assert len(ids) == 2, ids  # one SLURM job per sweep job (an array of two)
    for job_id in ids:
        info = ended_job_info(job_id)
        assert (info["JobState"], info["ExitCode"], info["NumTasks"]) == ("COMPLETED", "0:0", "2"), info
        log = job_log(sweep, job_id)
        assert "global_rank=0(2)" in log and "global_rank=1(2)" in log  # two srun tasks = two ranks
        assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    with open(sweep / "sweep_summary.csv") as f:  # written by the submitting process
        assert {(r["job"], r["method"]) for r in csv.DictReader(f)} == {("0", "maml"), ("1", "fomaml")}
    for job, method in (("0", "maml"), ("1", "fomaml")):
        mine, reference = records(sweep / job), records(sweeps["reference"] / job)
        assert {r["method"] for r in mine} == {method}
        assert mine == reference  # same ranks, same batches, same summation order: bit for bit


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_metrics(sweeps: dict) -> None:
    """SLURM sends USR1 after meta-step 5 (``scancel --signal=USR1``, as before a time limit): the job
    saves ``hpc_ckpt_1.ckpt`` at step 6, requeues itself and stops; SLURM restarts it; it resumes from
    that checkpoint and finishes with the metrics of the same job never interrupted (sweep job 0)."""
    tmp = sweeps["tmp"]
    sweep, log = tmp / "preempted", tmp / "preempted.log"
    proc = start_train(
        *TINY,
        "cluster=slurm_cpu",
        "meta=maml",
        "+callbacks.trigger._target_=preempt_trigger.ScancelAtStep",
        "+callbacks.trigger.step=5",
        "+callbacks.trigger.signal=USR1",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp,
        log=log,
    )
    wait_for(lambda: job_ids(sweep) or proc.poll() is not None, 120, "the job's submission")
    assert job_ids(sweep), log.read_text()[-4000:]  # else train.py -m ended before submitting
    (job_id,) = job_ids(sweep)
    # SLURM holds a requeued job for about 2 minutes before it is eligible again: release it at once
    requeued = wait_for(
        lambda: (info := job_info(job_id)).get("Restarts") == "1" and info.get("JobState") == "PENDING",
        JOB_TIMEOUT_S,
        f"job {job_id} to be requeued",
    )
    assert requeued
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    assert finish(proc, log) == 0, log.read_text()[-4000:]

    info = ended_job_info(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
    job_dir = sweep / "0"
    text = job_log(sweep, job_id)
    assert "received SIGUSR1: stopping at the next meta-step boundary" in text
    assert f"saved {job_dir / 'hpc_ckpt_1.ckpt'} at global step 6" in text
    assert f"requeued SLURM job {job_id}" in text
    assert f"Restoring states from the checkpoint path at {job_dir / 'hpc_ckpt_1.ckpt'}" in text
    assert text.count("global_rank=0(2)") == 2 and text.count("global_rank=1(2)") == 2  # two runs
    saved = torch.load(job_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6
    final = torch.load(job_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 18  # the whole epoch, once
    # exact resume: the interrupted job ends where the uninterrupted one did
    assert records(job_dir) == records(sweeps["sweep"] / "0")


def rank_processes(sweep: Path) -> list[str]:
    """Processes still running a rank of a job of ``sweep`` (submitit's ``_submit <sweep>/.submitit/...``)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=30).stdout
    return [line for line in ps.splitlines() if "submitit.core._submit" in line and str(sweep) in line]


def test_scancel_ends_every_rank_and_leaves_a_usable_checkpoint(sweeps: dict) -> None:
    """``scancel`` after meta-step 5: SIGTERM to every task; the ranks save ``last.ckpt`` at the next
    step boundary and exit 143, SLURM kills what is left after KillWait. The job ends CANCELLED (not
    a success), no rank process survives, the submitting ``train.py -m`` ends with an error instead of
    waiting for a result that never comes, and the checkpoint loads."""
    tmp = sweeps["tmp"]
    sweep, log = tmp / "cancelled", tmp / "cancelled.log"
    proc = start_train(
        *TINY,
        "cluster=slurm_cpu",
        "meta=maml",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "+callbacks.trigger._target_=preempt_trigger.ScancelAtStep",
        "+callbacks.trigger.step=5",
        f"hydra.sweep.dir={sweep}",
        tmp=tmp,
        log=log,
    )
    code = finish(proc, log)
    assert code != 0, log.read_text()[-4000:]
    assert "UncompletedJobError" in log.read_text()  # submitit: no result, job finished
    (job_id,) = job_ids(sweep)
    info = ended_job_info(job_id)
    assert info["JobState"] == "CANCELLED" and info["ExitCode"] != "0:0", info
    assert wait_for(lambda: not rank_processes(sweep), 60, "the ranks to exit"), rank_processes(sweep)
    assert "received SIGTERM: stopping at the next meta-step boundary" in job_log(sweep, job_id)

    last = sweep / "0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    # saved at the signal's step boundary (6), or the periodic save before it (4) if SIGKILL came first
    assert ckpt["global_step"] in (4, 6)
    from gmeta.meta.module import MetaDLRMModule

    model = MetaDLRMModule.load_from_checkpoint(last, map_location="cpu")
    torch.testing.assert_close(
        model.state_dict()["dlrm.top.0.weight"], ckpt["state_dict"]["dlrm.top.0.weight"]
    )
