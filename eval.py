"""Evaluate a checkpoint per cold-start state: python eval.py ckpt_path=logs/.../checkpoints/last.ckpt"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gmeta.errors import HydraEntry

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
#: user errors (data, config, shards, checkpoint, input files) exit 2 with a message; bugs keep the traceback
ENTRY = HydraEntry("eval.py")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    def job() -> None:
        from gmeta.app import evaluate

        evaluate(cfg)

    ENTRY.run(job)


if __name__ == "__main__":
    ENTRY.main(main)
