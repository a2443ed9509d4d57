"""Hydra configs under conf/: every option composes, resolves and instantiates what the app expects.

Nothing here touches the data directory: ``prepare_data`` is never called, and the instantiation test
points ``PROJECT_ROOT`` at an empty temporary folder and checks that it stays empty.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gmeta.app import build_trainer
from gmeta.data.datamodule import TaskDataModule
from gmeta.data.schema import FieldSpec, Schema
from gmeta.data.sources.movielens import MovieLensSource
from gmeta.data.sources.synthetic import SyntheticSource
from gmeta.data.tasks import TaskConfig
from gmeta.errors import ConfigError
from gmeta.meta.config import ALGORITHMS, META_ALGORITHMS, MetaConfig
from gmeta.meta.module import EVAL_MODES, MetaDLRMModule, generator_spec
from gmeta.model.dlrm import GeneratorSpec
from gmeta.parallel import HybridParallelStrategy

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
os.environ.setdefault("PROJECT_ROOT", str(REPO))

META_OPTIONS = ("maml", "fomaml", "anil", "none")
DATA_OPTIONS = ("movielens1m", "synthetic", "synthetic_criteo")
EXPERIMENTS = {  # name -> (meta.name, data source target, data_dir leaf)
    "movielens_maml": ("maml", "gmeta.data.sources.movielens.MovieLensSource", "movielens1m"),
    "movielens_plain": ("none", "gmeta.data.sources.movielens.MovieLensSource", "movielens1m"),
    "synthetic_maml": ("maml", "gmeta.data.sources.synthetic.SyntheticSource", "synthetic"),
}


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture(autouse=True)
def _restore_hydra_config():
    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def train_cfg(*overrides: str) -> DictConfig:
    return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def resolve_all(cfg: DictConfig, output_dir: Path) -> dict:
    """Resolve every interpolation outside ``hydra`` as a run would (``hydra:`` resolver included)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    plain = {k: v for k, v in cfg.items() if k != "hydra"}
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True, throw_on_missing=True)


def small_schema() -> Schema:
    return Schema(
        task_key="user_id",
        label="rating",
        time="timestamp",
        fields=(
            FieldSpec("item_id", "sparse", vocab_size=11),
            FieldSpec("gender", "sparse", vocab_size=3),
            FieldSpec("genre", "multi_hot", vocab_size=7, max_len=4),
            FieldSpec("year_norm", "dense"),
        ),
    )


# -- the default composition ---------------------------------------------------------------------


