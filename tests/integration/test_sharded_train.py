"""train.py / eval.py end to end with sharded checkpoints (issue 11): 2 gloo processes write them
through Lightning's checkpoint callbacks, and eval.py reads them on 1 process (whole) and on 2
(each rank its rows) to the metrics the training run reported. Slow (~3 min): ``make test-all``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from entry_points import run_entry_point as run_script

from gmeta.parallel.sharded_checkpoint import META_FILE


def records(path: Path) -> dict[tuple[str, bool], dict]:
    return {(r["state"], r["adapted"]): r for r in json.loads(path.read_text())}


@pytest.mark.slow
def test_sharded_checkpoints_through_train_and_eval(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ("cluster=ddp_cpu", "trainer.strategy.collective_timeout_s=90")
    run_script(
        "train.py",
        "+experiment=synthetic_maml",
        *common,
        "+trainer.strategy.checkpoint_format=sharded",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
        tmp=tmp_path,
    )
    ckpts = run_dir / "checkpoints"
    best = sorted(ckpts.glob("epoch_*.ckpt"))
    assert len(best) == 1 and best[0].is_dir(), best  # top-1 kept, the other removed
    for ckpt in (ckpts / "last.ckpt", best[0]):
        assert (ckpt / META_FILE).is_file() and len(list(ckpt.glob("__*_0.distcp"))) == 2
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]
    trained = records(run_dir / "cold_start_metrics.json")  # train.py tested the best checkpoint

    for name, extra in (("one", ()), ("two", common)):
        eval_dir = tmp_path / f"eval_{name}"
        run_script(
            "eval.py",
            "data=synthetic",
            *extra,
            f"ckpt_path={best[0]}",
            "report=false",
            f"hydra.run.dir={eval_dir}",
            tmp=tmp_path,
        )
        evaluated = records(eval_dir / "cold_start_metrics.json")
        assert evaluated.keys() == trained.keys()
        for key, r in trained.items():
            for metric in ("auc", "logloss", "gauc"):
                assert evaluated[key][metric] == pytest.approx(r[metric], abs=2e-6, nan_ok=True), (
                    name,
                    key,
                    metric,
                )
            assert evaluated[key]["tasks"] == r["tasks"]
