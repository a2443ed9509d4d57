"""Few-shot adaptation (``gmeta.serving`` / ``gmeta adapt``) against the evaluation path.

The model is the session's shared training run (``trained_run``, tests/integration/conftest.py:
train.py on synthetic tasks), served from its last checkpoint and shards. The evaluation path
(``MetaDLRMModule._evaluate_batch`` over the test DataLoader) scores every test task; the same raw
interactions, fed through the serving API and the CLI, must give the same probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gmeta.cli import main as cli_main
from gmeta.data.datamodule import TaskDataModule
from gmeta.data.encoder import EncodingError, FeatureEncoder
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import TaskConfig, build_tasks
from gmeta.meta.module import MetaDLRMModule
from gmeta.serving import ServeError
from gmeta.serving.adapter import FewShotAdapter
from gmeta.serving.checkpoint import find_encoder
from gmeta.serving.inputs import fill_candidate_features
from helpers import TrainedRun, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6
ITEM_COLUMNS = ["item_id", "release_year", "genre", "year_norm"]
USER_COLUMNS = ["gender", "age", "occupation", "zip3"]


class _Recorder:
    """Stands in for a metric in ``_evaluate_batch``: keeps each real task's query probabilities."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, logits, label, mask, state, task_mask) -> None:  # noqa: ANN001 - metric signature
        self.batches.append((torch.sigmoid(logits).double(), mask, task_mask))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, trained_run: TrainedRun) -> dict:
    """The shared run's last checkpoint (in its run dir) and shards, read only; a copy without vocabulary."""
    tmp = tmp_path_factory.mktemp("serve")
    # a checkpoint outside any run dir and without the vocabulary TaskDataModule.state_dict stores
    # (older checkpoints, or vocabularies over MAX_VOCAB_IN_CHECKPOINT): no way to find its vocabulary
    bare = tmp / "bare.ckpt"
    raw = load_checkpoint(trained_run.last_ckpt)
    raw["TaskDataModule"].pop("vocab")
    torch.save(raw, bare)
    return {"tmp": tmp, "ckpt": trained_run.last_ckpt, "bare": bare, "data_dir": trained_run.data_dir}


