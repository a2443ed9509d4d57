"""The train and evaluate flows behind ``train.py`` and ``eval.py`` (config in, results out)."""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gmeta.data.datamodule import TaskDataModule
from gmeta.data.schema import SchemaError
from gmeta.errors import ConfigError, InputFileError
from gmeta.meta.module import MetaDLRMModule
from gmeta.parallel import shutdown_process_group  # also registers trainer.strategy=hybrid_parallel
from gmeta.parallel.launch import is_global_rank_zero, isolated_launch_env, wait_for_children
from gmeta.parallel.requeue import TrainingInterrupted
from gmeta.parallel.sharded_checkpoint import (
    checkpoint_metadata,
    is_sharded_checkpoint,
    load_lightning_module,
)
from gmeta.report import print_metrics, write_metrics

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def save_run_info(cfg: DictConfig, output_dir: Path) -> None:
    """Store the resolved config and the git commit next to the run's outputs."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    root = Path(cfg.paths.root_dir)
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info = f"{commit}{' (with uncommitted changes)' if dirty else ''}\n"
    except (OSError, subprocess.CalledProcessError):
        info = "unknown (not a git checkout)\n"
    (output_dir / "git_commit.txt").write_text(info)


def build_datamodule(cfg: DictConfig) -> TaskDataModule:
    """Instantiate the DataModule and make sure its shards exist (building them if needed).

    Runs before the Trainer (the model's tables need the vocabulary sizes), so under torchrun/srun,
    where every rank starts at once, only global rank 0 (from the launcher's environment) builds;
    the others wait for its shards.
    """
    datamodule: TaskDataModule = instantiate(cfg.data, _convert_="all")  # every conf/data targets it
    if is_global_rank_zero():
        datamodule.prepare_data()
    else:
        datamodule.wait_for_shards()
    datamodule.setup("fit")
    return datamodule


def check_trainer_config(trainer: DictConfig) -> None:
    """Refuse the Trainer arguments this module and data stream cannot honour, naming the key.

    ``MetaDLRMModule`` steps its optimizers itself (dense Adam + row-wise embedding updates);
    Lightning clips and accumulates gradients only under automatic optimization, and takes no
    fraction of an epoch from an ``IterableDataset``: it would refuse these at the start of ``fit``
    with a traceback.
    """
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}: gradient clipping is not supported (the meta-learning "
            "module uses manual optimization, which Lightning does not clip); leave it null"
        )
    # the task stream is an IterableDataset: Lightning takes a batch count, not a fraction of an epoch
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
        value = trainer.get(key)
        if isinstance(value, float) and value not in (0.0, 1.0):
            raise ConfigError(
                f"trainer.{key}={value}: the task stream has no length Lightning can take a fraction of; "
                "give a number of meta-batches (an int, e.g. 20), 0.0 or 1.0"
                + (", or a time such as 00:00:10:00" if key == "val_check_interval" else "")
            )
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: gradient accumulation is not supported (the "
            "meta-learning module uses manual optimization); use a larger meta-batch "
            "(data.batch_tasks) instead, or leave it 1"
        )


def _switched_off(trainer: DictConfig, callbacks: list[Callback]) -> list[Callback]:
    """Drop the callbacks a Trainer flag turns off: Lightning refuses ``enable_progress_bar=False`` or
    ``enable_checkpointing=False`` next to such a callback, and ignores ``enable_model_summary=False``
    when one is listed (as conf/callbacks/default.yaml does)."""
    off: tuple[type[Callback], ...] = tuple(
        kind
        for flag, kind in (
            ("enable_progress_bar", ProgressBar),
            ("enable_model_summary", ModelSummary),
            ("enable_checkpointing", Checkpoint),
        )
        if trainer.get(flag) is False
    )
    return [c for c in callbacks if not isinstance(c, off)] if off else callbacks


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the run's callbacks, loggers and checkpoint plugin.

    A Trainer argument Lightning refuses as it is built (``precision=fp8``, ``limit_train_batches=1.5``,
    ``profiler=fancy``) is a ``ConfigError`` carrying Lightning's message.
    """
    check_trainer_config(cfg.trainer)
    callbacks: list[Callback] = _switched_off(cfg.trainer, _instantiate_group(cfg.get("callbacks")))
    if cfg.get("adaptation") is not None:  # which inner loop evaluation adapts with (gmeta.meta.adaptation)
        callbacks.append(instantiate(cfg.adaptation, _convert_="all"))
    loggers: list[Logger] = _instantiate_group(cfg.get("logger"))
    extra: dict[str, Any] = {}
    if cfg.get("checkpoint_io") is not None:  # atomic checkpoint files (gmeta.checkpoint_io)
        strategy = cfg.trainer.get("strategy")
        if isinstance(strategy, DictConfig):
            strategy = extra["strategy"] = instantiate(strategy, _convert_="all")
        # a strategy may bring its own (hybrid_parallel does); Lightning refuses two
        if getattr(strategy, "_checkpoint_io", None) is None:
            plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
            extra["plugins"] = [*plugins, instantiate(cfg.checkpoint_io)]
    try:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    except InstantiationException as e:
        if isinstance(e.__cause__, (MisconfigurationException, ValueError)):
            raise ConfigError(f"trainer: {e.__cause__}") from e
        raise


def _report(model: MetaDLRMModule, trainer: L.Trainer, output_dir: Path, title: str) -> list[dict]:
    records = model.test_records
    if trainer.is_global_zero and records:
        print_metrics(records, title=title)
        path = write_metrics(records, output_dir)
        log.info("wrote %s", path)
    return records


def train(cfg: DictConfig) -> float | None:
    """Fit a model (or resume from ``cfg.ckpt_path``), then test its best checkpoint.

    Returns the value of ``cfg.optimized_metric`` after training (what Hydra sweepers such as Optuna
    optimize), or None when it is not set.
    """
    with isolated_launch_env():  # a sweep's next job must not inherit this job's rank variables
        try:
            metrics = _train(cfg)
        except TrainingInterrupted:  # a signal: checkpoint saved, exit 128 + signal (not 0)
            shutdown_process_group()
            raise
        except SIGTERMException as e:  # Lightning's own SIGTERM handling (outside StopOnSignal's
            shutdown_process_group()  # window, or without it) would end the run with status 0
            raise TrainingInterrupted(signal.SIGTERM, None) from e
        shutdown_process_group()  # multi-process runs: a clean gloo exit (and room for the next job)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric {name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]


def _train(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    if is_global_rank_zero():  # every rank of a run shares the folder
        save_run_info(cfg, output_dir)
    datamodule = build_datamodule(cfg)
    assert datamodule.schema is not None  # set by setup("fit") in build_datamodule
    model: MetaDLRMModule = instantiate(
        cfg.model,
        schema=datamodule.schema.to_dict(),
        meta=OmegaConf.to_container(cfg.meta, resolve=True),
        _convert_="all",
    )
    trainer = build_trainer(cfg)
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector, untyped
        best = next((c.best_model_path for c in callbacks if isinstance(c, ModelCheckpoint)), "")
        if not best:
            log.info("no best checkpoint (checkpointing off or fast_dev_run): testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        _report(model, trainer, output_dir, f"test: {cfg.meta.name} ({cfg.task_name})")
    wait_for_children(trainer.strategy.launcher)  # this job's other ranks, before the next job starts
    return metrics


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate the checkpoint ``cfg.ckpt_path`` on ``cfg.split`` (test or val) of ``cfg.data``."""
    with isolated_launch_env():
        try:
            records = _evaluate(cfg)
        except SIGTERMException as e:  # Lightning ends a SIGTERM'd run with status 0: not a success
            shutdown_process_group()
            raise TrainingInterrupted(signal.SIGTERM, None) from e
        shutdown_process_group()
    return records


def check_checkpoint_vocabulary(ckpt: Path, datamodule: Any) -> None:
    """The shards' vocabulary must be the checkpoint's: with another one (even of the same sizes)
    every id would silently select another embedding row."""
    state = checkpoint_metadata(ckpt)  # a sharded checkpoint: its meta.pt (the rows are not needed)
    want = next(
        (v.get("vocab_sha256") for v in state.values() if isinstance(v, dict) and "vocab_sha256" in v), None
    )
    manifest = getattr(datamodule, "manifest", None)
    have = (manifest.data.get("vocab", {}) if manifest is not None else {}).get("sha256")
    if want and have and want != have:
        raise SchemaError(
            f"checkpoint {ckpt} was trained with another vocabulary (sha256 {want[:12]}...) than the shards in "
            f"{datamodule.data_dir} ({have[:12]}...): ids would map to other embedding rows. Evaluate on the "
            "shards the model was trained on (data.data_dir of its run, config_resolved.yaml)"
        )


def _evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    if is_global_rank_zero():
        save_run_info(cfg, output_dir)
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "eval.py needs ckpt_path=<a checkpoint of a gmeta run> (e.g. .../checkpoints/last.ckpt)"
        )
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got {cfg.split!r}")
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():  # a file, or a sharded checkpoint directory
        raise InputFileError(f"checkpoint not found: {ckpt} (ckpt_path)")
    datamodule = build_datamodule(cfg)
    trainer = build_trainer(cfg)
    # A sharded checkpoint on several processes: each rank reads only its rows (trainer.test's
    # ckpt_path); on one process it is read whole.
    per_rank = is_sharded_checkpoint(ckpt) and trainer.world_size > 1
    model, _ = load_lightning_module(MetaDLRMModule, ckpt, rows=not per_rank)
    assert datamodule.schema is not None  # set by setup("fit") in build_datamodule
    if model.schema.to_dict()["fields"] != datamodule.schema.to_dict()["fields"]:
        raise SchemaError(
            f"checkpoint {ckpt} was trained on a different schema than the shards in {datamodule.data_dir}: "
            "evaluate it with the data config it was trained on"
        )
    check_checkpoint_vocabulary(ckpt, datamodule)
    if cfg.split == "val":
        # validation metrics are logged only; run them through the test path to get records
        datamodule.test_dataloader = datamodule.val_dataloader  # type: ignore[method-assign]
    trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt) if per_rank else None)
    records = _report(model, trainer, output_dir, f"{cfg.split}: {model.meta_config.name} ({ckpt})")
    wait_for_children(trainer.strategy.launcher)
    if cfg.get("report", False) and trainer.world_size > 1:
        # the report re-runs the model on rank 0 alone: impossible with a table sharded over ranks
        log.warning("eval report skipped: it needs one process (cluster=cpu or cluster=gpu)")
    elif cfg.get("report", False) and trainer.is_global_zero and records:
        from gmeta.eval_report import write_eval_report  # matplotlib: only when a report is asked for

        path = write_eval_report(
            model,
            datamodule.test_dataloader(),
            records,
            output_dir,
            ckpt,
            support_sizes=list(cfg.get("support_sizes") or []),
            baseline_path=cfg.get("baseline_metrics"),
            title=f"{cfg.split}: {model.meta_config.name} ({ckpt.parent.parent.name})",
        )
        log.info("wrote %s", path)
    return records