def test_train_defaults(tmp_path) -> None:
    cfg = train_cfg()
    choices = cfg.hydra.runtime.choices
    assert [choices.data, choices.model, choices.meta, choices.cluster] == [
        "movielens1m",
        "meta_dlrm",
        "maml",
        "cpu",
    ]
    assert choices.debug is None and "experiment" not in choices
    assert cfg.task_name == "train" and cfg.train is True and cfg.test is True and cfg.ckpt_path is None
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.inference_mode is False  # the evaluation inner loop needs autograd
    assert cfg.trainer.fast_dev_run is False
    assert set(cfg.logger) == {"csv", "tensorboard"}
    assert set(cfg.callbacks) == {
        "model_checkpoint",
        "last_checkpoint",
        "stop_on_signal",
        "model_summary",
        "progress_bar",
    }
    # the checkpoint monitor is the metric the module logs (mean AUC over states of the adapted mode)
    adapted_mode = next(mode for mode, adapted in EVAL_MODES if adapted)
    assert cfg.callbacks.model_checkpoint.monitor == f"val/auc_{adapted_mode}"
    assert cfg.callbacks.model_checkpoint.mode == "max"

    c = resolve_all(cfg, tmp_path / "run")
    assert c["paths"]["root_dir"] == os.environ["PROJECT_ROOT"]
    assert c["paths"]["output_dir"] == str(tmp_path / "run")
    assert c["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert c["callbacks"]["model_checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")
    assert c["logger"]["csv"]["save_dir"] == str(tmp_path / "run")
    assert c["data"]["seed"] == c["seed"] == 42


# -- every option of every group -----------------------------------------------------------------


@pytest.mark.parametrize("name", META_OPTIONS)
def test_meta_options(name: str, tmp_path) -> None:
    cfg = train_cfg(f"meta={name}")
    meta = OmegaConf.to_container(cfg.meta, resolve=True)
    assert meta["name"] == name
    assert set(meta) == {
        "name",
        "inner_steps",
        "inner_lr",
        "adapt_groups",
        "adapt_embeddings",
        "first_order",
        "support_loss_weight",
        "backend",
        "episode_support_sizes",
        "episode_rate",
        "adapt_embedding_fields",
        "learn_inner_lr",
    }
    assert meta["backend"] == "fast"
    assert meta["support_loss_weight"] == 0.0  # pure MAML unless an experiment asks for more
    # the settings that define an algorithm come from one place (gmeta.meta.config.ALGORITHMS)
    assert meta["first_order"] is None and meta["adapt_groups"] is None
    assert (meta["inner_steps"], meta["inner_lr"], meta["adapt_embeddings"]) == (1, 0.1, False)
    built = MetaConfig(**meta)
    assert built.first_order is (name == "fomaml")
    assert built.adapt_groups == ALGORITHMS[name].adapt_groups
    assert built.name in META_ALGORITHMS
    # the yaml option encodes the same algorithm as the Python per-name defaults
    assert built == MetaConfig(name, inner_steps=1, inner_lr=0.1)
    resolve_all(cfg, tmp_path)


@pytest.mark.parametrize("name", DATA_OPTIONS)
def test_data_options(name: str, tmp_path) -> None:
    cfg = train_cfg(f"data={name}")
    assert cfg.hydra.runtime.choices.data == name
    assert cfg.data._target_ == "gmeta.data.datamodule.TaskDataModule"
    assert cfg.data.task_config._target_ == "gmeta.data.tasks.TaskConfig"
    c = resolve_all(cfg, tmp_path)
    assert c["data"]["data_dir"] == f"{os.environ['PROJECT_ROOT']}/data/{name}/shards"
    expected_source = {
        "movielens1m": "gmeta.data.sources.movielens.MovieLensSource",
        "synthetic": "gmeta.data.sources.synthetic.SyntheticSource",
        "synthetic_criteo": "gmeta.data.sources.synthetic.SyntheticSource",
    }[name]
    assert c["data"]["source"]["_target_"] == expected_source


@pytest.mark.parametrize("name", DATA_OPTIONS)
def test_data_instantiates_without_touching_disk(name: str, tmp_path, monkeypatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("PROJECT_ROOT", str(root))
    cfg = train_cfg(f"data={name}", "seed=7")
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, TaskDataModule)
    assert dm.data_dir == root / "data" / name / "shards"
    assert dm.seed == 7 and dm.build_seed == 0
    assert (dm.batch_tasks, dm.eval_batch_tasks, dm.tasks_per_shard) == (
        cfg.data.batch_tasks,
        cfg.data.eval_batch_tasks,
        cfg.data.tasks_per_shard,
    )
    assert isinstance(dm.task_config, TaskConfig)
    assert dm.task_config.query_size == cfg.data.task_config.query_size
    if name == "movielens1m":
        assert isinstance(dm.source, MovieLensSource)
        assert dm.source.root == root / ".cache" / "movielens"
        assert dm.task_config.new_item_rule == {"column": "release_year", "min_value": 1998}
        assert isinstance(dm.task_config.new_item_rule, dict)  # _convert_="all": no DictConfig inside
    else:
        assert isinstance(dm.source, SyntheticSource)
        assert dm.source.schema == ("criteo" if name == "synthetic_criteo" else "movielens")
        assert dm.source.num_users == cfg.data.source.num_users
    assert dm.manifest is None and dm.schema is None
    assert list(root.iterdir()) == []  # nothing created, nothing fetched


#: cluster option -> (accelerator, devices, nodes, HybridParallelStrategy backend or None, timeout s)
CLUSTERS = {
    "cpu": ("cpu", 1, 1, None, None),
    "gpu": ("gpu", 1, 1, None, None),
    "ddp_cpu": ("cpu", 2, 1, "gloo", 600),
    "multi_gpu": ("gpu", -1, 1, "nccl", 600),
    "slurm": ("gpu", 8, 2, "nccl", 1800),  # launcher settings: tests/integration/test_slurm.py
    "slurm_cpu": ("cpu", 2, 1, "gloo", 600),
}


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_cluster_options(name: str) -> None:
    accelerator, devices, nodes, backend, timeout_s = CLUSTERS[name]
    cfg = train_cfg(f"cluster={name}")
    assert cfg.trainer.accelerator == accelerator
    assert cfg.trainer.devices == devices
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"  # merged into, not replacing, the trainer
    if backend is None:
        assert "strategy" not in cfg.trainer
        return
    strategy = instantiate(cfg.trainer.strategy)  # builds the object only: no process is started
    assert isinstance(strategy, HybridParallelStrategy)
    assert strategy.process_group_backend == backend
    assert strategy._timeout.total_seconds() == cfg.trainer.strategy.collective_timeout_s == timeout_s
    assert cfg.trainer.num_nodes == nodes
    # ddp_cpu and slurm_cpu reproduce cluster=cpu's meta-batches; the GPU clusters read their own shards per rank
    assert cfg.data.rank_split == ("batches" if name in ("ddp_cpu", "slurm_cpu") else "shards")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiments(name: str, tmp_path) -> None:
    meta_name, source_target, data_leaf = EXPERIMENTS[name]
    cfg = train_cfg(f"+experiment={name}")
    assert cfg.meta.name == meta_name
    assert cfg.data.source._target_ == source_target
    assert cfg.hydra.runtime.choices.data == data_leaf
    assert cfg.task_name == name
    assert cfg.trainer.max_epochs > 1
    MetaConfig(**OmegaConf.to_container(cfg.meta, resolve=True))
    resolve_all(cfg, tmp_path)
    # a command-line override still wins over the experiment's defaults
    cfg = train_cfg(f"+experiment={name}", "meta=anil", "trainer.max_epochs=1")
    assert cfg.meta.name == "anil" and cfg.trainer.max_epochs == 1
    assert cfg.data.source._target_ == source_target


def test_movielens_experiments_train_on_the_heavy_users_windows_in_their_own_folder(tmp_path) -> None:
    """The experiments build train_window shards apart from data=movielens1m's (drop, the MeLU
    protocol): a policy is part of a build, and one folder cannot hold both."""
    default = resolve_all(train_cfg("data=movielens1m"), tmp_path)["data"]
    assert default["task_config"]["max_interactions_policy"] == "drop"
    for name in ("movielens_maml", "movielens_plain"):
        data = resolve_all(train_cfg(f"+experiment={name}"), tmp_path)["data"]
        assert data["task_config"]["max_interactions_policy"] == "train_window"
        assert data["data_dir"].endswith("movielens1m_train_window/shards")
        assert data["data_dir"] != default["data_dir"]


def test_debug_fdr() -> None:
    cfg = train_cfg("debug=fdr")
    assert cfg.trainer.fast_dev_run is True
    assert cfg.task_name == "debug"
    assert set(cfg.logger) == {"csv"}
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_debug_default() -> None:
    base = train_cfg()
    cfg = train_cfg("debug=default")
    assert cfg.task_name == "debug"
    assert cfg.trainer.max_epochs == 1
    limits = [cfg.trainer[f"limit_{split}_batches"] for split in ("train", "val", "test")]
    assert limits == [5, 2, 2]
    assert cfg.trainer.fast_dev_run is False
    assert cfg.logger == base.logger


# -- trainer ----------------------------------------------------------------------------------------


def trainer_of(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    """``build_trainer`` as train.py calls it, with the run's folder at ``output_dir``."""
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return build_trainer(cfg)


def test_trainer_keys_are_trainer_arguments() -> None:
    """A misspelt key would reach Lightning only as an instantiate error at run time."""
    keys = set(train_cfg().trainer) - {"_target_"}
    assert keys <= set(inspect.signature(L.Trainer.__init__).parameters), keys


def test_trainer_arguments_override_without_plus_and_reach_the_trainer(tmp_path) -> None:
    cfg = train_cfg(
        "logger=csv",
        "trainer.max_steps=7",
        "trainer.min_steps=2",
        "trainer.max_epochs=3",
        "trainer.min_epochs=2",
        "trainer.max_time=00:01:00:00",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=3",
        "trainer.limit_test_batches=0",
        "trainer.val_check_interval=4",
        "trainer.check_val_every_n_epoch=null",
        "trainer.num_sanity_val_steps=1",
        "trainer.log_every_n_steps=3",
        "trainer.precision=bf16-mixed",
        "trainer.gradient_clip_val=null",
        "trainer.accumulate_grad_batches=1",
        "trainer.benchmark=false",
        "trainer.detect_anomaly=true",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.enable_checkpointing=false",
        "trainer.profiler=simple",
    )
    t = trainer_of(cfg, tmp_path / "run")
    assert (t.max_steps, t.min_steps, t.max_epochs, t.min_epochs) == (7, 2, 3, 2)
    timer = next(c for c in t.callbacks if type(c).__name__ == "Timer")
    assert timer._duration == 3600
    assert (t.limit_train_batches, t.limit_val_batches, t.limit_test_batches) == (5, 3, 0)
    assert (t.val_check_interval, t.check_val_every_n_epoch) == (4, None)
    assert (t.num_sanity_val_steps, t.log_every_n_steps) == (1, 3)
    assert t.precision == "bf16-mixed" and t.accumulate_grad_batches == 1 and t.gradient_clip_val is None
    assert t._detect_anomaly is True and type(t.profiler).__name__ == "SimpleProfiler"
    # the switched-off callbacks of conf/callbacks/default.yaml are left out, not refused by Lightning
    assert t.progress_bar_callback is None and not t.checkpoint_callbacks
    assert not [c for c in t.callbacks if "ModelSummary" in type(c).__name__]
    assert t.default_root_dir == str(tmp_path / "run")

    t = trainer_of(train_cfg("trainer.fast_dev_run=2"), tmp_path / "fdr")
    assert t.fast_dev_run == 2 and t.limit_train_batches == 2 and t.max_steps == 2
    t = trainer_of(train_cfg(), tmp_path / "defaults")  # every callback of the default config kept
    assert t.progress_bar_callback is not None and len(t.checkpoint_callbacks) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.gradient_clip_val=0.5", "trainer.gradient_clip_val=0.5: gradient clipping is not"),
        ("trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4: gradient accumulation"),
        ("trainer.limit_train_batches=0.5", "trainer.limit_train_batches=0.5: the task stream has no length"),
        ("trainer.limit_test_batches=0.1", "trainer.limit_test_batches=0.1: the task stream has no length"),
        ("trainer.val_check_interval=0.25", "trainer.val_check_interval=0.25: the task stream has no length"),
        ("trainer.precision=fp8", "trainer: Precision 'fp8' is invalid"),  # Lightning's own check
        ("trainer.profiler=fancy", "trainer: When passing string value for the `profiler`"),
    ],
)
def test_trainer_arguments_this_module_cannot_honour_are_config_errors(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        trainer_of(train_cfg(override), tmp_path)


def test_trainer_arguments_not_listed_still_need_plus(tmp_path) -> None:
    with pytest.raises(ConfigCompositionException, match="overfit_batches"):
        train_cfg("trainer.overfit_batches=2")
    assert trainer_of(train_cfg("+trainer.overfit_batches=2"), tmp_path).overfit_batches == 2


def test_callbacks_and_logger_options() -> None:
    assert not train_cfg("callbacks=none").callbacks
    assert set(train_cfg("logger=csv").logger) == {"csv"}


# -- model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta_name", META_OPTIONS)
def test_model_instantiates(meta_name: str) -> None:
    cfg = train_cfg(f"meta={meta_name}")
    schema = small_schema()
    meta = OmegaConf.to_container(cfg.meta, resolve=True)
    # as gmeta.app.train does
    model = instantiate(cfg.model, schema=schema.to_dict(), meta=meta)
    assert isinstance(model, MetaDLRMModule)
    assert model.meta_config == MetaConfig(**meta)
    assert model.meta_config.name == meta_name
    assert model.schema == schema
    assert model.embedding.vocab_sizes == (11, 3, 7)
    assert model.embedding.field_names == ("item_id", "gender", "genre")
    assert model.embedding.num_sparse == 2
    assert model.embedding.dim == cfg.model.embedding_dim == 16
    assert type(model.embedding.optimizer).__name__ == "RowWiseAdagrad"
    assert model.dlrm.num_fields == 3 and model.dlrm.num_dense == 1
    assert model.dlrm.interaction == cfg.model.interaction
    assert model.dense_optimizer_config == {"lr": 0.001, "weight_decay": 0.0}
    optimizer = model.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == 0.001
    assert model.hparams.meta == meta  # saved for load_from_checkpoint


def test_model_id_bias_widens_the_table_by_one_column() -> None:
    cfg = train_cfg("model.id_bias=true")
    meta = OmegaConf.to_container(cfg.meta, resolve=True)
    model = instantiate(cfg.model, schema=small_schema().to_dict(), meta=meta)
    assert model.dlrm.id_bias and model.dlrm.dim == cfg.model.embedding_dim == 16
    assert model.embedding.dim == model.dlrm.row_dim == 17
    assert not train_cfg().model.id_bias  # off by default


def test_model_id_generator_resolves_field_names() -> None:
    cfg = train_cfg("model.id_generator={field: item_id, from: [genre, gender], hidden: [8]}")
    meta = OmegaConf.to_container(cfg.meta, resolve=True)
    model = instantiate(cfg.model, schema=small_schema().to_dict(), meta=meta)
    # id fields: item_id, gender, genre (sparse, then multi-hot)
    assert model.dlrm.generator_spec == GeneratorSpec(target=0, sources=(2, 1), hidden=(8,))
    assert [n for n, _ in model.dlrm.generator.named_parameters()] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    assert model.dlrm.generator[0].in_features == 2 * 16 and model.dlrm.generator[2].out_features == 16
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.dlrm.generator.parameters())  # trained with the towers
    assert generator_spec({"field": "item_id", "from": ["genre"]}, ["item_id", "genre"]) == GeneratorSpec(
        0, (1,)
    )
    assert train_cfg().model.id_generator is None  # off by default
    for bad, match in [
        ({"field": "item_id", "from": ["title"]}, r"\['title'\] are not id fields"),
        ({"field": "item_id", "from": ["item_id"]}, "distinct fields"),
        ({"field": "item_id"}, "must be"),
        ({"field": "item_id", "from": ["genre"], "layers": [3]}, "must be"),
    ]:
        with pytest.raises(ConfigError, match=match):
            generator_spec(bad, ["item_id", "gender", "genre"])


