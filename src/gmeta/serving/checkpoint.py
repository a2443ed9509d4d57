"""Loading a checkpoint for serving, and finding the ``FeatureEncoder`` it was trained with.

Where the encoder comes from (first that exists):

1. the checkpoint itself: ``checkpoint[<DataModule class>]`` (a data module's ``state_dict``:
   ``encoder`` and ``vocab``; checkpoints written before the encoder existed hold ``vocab`` and
   ``task_config``), or ``checkpoint["hyper_parameters"]["vocab"]`` (and its ``task_config``);
2. ``data_dir``: a shard folder (``manifest.json`` + its vocabulary file) built for this checkpoint;
3. the run directory the checkpoint sits in (``config_resolved.yaml``: ``data.data_dir``).

The encoder's schema must be the checkpoint's (same fields and vocabulary sizes), and a shard
folder's vocabulary the one the checkpoint was trained with (its sha256): another vocabulary, even
of the same sizes, would silently map ids to other embedding rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gmeta.data.encoder import FeatureEncoder, encoder_settings
from gmeta.data.schema import Schema
from gmeta.data.shards import read_manifest
from gmeta.meta.module import MetaDLRMModule
from gmeta.serving import ServeError

log = logging.getLogger(__name__)


def load_checkpoint(ckpt_path: str | Path) -> tuple[MetaDLRMModule, dict[str, Any]]:
    """(module, raw checkpoint dict) of a Lightning checkpoint: a file, or a sharded directory read whole."""
    path = Path(ckpt_path)
    if not path.exists():
        raise ServeError(f"checkpoint not found: {path}")
    from gmeta.parallel.sharded_checkpoint import load_lightning_module

    return load_lightning_module(MetaDLRMModule, path)


def _from_state(schema: Schema, state: dict[str, Any], origin: str) -> FeatureEncoder:
    """The encoder of a checkpoint entry holding ``vocab`` (and ``encoder``, or an older ``task_config``)."""
    settings = state.get("encoder") or encoder_settings(
        {"schema": schema.to_dict(), "task_config": state.get("task_config")}, origin
    )
    if settings["schema"] != schema.to_dict():
        raise ServeError(
            f"{origin}: the encoder's schema (fields, vocabulary sizes) differs from the model's: "
            f"the checkpoint is inconsistent.\n  encoder: {settings['schema']}\n  model:   {schema.to_dict()}"
        )
    return FeatureEncoder.from_dict(settings, state["vocab"], origin)


def _find_run_data_dir(ckpt: Path) -> Path | None:
    """``data.data_dir`` of the Hydra run the checkpoint belongs to (``config_resolved.yaml`` above it)."""
    from omegaconf import OmegaConf  # a Hydra dependency; only needed for this fallback

    for parent in list(ckpt.resolve().parents)[:5]:
        cfg_path = parent / "config_resolved.yaml"
        if cfg_path.is_file():
            try:
                data_dir = OmegaConf.select(OmegaConf.load(cfg_path), "data.data_dir")
            except Exception as e:  # noqa: BLE001 - a broken run config only disables this fallback
                log.warning("could not read %s: %s", cfg_path, e)
                return None
            return Path(str(data_dir)) if data_dir else None
    return None


def find_encoder(
    schema: Schema,
    checkpoint: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    ckpt_path: str | Path | None = None,
) -> FeatureEncoder:
    """The training encoder of a checkpoint (see the module docstring for the search order).

    Args:
        schema: the checkpoint's encoded schema (``module.schema``); the encoder must match it.
        checkpoint: the raw checkpoint dict (searched for a stored encoder).
        data_dir: shard folder with ``manifest.json`` and its vocabulary file.
        ckpt_path: the checkpoint file (its run directory's config names the data folder).
    """
    for key, value in (checkpoint or {}).items():
        if isinstance(value, dict) and isinstance(value.get("vocab"), dict) and key != "state_dict":
            return _from_state(schema, value, f"checkpoint[{key!r}]")
    hp = (checkpoint or {}).get("hyper_parameters") or {}
    if isinstance(hp.get("vocab"), dict):
        return _from_state(schema, hp, "checkpoint hyper_parameters")

    tried = ["the checkpoint (no stored vocabulary)"]
    if data_dir is None and ckpt_path is not None:
        run_dir = _find_run_data_dir(Path(ckpt_path))
        if run_dir is not None and (run_dir / "manifest.json").is_file():
            data_dir = run_dir
        elif run_dir is None:
            tried.append(f"a run config (config_resolved.yaml with data.data_dir) above {ckpt_path}: none")
        else:
            tried.append(f"the run config's data dir {run_dir}: no manifest.json there")
    if data_dir is None:
        raise ServeError(
            f"no vocabulary found for checkpoint {ckpt_path}: tried {'; '.join(tried)}. Pass the shard folder "
            "the model was trained on (--data-dir / data_dir=, the folder holding manifest.json and vocab.parquet)"
        )
    manifest = read_manifest(data_dir)
    where = str(manifest.root / "manifest.json")
    if manifest.schema.to_dict() != schema.to_dict():
        raise ServeError(
            f"{where}: schema (fields, vocabulary sizes) differs from the checkpoint's: these shards were not "
            f"the ones the model was trained on.\n  shards:     {manifest.schema.to_dict()}\n"
            f"  checkpoint: {schema.to_dict()}"
        )
    want = manifest.data.get("vocab", {}).get("sha256")
    trained = next(  # the vocabulary the checkpoint was trained with (TaskDataModule.state_dict)
        (
            v.get("vocab_sha256")
            for v in (checkpoint or {}).values()
            if isinstance(v, dict) and v.get("vocab_sha256")
        ),
        None,
    )
    if trained and want and trained != want:
        raise ServeError(
            f"{where}: vocabulary sha256 {want[:12]}... is not the one the checkpoint was trained with "
            f"({trained[:12]}...): ids would map to other embedding rows. Pass the shard folder the model "
            "was trained on (--data-dir)"
        )
    return FeatureEncoder.from_manifest(manifest.root, manifest.data)
