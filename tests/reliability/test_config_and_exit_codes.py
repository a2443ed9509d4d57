"""Bad configs and the entry points' exit statuses: a user error is one message and status 2; an
unexpected error keeps its traceback (status 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_config import CONFIG_CASES, ConfigCase
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gmeta.data.schema import SchemaError
from gmeta.data.shards import ShardError
from gmeta.errors import USER_ERROR_EXIT, find_user_error, report_user_errors, user_message

ROOT = Path(__file__).resolve().parents[2]


def _compose_and_instantiate(case: ConfigCase) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(case.overrides))
    node = cfg
    for part in case.target.split("."):
        node = node[part]
    instantiate(node, _convert_="all")


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
def test_bad_config_is_a_user_error(case: ConfigCase, monkeypatch) -> None:
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))  # conf/paths interpolates it (train.py sets it)
    with pytest.raises(Exception) as info:
        _compose_and_instantiate(case)
    found = find_user_error(info.value)
    assert found is not None, f"{type(info.value).__name__}: {info.value} would print a traceback"
    assert pytest.importorskip("re").search(case.message, user_message(found) + " " + str(info.value))


def test_report_user_errors_exits_2_with_one_line(capsys) -> None:
    def bad() -> None:
        raise ShardError("shard x.tar: corrupt")

    with pytest.raises(SystemExit) as info:
        report_user_errors(bad, "train.py")
    assert info.value.code == USER_ERROR_EXIT == 2
    assert capsys.readouterr().err == "train.py: error: shard x.tar: corrupt\n"


def test_unexpected_errors_keep_their_traceback() -> None:
    def bug() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # not turned into a message: the traceback stays
        report_user_errors(bug, "train.py")
    assert find_user_error(KeyError("x")) is None and find_user_error(ValueError("x")) is None
    from hydra.errors import InstantiationException

    try:  # a ValueError from a library while building an object: a bug, not a config value refused
        try:
            np.zeros(-1)
        except ValueError as e:
            raise InstantiationException("Error in call to target 'x.Y'") from e
    except InstantiationException as wrapped:
        assert find_user_error(wrapped) is None


def test_a_user_error_wrapped_by_instantiate_or_a_dataloader_worker() -> None:
    from hydra.errors import InstantiationException

    try:
        try:
            raise SchemaError("TaskConfig.query_size must be >= 1, got 0")
        except SchemaError as e:
            raise InstantiationException("Error in call to target 'gmeta.data.tasks.TaskConfig'") from e
    except InstantiationException as wrapped:
        assert str(find_user_error(wrapped)) == "TaskConfig.query_size must be >= 1, got 0"
    # torch re-raises a worker's exception as the same type, the worker's traceback in its text
    worker = ShardError(
        "Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ngmeta.data.shards.ShardError: shard a.tar: truncated\n'
    )
    assert user_message(worker) == "shard a.tar: truncated"


# -- the entry points, as a user runs them (a few subprocesses) ------------------------------------
def _run(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_user_error(proc: subprocess.CompletedProcess, prog: str, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and pytest.importorskip("re").search(pattern, lines[0]), proc.stderr[-3000:]


@pytest.mark.slow  # ~20 s: a fresh interpreter imports torch and Lightning
def test_prepare_data_bad_input_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "schema.yaml").write_text("task_key: uid\nlabel: y\n")
    (tmp_path / "clicks.csv").write_text("")
    shards = tmp_path / "shards"
    proc = _run(
        tmp_path,
        str(ROOT / "scripts" / "prepare_data.py"),
        "data=tabular",
        f"data.source.path={tmp_path / 'clicks.csv'}",
        f"data.source.schema_path={tmp_path / 'schema.yaml'}",
        f"data.data_dir={shards}",
    )
    _assert_user_error(proc, "prepare_data.py", r"clicks.csv: empty file; expected a header line")
    assert not shards.exists() and not list(tmp_path.glob(".shards-*"))


def test_train_bad_override_exits_2(tmp_path: Path) -> None:
    proc = _run(
        tmp_path, str(ROOT / "train.py"), "data.task_config.min_interaction=5", f"paths.log_dir={tmp_path}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Could not override 'data.task_config.min_interaction'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~20 s: a fresh interpreter imports torch and Lightning
def test_train_user_error_in_the_run_exits_2(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        str(ROOT / "train.py"),
        "data=tabular",
        f"data.source.path={tmp_path / 'missing.parquet'}",
        f"data.source.schema_path={tmp_path / 'schema.yaml'}",
        f"data.data_dir={tmp_path / 'shards'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    _assert_user_error(proc, "train.py", r"missing.parquet: no such file or directory \(data.source.path\)")


@pytest.mark.slow  # ~20 s: a fresh interpreter imports torch and Lightning
def test_eval_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    proc = _run(
        tmp_path, str(ROOT / "eval.py"), f"ckpt_path={tmp_path / 'nope.ckpt'}", f"paths.log_dir={tmp_path}"
    )
    _assert_user_error(proc, "eval.py", r"checkpoint not found: .*nope.ckpt \(ckpt_path\)")


@pytest.mark.slow  # ~20 s: a fresh interpreter imports torch and Lightning
def test_gmeta_adapt_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("user_id,item_id,rating\n")
    proc = _run(
        tmp_path,
        "-m",
        "gmeta.cli",
        "adapt",
        "--ckpt",
        str(tmp_path / "nope.ckpt"),
        "--support",
        str(tmp_path / "s.csv"),
        "--candidates",
        str(tmp_path / "s.csv"),
    )
    _assert_user_error(proc, "gmeta adapt", r"nope.ckpt")


# -- the same entry points in this process (fast: torch is already imported) -----------------------
def test_gmeta_adapt_user_error_returns_2_in_process(tmp_path: Path, capsys) -> None:
    from gmeta.cli import main

    (tmp_path / "s.csv").write_text("user_id,item_id,rating\n")
    s = str(tmp_path / "s.csv")
    assert main(["adapt", "--ckpt", str(tmp_path / "nope.ckpt"), "--support", s, "--candidates", s]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmeta adapt: error: ") and "nope.ckpt" in err and "Traceback" not in err


def test_prepare_data_user_error_exits_2_in_process(tmp_path: Path, capsys) -> None:
    import runpy

    (tmp_path / "schema.yaml").write_text("task_key: uid\nlabel: y\n")
    argv = [
        "prepare_data.py",
        "data=tabular",
        f"data.source.path={tmp_path / 'missing.csv'}",
        f"data.source.schema_path={tmp_path / 'schema.yaml'}",
        f"data.data_dir={tmp_path / 'shards'}",
    ]
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "scripts" / "prepare_data.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "prepare_data.py: error: " in err
        and "missing.csv: no such file or directory (data.source.path)" in err
    )
    assert not (tmp_path / "shards").exists()


def test_eval_refuses_shards_with_another_vocabulary(tmp_path: Path) -> None:
    """Same sizes, other vocabulary: every id would select another row; eval.py stops instead."""
    import torch

    from gmeta.app import check_checkpoint_vocabulary

    class Shards:  # what the check reads of a TaskDataModule
        data_dir = tmp_path / "shards"

        def __init__(self, sha: str) -> None:
            self.manifest = type("M", (), {"data": {"vocab": {"sha256": sha}}})()

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "TaskDataModule": {"vocab_sha256": "a" * 64}}, ckpt)
    check_checkpoint_vocabulary(ckpt, Shards("a" * 64))  # the same vocabulary: fine
    with pytest.raises(
        SchemaError, match=r"model.ckpt was trained with another vocabulary \(sha256 aaaaaaaaaaaa"
    ):
        check_checkpoint_vocabulary(ckpt, Shards("b" * 64))


def test_a_refused_meta_value_is_a_user_error(monkeypatch) -> None:
    """meta.inner_steps=-1: MetaConfig's check, raised while instantiate builds the model."""
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["meta.inner_steps=-1"])
    from omegaconf import OmegaConf

    from gmeta.data.schema import FieldSpec, Schema

    schema = Schema("u", "y", fields=(FieldSpec("u", "sparse", vocab_size=5), FieldSpec("p", "dense")))
    with pytest.raises(Exception) as info:
        instantiate(
            cfg.model, schema=schema.to_dict(), meta=OmegaConf.to_container(cfg.meta), _convert_="all"
        )
    found = find_user_error(info.value)
    assert found is not None and "inner_steps must be >= 0, got -1" in user_message(found)


@pytest.mark.slow  # ~25 s: a fresh interpreter and one training step
def test_train_divergence_exits_2_naming_the_inner_lr(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        str(ROOT / "train.py"),
        "+experiment=synthetic_maml",
        "meta.inner_lr=1e12",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"data.data_dir={tmp_path / 'shards'}",
    )
    _assert_user_error(proc, "train.py", r"meta-training diverged at step 0: .*meta\.inner_lr=1e\+12")
