"""End-to-end: train.py / eval.py as a user runs them, on small synthetic tasks (no download).

The session's shared training run (``trained_run``, tests/integration/conftest.py) feeds most checks;
resume and eval reuse its checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from entry_points import run_entry_point as run_script

from gmeta.data.schema import STATES
from gmeta.data.vocab import read_vocab
from gmeta.meta.schedule import SCHEDULE_KEY, AdaptationSchedule
from helpers import EPOCHS, TrainedRun, load_checkpoint, records_by_key


def test_train_writes_metrics_for_every_state_and_mode(trained_run: TrainedRun) -> None:
    recs = records_by_key(trained_run.run_dir / "cold_start_metrics.json")
    assert set(recs) == {(s, a) for s in STATES for a in (False, True)}
    counts = trained_run.manifest.data["counts"]["test"]
    for (state, _), r in recs.items():
        assert r["method"] == "maml"
        assert {"auc", "logloss", "gauc", "tasks", "samples"} <= set(r)
        # every test task and query sample is evaluated exactly once: nothing dropped or duplicated
        assert r["tasks"] == counts[state]["tasks"], state
        assert r["samples"] == counts[state]["query"], state
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and math.isfinite(r["logloss"])


def test_run_dir_has_checkpoints_logs_and_config(trained_run: TrainedRun) -> None:
    run = trained_run.run_dir
    assert trained_run.last_ckpt.is_file()
    assert list((run / "checkpoints").glob("epoch_*.ckpt")), "best checkpoint missing"
    assert (run / "config_resolved.yaml").is_file() and (run / "git_commit.txt").is_file()
    assert list(run.glob("csv/*/metrics.csv")) and list(run.glob("tensorboard/*/events.out.*"))


def test_global_step_counts_one_step_per_meta_batch(trained_run: TrainedRun) -> None:
    batch_tasks = 16  # conf/data/synthetic.yaml
    steps_per_epoch = math.ceil(trained_run.manifest.num_tasks("train") / batch_tasks)
    ckpt = load_checkpoint(trained_run.last_ckpt)
    assert ckpt["global_step"] == EPOCHS * steps_per_epoch
    # the row-wise optimizer state of the embedding tables travels in the checkpoint
    assert any(k.startswith("embedding.optimizer.") for k in ckpt["state_dict"])


def test_planted_structure_is_recovered_by_adaptation(trained_run: TrainedRun) -> None:
    """New users' preferences are private (planted), so only adaptation on their support can find them.

    Threshold: on 40 user-cold test tasks (400 query samples) the AUC's standard error is about 0.03;
    measured lifts were 0.15-0.17, so a lift of at least 0.05 is far from both noise and the observed
    value, yet fails if adaptation does nothing.
    """
    recs = records_by_key(trained_run.run_dir / "cold_start_metrics.json")
    for state in ("user_cold", "user_item_cold"):
        lift = recs[(state, True)]["auc"] - recs[(state, False)]["auc"]
        assert lift >= 0.05, f"{state}: adapted AUC only {lift:+.3f} above non-adapted"
    assert recs[("user_cold", True)]["logloss"] < recs[("user_cold", False)]["logloss"]


def test_eval_reproduces_test_metrics_of_best_checkpoint(
    trained_run: TrainedRun, evaluated_run: Path
) -> None:
    """eval.py on the best checkpoint gives the numbers train.py's test stage reported for it."""
    run, eval_dir = trained_run.run_dir, evaluated_run
    got = records_by_key(eval_dir / "cold_start_metrics.json")
    want = records_by_key(run / "cold_start_metrics.json")
    assert got.keys() == want.keys()
    for key in want:
        for name in ("auc", "logloss", "gauc", "tasks", "samples"):
            assert got[key][name] == pytest.approx(want[key][name], rel=1e-5, abs=1e-6), (key, name)


# ~8 s: one more train.py process; test_resume.py's in-process resume (fast) checks the same, bit for bit
@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_step_count(trained_run: TrainedRun) -> None:
    tmp = trained_run.tmp
    before = load_checkpoint(trained_run.last_ckpt)
    resumed = tmp / "resumed"
    run_script(
        "train.py",
        "+experiment=synthetic_maml",
        f"trainer.max_epochs={EPOCHS + 1}",
        f"ckpt_path={trained_run.last_ckpt}",
        f"hydra.run.dir={resumed}",
        "test=false",
        tmp=tmp,
    )
    after = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert after["epoch"] == before["epoch"] + 1
    steps_per_epoch = before["global_step"] // EPOCHS
    assert after["global_step"] == before["global_step"] + steps_per_epoch