@pytest.fixture(scope="module")
def eval_scores(trained: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """task_id -> (adapted, plain) query probabilities from the module's own evaluation path."""
    module = MetaDLRMModule.load_from_checkpoint(trained["ckpt"], map_location="cpu").eval()
    dm = TaskDataModule(trained["data_dir"], eval_batch_tasks=8)
    dm.setup("test")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for batch in dm.test_dataloader():
            rec = {"plain": _Recorder(), "adapted": _Recorder()}
            module._evaluate_batch(batch, rec)
            (a, mask, task_mask), (p, _, _) = rec["adapted"].batches[0], rec["plain"].batches[0]
            for t, task_id in enumerate(batch.task_ids):
                if bool(task_mask[t]):
                    n = int(mask[t].sum())
                    out[task_id] = (a[t, :n].numpy(), p[t, :n].numpy())
    return out


@pytest.fixture(scope="module")
def raw_tasks(run_table, run_splits) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(support, candidates): the raw rows of every test task, keyed by a ``task`` column (= task id)."""
    df, schema = run_table
    sup, cand = [], []
    for task_id, (s, q) in run_splits.rows["test"].items():
        sup.append(df.iloc[s].assign(task=task_id))
        cand.append(df.iloc[q].drop(columns=[schema.label, schema.time]).assign(task=task_id))
    return pd.concat(sup, ignore_index=True), pd.concat(cand, ignore_index=True)


@pytest.fixture(scope="module")
def adapter(trained: dict) -> FewShotAdapter:
    return FewShotAdapter.from_checkpoint(trained["ckpt"], data_dir=trained["data_dir"], batch_users=64)


@pytest.fixture(scope="module")
def full_scores(adapter, raw_tasks) -> pd.DataFrame:
    """Every test task scored by the API in one call."""
    support, candidates = raw_tasks
    return adapter.score(support, candidates, key="task")


def _by_task(scores: pd.DataFrame, column: str = "score") -> dict[str, np.ndarray]:
    return {k: g[column].to_numpy(dtype=np.float64) for k, g in scores.groupby("task", sort=False)}


def _max_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray], which: int) -> float:
    assert set(got) == set(want)
    return max(float(np.abs(got[k] - want[k][which]).max()) for k in want)


# -- equality with the evaluation path ---------------------------------------------------------------
def test_serve_equals_evaluation_path(full_scores, raw_tasks, eval_scores) -> None:
    _, candidates = raw_tasks
    scores = full_scores
    assert len(scores) == len(candidates)
    assert (scores["task"].to_numpy() == candidates["task"].to_numpy()).all()  # input order
    assert (scores["item_id"].to_numpy() == candidates["item_id"].astype(str).to_numpy()).all()
    adapted, plain = (
        _max_diff(_by_task(scores), eval_scores, 0),
        _max_diff(_by_task(scores, "score_plain"), eval_scores, 1),
    )
    print(
        f"\nmax |serve - eval| over {len(scores)} candidates of {len(eval_scores)} test tasks: adapted {adapted:.2e}, plain {plain:.2e}"
    )
    assert adapted <= TOL and plain <= TOL
    # the inner loop really ran: adaptation moved the scores
    assert float((scores["score"] - scores["score_plain"]).abs().max()) > 1e-3
    assert scores["adapted"].all()
    ranks = scores.groupby("task")["rank"].apply(lambda r: sorted(r.tolist()))
    assert all(r == list(range(1, len(r) + 1)) for r in ranks)


def test_user_known_follows_the_training_vocabulary(full_scores) -> None:
    scores = full_scores
    state = scores["task"].str.split("/").str[1]
    # new users never appear in training: their id is the OOV row; warm users have a trained row
    assert not scores.loc[state.isin(["user_cold", "user_item_cold"]), "user_known"].any()
    assert scores.loc[state == "warm", "user_known"].all()


def test_batching_many_users_equals_one_at_a_time(trained, raw_tasks, adapter) -> None:
    support, candidates = raw_tasks
    keys = candidates["task"].unique()[:12]
    sup, cand = support[support.task.isin(keys)], candidates[candidates.task.isin(keys)]
    together = adapter.score(sup, cand, key="task")
    one = FewShotAdapter(adapter.module, adapter.encoder, batch_users=1).score(sup, cand, key="task")
    np.testing.assert_allclose(together["score"], one["score"], atol=TOL, rtol=0)
    np.testing.assert_allclose(together["score_plain"], one["score_plain"], atol=TOL, rtol=0)


def test_support_row_order_and_extra_columns_do_not_matter(adapter, raw_tasks, eval_scores) -> None:
    support, candidates = raw_tasks
    shuffled = support.sample(frac=1.0, random_state=0).assign(comment="ignored")
    scores = adapter.score(shuffled, candidates.assign(title="ignored"), key="task")
    assert _max_diff(_by_task(scores), eval_scores, 0) <= TOL


def test_cli_equals_evaluation_path(tmp_path, trained, raw_tasks, eval_scores) -> None:
    support, candidates = raw_tasks
    support.to_csv(tmp_path / "support.csv", index=False)
    candidates.to_csv(tmp_path / "candidates.csv", index=False)
    out = tmp_path / "scores.csv"
    rc = cli_main(
        [
            "adapt",
            f"--ckpt={trained['ckpt']}",
            f"--support={tmp_path / 'support.csv'}",
            f"--candidates={tmp_path / 'candidates.csv'}",
            f"--data-dir={trained['data_dir']}",
            "--key=task",
            f"--out={out}",
        ]
    )
    assert rc == 0
    scores = pd.read_csv(out, dtype={"task": str, "item_id": str})
    assert list(scores.columns) == [
        "task",
        "item_id",
        "score",
        "score_plain",
        "rank",
        "support_size",
        "adapted",
        "user_known",
    ]
    assert _max_diff(_by_task(scores), eval_scores, 0) <= TOL
    assert _max_diff(_by_task(scores, "score_plain"), eval_scores, 1) <= TOL


def test_console_script_with_item_table_user_columns_and_run_dir(
    tmp_path, trained, run_table, raw_tasks, eval_scores
):
    """``python -m gmeta.cli adapt`` as a user runs it: JSON inputs, candidates of only (task, user, item),
    features joined from an item table and the support rows, vocabulary found via the run dir."""
    df, _ = run_table
    support, candidates = raw_tasks
    support.to_json(tmp_path / "support.json", orient="records")
    candidates[["task", "user_id", "item_id"]].to_csv(tmp_path / "candidates.csv", index=False)
    df[ITEM_COLUMNS].drop_duplicates("item_id").to_csv(tmp_path / "items.csv", index=False)
    cmd = [
        sys.executable,
        "-m",
        "gmeta.cli",
        "adapt",
        "--ckpt",
        str(trained["ckpt"]),
        "--support",
        str(tmp_path / "support.json"),
        "--candidates",
        str(tmp_path / "candidates.csv"),
        "--items",
        str(tmp_path / "items.csv"),
        "--user-columns",
        ",".join(USER_COLUMNS),
        "--key",
        "task",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = pd.read_csv(pd.io.common.StringIO(proc.stdout), dtype={"task": str})
    assert _max_diff(_by_task(scores), eval_scores, 0) <= TOL
    assert f"scored {len(candidates)} candidates for {len(eval_scores)} user(s)" in proc.stderr


def test_vocabulary_stored_in_the_checkpoint_is_used(tmp_path, trained, adapter, raw_tasks) -> None:
    """A checkpoint carrying its data module's vocabulary needs no data dir (and no run dir)."""
    shutil.copy(trained["ckpt"], tmp_path / "with_vocab.ckpt")  # as Lightning saved it
    own = FewShotAdapter.from_checkpoint(tmp_path / "with_vocab.ckpt")
    assert own.encoder.origin == "checkpoint['TaskDataModule']"
    assert own.encoder == adapter.encoder  # the checkpoint's encoder is the shard folder's
    support, candidates = raw_tasks
    keys = candidates["task"].unique()[:5]
    sup, cand = support[support.task.isin(keys)], candidates[candidates.task.isin(keys)]
    pd.testing.assert_frame_equal(own.score(sup, cand, key="task"), adapter.score(sup, cand, key="task"))


# -- encoding: value for value what training wrote -----------------------------------------------
def _assert_encodes_like_training(df: pd.DataFrame, splits, threshold: float | None) -> None:
    enc = FeatureEncoder(splits.schema, splits.vocabs, threshold, None, "test")  # as serving rebuilds it
    got = enc.encode(df, key=splits.schema.task_key, name="table", with_label=True)  # all rows at once
    for split in ("train", "test"):
        records = {r.task_id: r for r in splits.split(split)}
        for task_id, (s, q) in splits.rows[split].items():
            for which, rows in (("support", s), ("query", q)):
                for name in ("sparse", "multi_hot", "dense", "label"):
                    np.testing.assert_array_equal(
                        getattr(got, name)[rows],
                        records[task_id].arrays[f"{which}.{name}"],
                        err_msg=f"{task_id} {which}.{name}",
                    )


def test_encoding_matches_the_training_records(ml_table, small_splits) -> None:
    """Sparse (incl. OOV for cold users/items), multi-hot, dense and thresholded labels."""
    df, _ = ml_table
    _assert_encodes_like_training(df, small_splits, 4.0)


def test_encoding_matches_training_for_hashed_fields() -> None:
    df, schema = SyntheticSource(
        schema="criteo", num_users=20, num_items=40, vocab_sizes=30, hash_buckets=16, min_interactions=14
    ).load()
    cfg = TaskConfig(
        label_threshold=0.5, query_size=4, new_user_quantile=None, new_item_rule=None, item_key=None
    )
    splits = build_tasks(df, schema, cfg)
    assert all(f.hash_buckets == 16 for f in splits.schema.sparse)
    _assert_encodes_like_training(df, splits, 0.5)


def test_multi_hot_json_lists_equal_joined_strings(adapter, raw_tasks) -> None:
    support, candidates = raw_tasks
    key = candidates["task"].iloc[0]
    sup, cand = support[support.task == key], candidates[candidates.task == key]
    as_lists = cand.assign(genre=[g.split(" ") for g in cand["genre"]])
    pd.testing.assert_frame_equal(
        adapter.score(sup, as_lists, key="task"), adapter.score(sup, cand, key="task")
    )


# -- special cases ---------------------------------------------------------------------------------
def test_user_without_support_gets_the_plain_score_flagged(adapter, raw_tasks) -> None:
    support, candidates = raw_tasks
    keys = candidates["task"].unique()[:3]
    cand = candidates[candidates.task.isin(keys)]
    sup = support[support.task.isin(keys[1:])]  # the first user has no support rows
    scores = adapter.score(sup, cand, key="task")
    first = scores["task"] == keys[0]
    assert not scores.loc[first, "adapted"].any() and (scores.loc[first, "support_size"] == 0).all()
    np.testing.assert_array_equal(scores.loc[first, "score"], scores.loc[first, "score_plain"])
    alone = adapter.score(sup, cand[cand.task != keys[0]], key="task")
    np.testing.assert_allclose(scores.loc[~first, "score"], alone["score"], atol=TOL, rtol=0)


def test_unseen_ids_map_to_the_oov_row(adapter, raw_tasks) -> None:
    support, candidates = raw_tasks
    key = candidates["task"].iloc[0]
    sup, cand = support[support.task == key], candidates[candidates.task == key].head(2)
    a = adapter.score(sup, cand.assign(item_id=["never-seen-1", "never-seen-1"]), key="task")
    b = adapter.score(sup, cand.assign(item_id=["never-seen-2", "never-seen-2"]), key="task")
    np.testing.assert_array_equal(a["score"], b["score"])  # both ids are row 0
    c = adapter.score(sup, cand, key="task")
    assert not np.allclose(a["score"], c["score"])


# -- input errors ----------------------------------------------------------------------------------
def _one_task(raw_tasks) -> tuple[pd.DataFrame, pd.DataFrame]:
    support, candidates = raw_tasks
    key = candidates["task"].iloc[0]
    return support[support.task == key].reset_index(drop=True), candidates[
        candidates.task == key
    ].reset_index(drop=True)


def test_missing_candidate_column_names_file_and_column(adapter, raw_tasks) -> None:
    sup, cand = _one_task(raw_tasks)
    with pytest.raises(ServeError, match=r"cands\.csv: missing column\(s\) \['genre'\].*--items"):
        adapter.score(sup, cand.drop(columns=["genre"]), key="task", names=("sup.csv", "cands.csv"))


def test_missing_support_label_column(adapter, raw_tasks) -> None:
    sup, cand = _one_task(raw_tasks)
    with pytest.raises(ServeError, match=r"sup\.csv: missing column\(s\) \['rating'\]"):
        adapter.score(sup.drop(columns=["rating"]), cand, key="task", names=("sup.csv", "cands.csv"))


def test_nan_label_names_row_user_and_column(adapter, raw_tasks) -> None:
    sup, cand = _one_task(raw_tasks)
    sup.loc[3, "rating"] = np.nan
    task = sup.loc[3, "task"]
    with pytest.raises(
        EncodingError, match=rf"sup\.csv: row 3 \(task='{task}'\), column 'rating': label nan is missing"
    ):
        adapter.score(sup, cand, key="task", names=("sup.csv", "cands.csv"))


def test_labels_must_be_binary_without_threshold(adapter, raw_tasks) -> None:
    sup, cand = _one_task(raw_tasks)
    strict = FewShotAdapter(adapter.module, dataclasses.replace(adapter.encoder, label_threshold=None))
    with pytest.raises(EncodingError, match=r"row 0 .*column 'rating': label \d\.0 is not 0/1"):
        strict.score(sup, cand, key="task")
    scores = strict.score(sup.assign(rating=(sup.rating >= 4).astype(float)), cand, key="task")
    np.testing.assert_allclose(
        scores["score"], adapter.score(sup, cand, key="task")["score"], atol=TOL, rtol=0
    )


def test_bad_ids_and_values_are_reported(adapter, raw_tasks) -> None:
    sup, cand = _one_task(raw_tasks)
    bad = cand.copy()
    bad.loc[1, "item_id"] = None
    with pytest.raises(EncodingError, match=r"candidates: row 1 \(task=.*\), column 'item_id': missing id"):
        adapter.score(sup, bad, key="task")
    bad = cand.copy()
    bad["year_norm"] = bad["year_norm"].astype(object)
    bad.loc[2, "year_norm"] = "soon"
    with pytest.raises(EncodingError, match=r"candidates: row 2 .*column 'year_norm': dense value 'soon'"):
        adapter.score(sup, bad, key="task")
    bad = cand.copy()
    bad.loc[0, "genre"] = " ".join(f"g{i}" for i in range(7))
    with pytest.raises(
        EncodingError, match=r"candidates: row 0 .*column 'genre': 7 ids, more than max_len=6"
    ):
        adapter.score(sup, bad, key="task")
    bad = sup.copy().astype({"timestamp": object})
    bad.loc[4, "timestamp"] = "yesterday"
    with pytest.raises(ServeError, match=r"support: row 4 .*column 'timestamp'"):
        adapter.score(bad, cand, key="task")


def test_fill_candidate_features_errors(adapter, run_table, raw_tasks) -> None:
    df, schema = run_table
    sup, cand = _one_task(raw_tasks)
    items = df[ITEM_COLUMNS].drop_duplicates("item_id")
    slim = cand[["task", "user_id", "item_id"]].copy()
    filled = fill_candidate_features(slim, sup, schema, "task", items, "item_id", USER_COLUMNS)
    pd.testing.assert_frame_equal(filled[cand.columns], cand, check_dtype=False)
    slim.loc[1, "item_id"] = "no-such-item"
    with pytest.raises(ServeError, match=r"row 1 \(task=.*\): item 'no-such-item' is not in the item table"):
        fill_candidate_features(slim, sup, schema, "task", items, "item_id", USER_COLUMNS)
    mixed = sup.copy()
    mixed.loc[0, "gender"] = "X" if mixed.loc[1, "gender"] != "X" else "Y"
    with pytest.raises(ServeError, match=r"user column 'gender' has several values"):
        fill_candidate_features(cand[["task", "item_id"]], mixed, schema, "task", None, "item_id", ["gender"])


def test_no_vocabulary_anywhere_is_a_clear_error(trained) -> None:
    with pytest.raises(ServeError, match=r"no vocabulary found for checkpoint .*bare\.ckpt.*--data-dir"):
        FewShotAdapter.from_checkpoint(trained["bare"])


def test_shards_of_another_build_are_rejected(tmp_path, trained, adapter) -> None:
    manifest = json.loads((trained["data_dir"] / "manifest.json").read_text())
    manifest["schema"]["fields"][1]["vocab_size"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(trained["data_dir"] / "vocab.parquet", tmp_path / "vocab.parquet")
    with pytest.raises(ServeError, match=r"schema .* differs from the checkpoint's"):
        find_encoder(adapter.schema, data_dir=tmp_path)


def test_cli_reports_input_errors_with_exit_status_2(tmp_path, trained, raw_tasks, capsys) -> None:
    sup, cand = _one_task(raw_tasks)
    sup.drop(columns=["rating"]).to_csv(tmp_path / "s.csv", index=False)
    cand.to_csv(tmp_path / "c.csv", index=False)
    argv = ["adapt", "--ckpt", str(trained["ckpt"]), "--support", str(tmp_path / "s.csv")]
    rc = cli_main([*argv, "--candidates", str(tmp_path / "c.csv"), "--key", "task"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gmeta adapt: error:" in err and "s.csv: missing column(s) ['rating']" in err
    assert cli_main([*argv, "--candidates", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err
