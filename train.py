"""Train a meta-DLRM: python train.py +experiment=movielens_maml [overrides]"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gmeta.errors import HydraEntry

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
#: user errors (data, config, shards, checkpoint, input files) exit 2 with a message; bugs keep the traceback
ENTRY = HydraEntry("train.py")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    def job() -> float | None:
        from gmeta.app import train  # imported late: keeps --help and config errors fast

        return train(cfg)  # cfg.optimized_metric's value, for hparams_search sweepers

    return ENTRY.run(job)


if __name__ == "__main__":
    ENTRY.main(main)