@pytest.mark.slow  # ~13 s: one more train.py process (the debug=fdr config)
def test_fast_dev_run_debug_config(trained_run: TrainedRun) -> None:
    run_dir = trained_run.tmp / "fdr"  # a run folder of its own on the shared run's shards
    run_script(
        "train.py", "+experiment=synthetic_maml", "debug=fdr", f"hydra.run.dir={run_dir}", tmp=trained_run.tmp
    )
    recs = json.loads((run_dir / "cold_start_metrics.json").read_text())
    assert recs and all(r["tasks"] > 0 for r in recs)


def test_checkpoint_carries_the_vocabulary_for_serving(trained_run: TrainedRun) -> None:
    state = load_checkpoint(trained_run.last_ckpt)["TaskDataModule"]  # its state_dict, stored by Lightning
    assert state["vocab"] == read_vocab(trained_run.data_dir / "vocab.parquet")
    assert state["vocab_sha256"] == trained_run.manifest.data["vocab"]["sha256"]
    assert state["task_config"] == trained_run.manifest.data["task_config"]


def test_auto_adaptation_schedule_is_chosen_on_validation_and_stored_in_the_best_checkpoint(
    trained_run: TrainedRun,
) -> None:
    """adaptation=auto: per support-size bucket the best grid point that lowers no state's validation
    AUC, logged to adaptation_schedule.json and stored in the tested (best) checkpoint."""
    doc = json.loads((trained_run.run_dir / "adaptation_schedule.json").read_text())
    schedule = AdaptationSchedule.from_dict(doc["schedule"])
    assert schedule.bounds == [1, 5]
    assert load_checkpoint(trained_run.best_ckpt)[SCHEDULE_KEY] == doc["schedule"]
    for entry in schedule.entries:
        grid = [r for r in doc["grid"] if r["min_support"] == entry.min_support]
        assert len(grid) == 3  # no adaptation + 1 step x 2 lrs
        chosen = [r for r in grid if r["chosen"]]
        assert len(chosen) == 1 and chosen[0]["setting"] == entry.setting.label()
        base = next(r for r in grid if r["setting"] == "no adaptation")
        for state in STATES:
            if base.get(state) is not None:
                assert chosen[0][state] >= base[state], (entry, state)
        fair = [
            r
            for r in grid
            if all(r.get(s) is None or r[s] >= base[s] for s in STATES if base.get(s) is not None)
        ]
        assert chosen[0]["mean_auc"] == max(r["mean_auc"] for r in fair)
    # adaptation.per_state (the default): each state's own buckets, chosen by its own AUC alone
    assert schedule.by_state and set(schedule.by_state) <= set(STATES)
    for state, entries in schedule.by_state.items():
        assert [e.min_support for e in entries] == [1, 5]
        for entry in entries:
            grid = [r for r in doc["grid"] if r["min_support"] == entry.min_support]
            mine = [r for r in grid if state in r["chosen_for"]]
            assert len(mine) == 1 and mine[0]["setting"] == entry.setting.label()
            base = next(r for r in grid if r["setting"] == "no adaptation")
            fair = [r[state] for r in grid if r[state] is not None and r[state] >= base[state]]
            assert mine[0][state] == max(fair)


def test_compare_predictions_score_what_the_test_stage_reported(trained_run: TrainedRun) -> None:
    """scripts/compare.py's per-sample predictions (k = 0 and all) give the test table's AUCs."""
    import numpy as np
    from omegaconf import OmegaConf

    from gmeta.app import build_datamodule
    from gmeta.compare import ALL, bootstrap_aucs, collect_predictions
    from gmeta.meta.module import MetaDLRMModule
    from gmeta.parallel.sharded_checkpoint import load_lightning_module

    cfg = OmegaConf.load(trained_run.run_dir / "config_resolved.yaml")
    model, _ = load_lightning_module(MetaDLRMModule, trained_run.best_ckpt)
    assert model.learner.schedule is not None  # the run's adaptation=auto schedule travels along
    preds = collect_predictions(model, build_datamodule(cfg).test_dataloader(), [0, 2, None])
    aucs = bootstrap_aucs({"run": [preds]}, replicates=2)
    want = records_by_key(trained_run.run_dir / "cold_start_metrics.json")
    for state in STATES:
        for k, adapted in ((0, False), (ALL, True)):
            assert aucs[("run", state, k)][0] == pytest.approx(want[(state, adapted)]["auc"], abs=1e-5)
    counts = trained_run.manifest.data["counts"]["test"]
    assert len(preds.label) == sum(c["query"] for c in counts.values())
    assert not np.allclose(preds.logits[2], preds.logits[ALL])
