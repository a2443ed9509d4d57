"""Fetch a dataset and build its task-grouped shards (idempotent): scripts/prepare_data.py data=movielens1m

Takes the same Hydra overrides as train.py (only the ``data`` group matters); prints the counts.
"""

import logging
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gmeta.errors import report_user_errors

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    print(f"shards ready in {datamodule.data_dir}")


if __name__ == "__main__":
    # user errors (a bad override, schema, data file...) exit 2 with one message; bugs keep the traceback
    report_user_errors(lambda: main(sys.argv[1:]), "prepare_data.py")
