"""Adaptation per support size (gmeta.meta.schedule, schedule_search) and training episodes (episodes)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from tiny_tasks import random_batch

from gmeta.data.batch import truncate_support
from gmeta.errors import ConfigError
from gmeta.meta.adaptation import Adaptation, store_schedule
from gmeta.meta.config import MetaConfig
from gmeta.meta.episodes import drop_ids, drop_task_keys, truncate_episodes
from gmeta.meta.learner import MetaLearner
from gmeta.meta.schedule import SCHEDULE_KEY, AdaptationSchedule, InnerSetting, ScheduleEntry
from gmeta.meta.schedule_search import SearchSpace, choose
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingCollection

VOCAB = (7, 5, 9, 6)
SUPPORT = [0, 1, 2, 3, 4, 6, 9, 12]
BATCH = random_batch(3, SUPPORT, [4, 3, 5, 2, 4, 4, 3, 5], vocab_sizes=VOCAB)
ONE = InnerSetting(1, 0.5, ("top",))
THREE = InnerSetting(3, 0.2, ("bottom", "top"))
NONE = InnerSetting(0, 1.0, ())


def make_learner(seed: int = 0) -> tuple[EmbeddingCollection, MetaLearner]:
    torch.manual_seed(seed)
    emb = EmbeddingCollection(VOCAB, 2, 4, init_std=0.5).double()
    model = DLRM(len(VOCAB), 3, 4, bottom_mlp=(6,), top_mlp=(8,), interaction="dot").double()
    return emb, MetaLearner(model, MetaConfig("maml", inner_steps=2, inner_lr=0.3))


def test_buckets_by_support_size():
    schedule = AdaptationSchedule((ScheduleEntry(1, ONE), ScheduleEntry(3, NONE), ScheduleEntry(5, THREE)))
    got = schedule.bucket_of(torch.tensor(SUPPORT))
    assert got.tolist() == [-1, 0, 0, 1, 1, 2, 2, 2]
    assert AdaptationSchedule.from_dict(schedule.to_dict()) == schedule
    assert schedule.describe() == (
        "support 1-2: 1 x 0.5 on top; support 3-4: no adaptation; support >=5: 3 x 0.2 on bottom+top"
    )


@pytest.mark.parametrize("bounds", [[], [0, 2], [3, 3], [4, 2]])
def test_bad_bounds_are_refused(bounds):
    with pytest.raises(ConfigError, match="strictly increasing"):
        AdaptationSchedule(tuple(ScheduleEntry(b, ONE) for b in bounds))


def test_malformed_stored_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="malformed adaptation schedule"):
        AdaptationSchedule.from_dict({"entries": [{"min_support": 1, "lr": 0.1}]})
    with pytest.raises(ConfigError, match="groups"):
        InnerSetting(1, 0.1, ("middle",))


def test_scheduled_prediction_is_each_task_adapted_by_its_bucket_setting():
    emb, learner = make_learner()
    lk = emb.lookup(BATCH)
    schedule = AdaptationSchedule((ScheduleEntry(1, ONE), ScheduleEntry(3, NONE), ScheduleEntry(5, THREE)))
    learner.schedule = schedule
    got = learner.predict(BATCH, lk, adapted=True)
    want = {s: learner.predict_with(s, BATCH, lk) for s in (ONE, THREE, NONE)}
    plain = learner.predict(BATCH, lk, adapted=False)
    torch.testing.assert_close(want[NONE], plain)
    for t, n in enumerate(SUPPORT):
        expected = plain if n < 1 else want[ONE] if n < 3 else want[NONE] if n < 5 else want[THREE]
        torch.testing.assert_close(got[t], expected[t], rtol=0, atol=0)
    assert not torch.allclose(want[ONE], plain) and not torch.allclose(want[THREE], plain)


def test_a_state_with_its_own_buckets_uses_them_the_others_the_common_ones():
    emb, learner = make_learner()
    lk = emb.lookup(BATCH)
    states = torch.tensor([0, 1, 2, 3, 1, 1, 0, 3])  # STATES indices per task
    batch = dataclasses.replace(BATCH, state=states)
    common = (ScheduleEntry(1, ONE), ScheduleEntry(5, THREE))
    schedule = AdaptationSchedule(
        common, {"user_cold": (ScheduleEntry(2, THREE),), "warm": (ScheduleEntry(1, NONE),)}
    )
    assert AdaptationSchedule.from_dict(schedule.to_dict()) == schedule
    assert schedule.describe() == (
        "support 1-4: 1 x 0.5 on top; support >=5: 3 x 0.2 on bottom+top"
        " | user_cold: support >=2: 3 x 0.2 on bottom+top | warm: support >=1: no adaptation"
    )
    learner.schedule = schedule
    got = learner.predict(batch, lk, adapted=True)
    want = {s: learner.predict_with(s, batch, lk) for s in (ONE, THREE)}
    plain = learner.predict(batch, lk, adapted=False)
    for t, (n, state) in enumerate(zip(SUPPORT, states.tolist(), strict=True)):
        if state == 0 or n < 1:  # warm: never adapted; no support: nothing to adapt on
            expected = plain
        elif state == 1:  # user_cold: its own buckets
            expected = want[THREE] if n >= 2 else plain
        else:
            expected = want[ONE] if n < 5 else want[THREE]
        torch.testing.assert_close(got[t], expected[t], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="unknown state 'cold'"):
        AdaptationSchedule(common, {"cold": common})
    with pytest.raises(ConfigError, match="of state warm"):
        AdaptationSchedule(common, {"warm": ()})


def test_one_bucket_with_the_config_setting_equals_the_unscheduled_prediction():
    emb, learner = make_learner()
    lk = emb.lookup(BATCH)
    fixed = learner.predict(BATCH, lk, adapted=True)
    learner.schedule = AdaptationSchedule((ScheduleEntry(1, InnerSetting(2, 0.3, ("bottom", "top"))),))
    scheduled = learner.predict(BATCH, lk, adapted=True)
    adapted = torch.tensor(SUPPORT) > 0
    torch.testing.assert_close(scheduled[adapted], fixed[adapted], rtol=0, atol=0)
    # a task without support samples is scored at the shared weights
    torch.testing.assert_close(scheduled[~adapted], learner.predict(BATCH, lk, adapted=False)[~adapted])


def per_state(**aucs):
    return {s: {"auc": a} for s, a in aucs.items()}


def test_choose_takes_the_best_mean_that_hurts_no_state():
    base = (NONE, per_state(warm=0.70, user_cold=0.60))
    hurts = (ONE, per_state(warm=0.80, user_cold=0.59))  # best mean, but lowers user_cold
    helps = (THREE, per_state(warm=0.72, user_cold=0.61))
    assert choose([base, hurts, helps], tolerance=0.0) == (THREE, pytest.approx(0.665))
    assert choose([base, hurts, helps], tolerance=0.02)[0] == ONE
    assert choose([base, hurts], tolerance=0.0)[0] == NONE
    nan_state = (THREE, per_state(warm=0.71, user_cold=math.nan))
    assert choose([base, nan_state], tolerance=0.0)[0] == NONE


def test_search_chooses_each_states_buckets_by_its_own_auc(monkeypatch):
    """per_state: the common buckets by the mean over states (never hurting one), each state's by its
    own AUC; here ONE helps warm a lot and hurts user_cold a little, THREE the reverse."""
    import gmeta.meta.schedule_search as search

    emb, learner = make_learner()
    aucs = {NONE: (0.70, 0.60), ONE: (0.78, 0.59), THREE: (0.69, 0.62)}  # (warm, user_cold)
    space = SearchSpace(
        support_sizes=(1,), steps=(1, 3), lrs=(0.5, 0.2), groups=(("top",), ("bottom", "top"))
    )
    scored = iter(space.settings())  # the search makes one metrics object per grid point, in order

    class FakeMetrics:
        def __init__(self):
            self.setting = next(scored)

        def to(self, device):
            return self

        def update(self, *args):
            pass

        def compute(self):
            warm, cold = aucs.get(self.setting, aucs[NONE])
            return per_state(warm=warm, user_cold=cold)

    monkeypatch.setattr(search, "ColdStartMetrics", FakeMetrics)
    module = types.SimpleNamespace(
        training=False,
        eval=lambda: None,
        train=lambda mode: None,
        parameters=lambda: iter([torch.zeros(1)]),
        learner=learner,
        embedding=emb,
    )
    schedule, records = search.search_schedule(module, [], dataclasses.replace(space, per_state=True))
    assert schedule.entries == (ScheduleEntry(1, NONE),)  # ONE hurts user_cold, THREE hurts warm
    assert schedule.by_state == {"warm": (ScheduleEntry(1, ONE),), "user_cold": (ScheduleEntry(1, THREE),)}
    chosen_for = {r["setting"]: r["chosen_for"] for r in records if r["chosen_for"]}
    assert chosen_for == {ONE.label(): ["warm"], THREE.label(): ["user_cold"]}


def test_search_space_grid_and_validation():
    space = SearchSpace(steps=(0, 2), lrs=(0.1,), groups=(("top",),))
    assert space.settings() == [NONE, InnerSetting(2, 0.1, ("top",))]
    with pytest.raises(ConfigError, match="increasing"):
        SearchSpace(support_sizes=(3, 1))
    with pytest.raises(ConfigError, match="must not be empty"):
        SearchSpace(lrs=())


# -- training episodes -----------------------------------------------------------------------------


def test_truncated_episodes_keep_the_first_k_support_samples_of_a_share_of_tasks():
    sizes = (1, 2)
    out = truncate_episodes(BATCH, sizes, rate=0.5, seed="7", step=3)
    n_before, n_after = BATCH.support.mask.sum(1), out.support.mask.sum(1)
    changed = n_after < n_before
    assert changed.any() and not changed.all()
    for t in range(BATCH.num_tasks):
        k = int(n_after[t])
        if n_after[t] != n_before[t]:
            assert k in sizes
        torch.testing.assert_close(out.support.mask[t], truncate_support(BATCH, k).support.mask[t])
    assert out.query is BATCH.query and torch.equal(BATCH.support.mask.sum(1), n_before)
    # a draw per (seed, step, task id): the same wherever the task sits in a batch
    again = truncate_episodes(BATCH, sizes, rate=0.5, seed="7", step=3)
    assert torch.equal(again.support.mask, out.support.mask)
    assert truncate_episodes(BATCH, sizes, rate=0.0, seed="7", step=3) is BATCH
    full = truncate_episodes(BATCH, (1,), rate=1.0, seed="7", step=3)
    assert full.support.mask.sum(1).tolist() == [min(n, 1) for n in SUPPORT]


def test_episode_settings_are_validated():
    assert MetaConfig("maml", episode_support_sizes=[1, 3], episode_rate=0.5).episode_support_sizes == (1, 3)
    with pytest.raises(ConfigError, match="episode_support_sizes"):
        MetaConfig("maml", episode_rate=0.5)
    with pytest.raises(ConfigError, match="only applies to meta algorithms"):
        MetaConfig("none", episode_support_sizes=[1], episode_rate=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        MetaConfig("maml", episode_support_sizes=[1], episode_rate=1.5)


def test_dropped_ids_are_dropped_everywhere_in_the_step():
    batch = random_batch(5, [30] * 6, [20] * 6, vocab_sizes=(50, 5, 9, 6))
    before = batch.support.sparse[:, :, 0].clone(), batch.query.sparse[:, :, 0].clone()
    drop_ids(batch, column=0, rate=0.4, seed="1", step=2)
    after = batch.support.sparse[:, :, 0], batch.query.sparse[:, :, 0]
    ids = torch.cat([b.flatten() for b in before])
    kept = torch.cat([a.flatten() for a in after])
    dropped = set(ids[(kept == 0) & (ids != 0)].tolist())
    assert dropped and not (dropped & set(kept[kept != 0].tolist()))  # an id is dropped everywhere
    share = len(dropped) / len(set(ids.tolist()) - {0})
    assert 0.15 < share < 0.65
    assert torch.equal(
        batch.support.sparse[:, :, 1],
        random_batch(5, [30] * 6, [20] * 6, vocab_sizes=(50, 5, 9, 6)).support.sparse[:, :, 1],
    )


def test_task_keys_are_dropped_for_a_share_of_tasks_in_both_sets():
    batch = random_batch(6, [5] * 400, [3] * 400, vocab_sizes=(50, 5, 9, 6))
    batch.support.sparse[:, :, 0] = batch.query.sparse[:, :, 0] = 1 + torch.arange(400)[:, None] % 49
    drop_task_keys(batch, column=0, rate=0.3, seed="1", step=2)
    dropped = batch.support.sparse[:, 0, 0] == 0
    assert torch.equal(dropped[:, None].expand(-1, 5), batch.support.sparse[:, :, 0] == 0)
    assert torch.equal(dropped[:, None].expand(-1, 3), batch.query.sparse[:, :, 0] == 0)
    assert 0.22 < float(dropped.double().mean()) < 0.38
    again = random_batch(6, [5] * 400, [3] * 400, vocab_sizes=(50, 5, 9, 6))
    again.support.sparse[:, :, 0] = again.query.sparse[:, :, 0] = 1 + torch.arange(400)[:, None] % 49
    drop_task_keys(again, column=0, rate=0.3, seed="1", step=3)  # another step: other tasks
    assert not torch.equal(dropped, again.support.sparse[:, 0, 0] == 0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_compact_truncation_predicts_what_the_padded_one_does(k):
    emb, learner = make_learner()
    padded = truncate_support(BATCH, k)
    compact = truncate_support(BATCH, k, compact=True)
    assert compact.support.mask.shape[1] == min(k, max(SUPPORT)) < BATCH.support.mask.shape[1]
    assert torch.equal(compact.support.mask.sum(1), padded.support.mask.sum(1))
    want = learner.predict(padded, emb.lookup(BATCH), adapted=True)
    got = learner.predict(compact, emb.lookup(compact), adapted=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_adaptation_mode_is_validated_and_a_schedule_is_stored_in_a_checkpoint_file(tmp_path):
    with pytest.raises(ConfigError, match="adaptation.mode"):
        Adaptation(mode="sometimes")
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, path)
    schedule = AdaptationSchedule((ScheduleEntry(1, ONE), ScheduleEntry(4, THREE)))
    store_schedule(path, schedule)
    saved = torch.load(path, weights_only=False)
    assert saved["epoch"] == 3 and AdaptationSchedule.from_dict(saved[SCHEDULE_KEY]) == schedule
