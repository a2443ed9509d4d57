"""Exact resume: a run killed at any point and resumed from its ``last.ckpt`` ends exactly like the
uninterrupted run (every logged loss and metric, every weight, the test metrics), bit for bit on CPU.

Faults come from ``faults.KillAt``: in-process runs raise ``Killed`` (the run is abandoned as SIGKILL
would leave it; fast), ``train.py`` subprocesses really get SIGKILL / SIGTERM (slow). Resumes run in
a NEW run folder, so best-checkpoint tracking across folders is exercised as well.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from entry_points import ROOT
from faults import Killed
from hydra import compose, initialize_config_dir

from gmeta.app import train
from gmeta.parallel.launch import LAUNCH_ENV
from gmeta.parallel.requeue import StopOnSignal, TrainingInterrupted

EPOCHS = 2
EVERY = 3  # last.ckpt every 3 meta-steps (and at every epoch end)
#: a tiny synthetic run: 14 meta-steps per epoch, seconds per run
TINY = [
    "+experiment=synthetic_maml",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.log_every_n_steps=1",
    f"callbacks.last_checkpoint.every_n_train_steps={EVERY}",
    "data.source.num_users=150",
    "data.batch_tasks=8",
    "data.eval_batch_tasks=32",
    "data.tasks_per_shard=16",
    "data.shuffle_buffer=16",
    "model.embedding_dim=8",
]
FAULT = "+callbacks.fault._target_=faults.KillAt"


def fault(hook: str, at: int, how: str, rank: int | None = None) -> list[str]:
    extra = [] if rank is None else [f"+callbacks.fault.rank={rank}"]
    return [
        FAULT,
        f"+callbacks.fault.hook={hook}",
        f"+callbacks.fault.at={at}",
        f"+callbacks.fault.how={how}",
        *extra,
    ]


def train_in_process(tmp: Path, run: str, *overrides: str) -> Path:
    """``train.py`` with ``overrides``, in this process; the run's folder is ``tmp / run``."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY,
                f"paths.data_dir={tmp}/data",
                f"paths.log_dir={tmp}/logs",
                f"paths.output_dir={tmp}/{run}",
                *overrides,
            ],
        )
    train(cfg)  # what train.py runs
    return tmp / run


def train_subprocess(
    tmp: Path, run: str, *overrides: str, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``train.py`` as a user runs it (faults importable from tests/integration); no check of the exit status."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        f"paths.data_dir={tmp}/data",
        f"paths.log_dir={tmp}/logs",
        f"hydra.run.dir={tmp}/{run}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(
        PROJECT_ROOT=str(ROOT),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "integration"), env.get("PYTHONPATH", "")]),
    )
    if not wait:
        return subprocess.Popen(
            cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


def logged(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every value the CSV logger wrote: {(metric, global step): value}."""
    out: dict[tuple[str, int], float] = {}
    for path in sorted(run_dir.glob("csv/*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key not in ("epoch", "step"):
                        out[(key, int(row["step"]))] = float(value)
    return out


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def position_of(ckpt: dict) -> dict:
    """The training stream's position in a checkpoint, without its layout."""
    return {k: v for k, v in ckpt["TaskDataModule"]["train_position"].items() if k != "layout"}


def best_tracking(ckpt: dict) -> dict:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return state


def same(a: object, b: object) -> bool:
    """Recursive equality with tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_resumed_exactly(reference: Path, resumed: Path, resumed_from: dict) -> None:
    """Everything the resumed run logged and saved is the uninterrupted run's, bit for bit."""
    want, got = logged(reference), logged(resumed)
    start = resumed_from["global_step"]
    # every training step after the checkpoint is re-run and logged again
    missing = sorted(k for k in want if k[0].startswith("train/") and k[1] >= start and k not in got)
    assert not missing, f"training steps not re-run after step {start}: {missing[:5]}"
    assert any(k[0].startswith("test/") for k in got), "the resumed run did not test"
    wrong = {k: (want.get(k), v) for k, v in got.items() if want.get(k) != v}
    assert not wrong, (
        f"{len(wrong)} logged values differ from the uninterrupted run: {sorted(wrong.items())[:5]}"
    )
    a, b = last_state(reference), last_state(resumed)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for name, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], value), name
    assert same(a["optimizer_states"], b["optimizer_states"])
    ref_best, res_best = best_tracking(a), best_tracking(b)
    assert float(res_best["best_model_score"]) == float(ref_best["best_model_score"])
    assert Path(res_best["best_model_path"]).name == Path(ref_best["best_model_path"]).name
    assert json.loads((resumed / "cold_start_metrics.json").read_text()) == json.loads(
        (reference / "cold_start_metrics.json").read_text()
    )


# -- fast: in-process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    run = train_in_process(tmp, "reference")
    return {"tmp": tmp, "run": run, "steps": last_state(run)["global_step"]}


def test_a_run_killed_mid_epoch_resumes_bit_for_bit_in_a_new_run_folder(reference: dict) -> None:
    tmp, steps_per_epoch = reference["tmp"], reference["steps"] // EPOCHS
    kill_at = steps_per_epoch + 5  # epoch 1, after step 5 of 14: last.ckpt holds step 3 of epoch 1
    with pytest.raises(Killed):
        train_in_process(tmp, "killed", *fault("train_batch_start", kill_at, "raise"))
    ckpt = last_state(tmp / "killed")
    assert ckpt["global_step"] == kill_at - (kill_at % EVERY)  # the latest state, not the best
    position = ckpt["TaskDataModule"]["train_position"]
    assert position["layout"]["num_workers"] == 0 and position["layout"]["batch_tasks"] == 8
    assert position_of(ckpt) == {
        "epoch": 1,
        "batches": ckpt["global_step"] - steps_per_epoch,
        "epoch_done": False,
    }
    resumed = train_in_process(tmp, "resumed", f"ckpt_path={tmp / 'killed' / 'checkpoints' / 'last.ckpt'}")
    assert_resumed_exactly(reference["run"], resumed, ckpt)


