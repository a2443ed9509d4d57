"""Print the sbatch script that ``python train.py -m ... cluster=slurm`` would submit, without SLURM.

Composes the training config with ``cluster=slurm`` (or the ``cluster=slurm_cpu`` you give) and your
overrides, turns ``hydra.launcher`` into submitit executor parameters exactly as
hydra-submitit-launcher does, and renders submitit's sbatch file. Use it to check nodes, tasks, GPUs, time and signal settings before submitting::

    .venv/bin/python scripts/slurm/sbatch_preview.py +experiment=movielens_maml hydra.launcher.partition=gpu
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def launcher_parameters(overrides: list[str]) -> dict:
    """The resolved ``hydra.launcher`` node of the composed config (``cluster=slurm`` + overrides)."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        # hydra.job.name is "train" when train.py runs (compose alone would call it "app")
        # cluster=slurm unless the overrides pick another SLURM cluster option (cluster=slurm_cpu)
        cluster = [] if any(o.startswith("cluster=") for o in overrides) else ["cluster=slurm"]
        cfg = compose(
            "train", overrides=[*cluster, "hydra.job.name=train", *overrides], return_hydra_config=True
        )
    # hydra.launcher interpolates trainer.*: resolve it inside the whole config
    launcher = OmegaConf.to_container(cfg, resolve=False)["hydra"]["launcher"]
    resolved = {}
    for key in launcher:
        if key in ("_target_", "setup"):
            continue
        resolved[key] = OmegaConf.select(cfg, f"hydra.launcher.{key}", throw_on_resolution_failure=True)
        if OmegaConf.is_config(resolved[key]):
            resolved[key] = OmegaConf.to_container(resolved[key], resolve=True)
    return resolved


def sbatch_text(overrides: list[str], folder: str) -> str:
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = launcher_parameters(overrides)
    shown_folder = params.pop("submitit_folder")  # where the real run writes submitit's files
    # submitit's SlurmExecutor refuses to start where there is no srun: show it a stand-in
    fake_bin = Path(folder) / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{fake_bin}{os.pathsep}{path}"
    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
        )
    finally:
        os.environ["PATH"] = path
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    slurm = executor._executor
    text = slurm._make_submission_file_text(slurm._submitit_command_str, "preview")
    return text.replace(str(Path(folder).resolve()), shown_folder).replace(folder, shown_folder)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(sbatch_text(sys.argv[1:], folder))


if __name__ == "__main__":
    main()