# -- eval --------------------------------------------------------------------------------------------


def test_eval_config(tmp_path) -> None:
    cfg = compose(config_name="eval", overrides=["ckpt_path=x"], return_hydra_config=True)
    assert cfg.ckpt_path == "x"
    assert cfg.split == "test" and cfg.task_name == "eval"
    assert cfg.get("logger") is None and "meta" not in cfg and "model" not in cfg
    assert cfg.data._target_ == "gmeta.data.datamodule.TaskDataModule"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.inference_mode is False
    c = resolve_all(cfg, tmp_path)
    assert c["trainer"]["default_root_dir"] == str(tmp_path)
    cfg = compose(config_name="eval", overrides=["ckpt_path=x", "data=synthetic", "split=val"])
    assert cfg.data.source._target_ == "gmeta.data.sources.synthetic.SyntheticSource" and cfg.split == "val"
    # without ckpt_path the config says it is mandatory
    assert OmegaConf.is_missing(compose(config_name="eval"), "ckpt_path")


# -- no config file rots unreachable -----------------------------------------------------------------


def all_group_options() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))


def test_config_tree_is_what_the_tests_cover() -> None:
    options = all_group_options()
    assert ("meta", "maml") in options and len(options) >= 20
    by_group: dict[str, set[str]] = {}
    for group, name in options:
        by_group.setdefault(group, set()).add(name)
    assert by_group["meta"] == set(META_OPTIONS)
    assert by_group["data"] == {*DATA_OPTIONS, "tabular"}  # tabular: tests/integration/test_tabular.py
    assert by_group["experiment"] == set(EXPERIMENTS)
    assert by_group["cluster"] == set(CLUSTERS)
    assert by_group["debug"] == {"default", "fdr"}
    assert by_group["hparams_search"] == {"movielens_optuna"}  # tests/integration/test_sweep.py
    assert {p.name for p in CONF.glob("*.yaml")} == {"train.yaml", "eval.yaml"}


@pytest.mark.parametrize("group,name", all_group_options())
def test_every_yaml_is_reachable(group: str, name: str) -> None:
    override = f"+experiment={name}" if group == "experiment" else f"{group}={name}"
    cfg = train_cfg(override)
    assert cfg.hydra.runtime.choices[group] == name