@pytest.mark.parametrize(("how", "status"), [("TERM", 143), ("INT", 130)])
def test_a_signal_saves_the_latest_state_at_the_next_step_and_exits_non_zero(
    reference: dict, how: str, status: int
) -> None:
    tmp = reference["tmp"]
    run = f"signal_{how}"
    with pytest.raises(TrainingInterrupted) as info:
        train_in_process(tmp, run, *fault("train_batch_start", 4, how))  # arrives during step 5
    assert info.value.code == status and info.value.signum == signal.Signals["SIG" + how]
    for s in (signal.SIGTERM, signal.SIGINT):  # handlers handed back
        assert not isinstance(getattr(signal.getsignal(s), "__self__", None), StopOnSignal)
    ckpt = last_state(tmp / run)
    assert ckpt["global_step"] == 5  # the step that was running when the signal came, completed
    assert position_of(ckpt) == {"epoch": 0, "batches": 5, "epoch_done": False}
    assert not (tmp / run / "cold_start_metrics.json").exists()  # no test after an interrupted fit


def test_sigterm_without_stop_on_signal_still_exits_143(reference: dict) -> None:
    """Lightning's own SIGTERM handling ends in SystemExit(0); the app turns it into 143."""
    tmp = reference["tmp"]
    with pytest.raises(TrainingInterrupted) as info:
        train_in_process(
            tmp, "lightning_sigterm", "callbacks.stop_on_signal=null", *fault("train_batch_start", 2, "TERM")
        )
    assert info.value.code == 143
    assert not (tmp / "lightning_sigterm" / "cold_start_metrics.json").exists()


# -- slow: train.py subprocesses, real signals ------------------------------------------------------
def _kill_points(total_steps: int, saves: int, per_hook: int, seed: int) -> list[tuple[str, int]]:
    """Distinct seeded random (hook, counter) fault points over the whole run, ``per_hook`` per hook:
    training steps and checkpoint saves drawn at random, epochs all of them (there are ``EPOCHS``)."""
    rng = random.Random(seed)
    ranges = {
        "train_batch_start": range(1, total_steps),
        "train_batch_end": range(1, total_steps),
        "validation_batch_start": range(EPOCHS),
        "save_checkpoint": range(1, saves + 1),
        "train_epoch_end": range(EPOCHS),
    }
    return [(hook, at) for hook, r in ranges.items() for at in sorted(rng.sample(r, min(per_hook, len(r))))]


@pytest.mark.slow
def test_sigkill_at_seeded_random_points_resumes_exactly(tmp_path: Path) -> None:
    ref = train_subprocess(tmp_path, "reference")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    reference = tmp_path / "reference"
    total = last_state(reference)["global_step"]
    per_epoch = total // EPOCHS
    # saves that surely happen: last.ckpt every EVERY steps (not at an epoch's last step), last.ckpt
    # at every epoch end, the first best checkpoint
    saves = sum(1 for s in range(1, total + 1) if s % EVERY == 0 and s % per_epoch) + EPOCHS + 1
    # one seeded point per hook (each pair is two training subprocesses: the budget of the CI)
    points = _kill_points(total, saves, per_hook=1, seed=2026)
    points.append(("train_batch_start", per_epoch))  # resumes from the epoch-end last.ckpt (epoch done)
    assert len(set(points)) == len(points) == 6
    for i, (hook, at) in enumerate(points):
        killed = train_subprocess(tmp_path, f"killed{i}", *fault(hook, at, "KILL"))
        assert killed.returncode == -signal.SIGKILL, (hook, at, killed.returncode, killed.stderr[-2000:])
        last = tmp_path / f"killed{i}" / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.exists() else []  # killed before the first save: start over
        resumed = train_subprocess(tmp_path, f"resumed{i}", *resume)
        assert resumed.returncode == 0, (hook, at, resumed.stderr[-3000:])
        start = torch.load(last, weights_only=False) if last.exists() else {"global_step": 0}
        assert_resumed_exactly(reference, tmp_path / f"resumed{i}", start)


@pytest.mark.slow
def test_sigterm_from_outside_checkpoints_and_exits_143(tmp_path: Path) -> None:
    proc = train_subprocess(tmp_path, "run", "trainer.max_epochs=50", wait=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600  # a guard against a hang, not a timing assertion
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, out[-3000:]
    assert "training stopped by SIGTERM" in out or "SIGTERM" in out
    ckpt = last_state(tmp_path / "run")  # complete and loadable
    assert ckpt["global_step"] > 0 and not (tmp_path / "run" / "cold_start_metrics.json").exists()


@pytest.mark.slow
def test_two_processes_one_rank_killed_resume_exactly(tmp_path: Path) -> None:
    ddp = ["cluster=ddp_cpu", "trainer.strategy.collective_timeout_s=60"]
    ref = train_subprocess(tmp_path, "reference", *ddp)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    steps = last_state(tmp_path / "reference")["global_step"]
    killed = train_subprocess(
        tmp_path, "killed", *ddp, *fault("train_batch_start", steps // EPOCHS + 4, "KILL", rank=1)
    )
    assert killed.returncode != 0  # rank 1 died; rank 0 fails on its next collective
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    start = torch.load(last, weights_only=False)
    assert start["TaskDataModule"]["train_position"]["epoch"] == 1
    resumed = train_subprocess(tmp_path, "resumed", *ddp, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_exactly(tmp_path / "reference", tmp_path / "resumed", start)
