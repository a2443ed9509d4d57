"""Consumers of a sharded checkpoint directory on one process: ``gmeta adapt`` (FewShotAdapter) scores
exactly as from the file checkpoint, and ``gmeta export`` writes back an equal file (vocabulary and
task config included). Reuses the trained run of ``test_serve.py``; the directory is written by one
rank (``save_sharded`` without a process group); multi-rank directories: ``tests/distributed``.
"""

from __future__ import annotations

import pandas as pd
import torch
from test_serve import adapter, full_scores, raw_tasks, trained  # noqa: F401 (fixtures)

from gmeta.cli import main as cli_main
from gmeta.meta.module import MetaDLRMModule
from gmeta.parallel.comm import Communicator
from gmeta.parallel.sharded_checkpoint import load_lightning_module, save_sharded
from gmeta.serving.adapter import FewShotAdapter


def test_adapt_and_export_read_a_sharded_checkpoint_like_the_file(tmp_path, trained, raw_tasks, full_scores):  # noqa: F811
    module, checkpoint = load_lightning_module(MetaDLRMModule, trained["ckpt"])
    sharded = tmp_path / "last.ckpt"
    save_sharded(dict(checkpoint), sharded, module, Communicator(), block_bytes=4096)  # many blocks
    assert sharded.is_dir()

    from_dir = FewShotAdapter.from_checkpoint(sharded, data_dir=trained["data_dir"], batch_users=64)
    support, candidates = raw_tasks
    pd.testing.assert_frame_equal(from_dir.score(support, candidates, key="task"), full_scores)
    # the vocabulary travels inside the directory: no data_dir needed
    FewShotAdapter.from_checkpoint(sharded, batch_users=64)

    exported = tmp_path / "exported.ckpt"
    assert cli_main(["export", "--ckpt", str(sharded), "--out", str(exported)]) == 0
    got = torch.load(exported, weights_only=False)
    want = torch.load(trained["ckpt"], weights_only=False)
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert got["TaskDataModule"]["vocab"] == want["TaskDataModule"]["vocab"]
    assert got["global_step"] == want["global_step"] and got["hyper_parameters"] == want["hyper_parameters"]
    assert cli_main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(tmp_path / "y.ckpt")]) == 2
