"""Train a meta-DLRM: python train.py +experiment=movielens_maml [overrides]"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from gmeta.app import train  # imported late: keeps --help and config errors fast

    return train(cfg)  # cfg.optimized_metric's value, for hparams_search sweepers


if __name__ == "__main__":
    main()
