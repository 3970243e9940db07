"""Tests of moe.config: one source of defaults, the schema, unmatched regexes."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe import checkpoints
from moe import data
from moe.checkpoints import init_from
from moe.config import experiment
from moe.config import recipes
from moe.config import schema
from moe.nn import moe_layer
from moe.nn import routers
from moe.nn import transformer
from moe.nn import vit
from moe.parallel import partitioning
from moe.train import optimizers
from moe.train import tasks
import train_testing

# Sections of base_config() and the dataclass whose defaults they must be.
SECTIONS = {
    "dataset": data.DatasetConfig,
    "mesh": partitioning.MeshConfig,
    "checkpoint": checkpoints.CheckpointConfig,
    "evaluation": experiment.EvaluationConfig,
    "logging": experiment.LoggingConfig,
    "init_from": init_from.InitFromConfig,
}


def _field_defaults(cls, exclude=()):
  """Every field's default, by dataclasses.fields (independent of schema)."""
  defaults = {}
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    if f.default_factory is not dataclasses.MISSING:
      defaults[f.name] = f.default_factory()
    elif f.default is not dataclasses.MISSING:
      defaults[f.name] = f.default
  return defaults


def _plain(section):
  return section.to_dict() if hasattr(section, "to_dict") else section


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_base_config_sections_are_their_dataclass_defaults(name):
  cls = SECTIONS[name]
  section = experiment.base_config()[name]
  assert set(section) == {f.name for f in dataclasses.fields(cls)}
  for field, default in _field_defaults(cls).items():
    assert _plain(section[field]) == default, (name, field)
  assert schema.parse_section(cls, section, f"config.{name}") == cls()


def test_base_config_optimizer_and_top_level_fields():
  config = experiment.base_config()
  assert set(config) == set(experiment.CONFIG_FIELDS)
  assert config.seed == 0 and config.total_steps is None
  expected = _field_defaults(optimizers.OptimizerConfig)
  expected["schedule"] = dataclasses.asdict(optimizers.ScheduleConfig())
  assert config.optimizer.to_dict() == {
      **expected, "name": None, "learning_rate": None}
  # Required fields stay required: the placeholders must be set.
  with pytest.raises(ValueError, match="config.optimizer must set name, "
                     "learning_rate"):
    optimizers.OptimizerConfig.from_config(config.optimizer)
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  assert optimizers.OptimizerConfig.from_config(config.optimizer) == (
      optimizers.OptimizerConfig(name="sgd", learning_rate=0.1))
  task = _field_defaults(tasks.ClassificationTask)
  assert config.task.to_dict() == {"name": "classification", **task}


def test_experiment_config_parses_every_section_and_names_bad_ones():
  config = train_testing.load_config("digits_vmoe.py")
  parsed = experiment.ExperimentConfig.from_config(config)
  assert parsed.total_steps == 1000 and parsed.seed == 0
  assert parsed.dataset == data.DatasetConfig(batch_size=128,
                                              eval_batch_size=360)
  assert parsed.checkpoint == checkpoints.CheckpointConfig(
      every_steps=200, keep=2, best_metric="eval_accuracy")
  assert parsed.mesh.partition_rules == recipes.EXPERT_PARTITION_RULES
  with config.unlocked():
    config.dataset.batch_sise = 3
  with pytest.raises(ValueError, match=r"config.dataset has unknown "
                     r"field\(s\) batch_sise; allowed fields: name, data_dir"):
    experiment.ExperimentConfig.from_config(config)
  config = train_testing.load_config("digits_vmoe.py")
  config.optimizer.learning_rate = float("nan")
  with pytest.raises(ValueError, match=r"config.optimizer.learning_rate must "
                     r"be a number >= 0.0, finite in float32 \(<= 3.4e38\); "
                     r"got nan"):
    experiment.ExperimentConfig.from_config(config)


def test_model_sections_take_the_module_defaults():
  model = recipes.vit_model("S/16", 10, moe=recipes.moe_config(4, 2))
  exclude = ("parent", "name", "num_classes", "patch_size", "hidden_size",
             "encoder")
  for field, default in _field_defaults(vit.VisionTransformer,
                                        exclude).items():
    assert model[field] == default, field
  for field, default in _field_defaults(
      transformer.Encoder,
      ("parent", "name", "num_layers", "mlp_dim", "num_heads", "moe")).items():
    assert model.encoder[field] == default, field
  moe = model.encoder.moe
  for field, default in _field_defaults(
      moe_layer.MoeMlpBlock,
      ("parent", "name", "mlp_dim", "dropout_rate", "router")).items():
    if field not in ("num_experts", "num_selected_experts", "group_axes",
                     "expert_axes"):
      assert moe[field] == default, field
  # The mesh axes are the recipes' own: expert parallel on any mesh.
  assert moe.group_axes == ("data", "expert")
  assert moe.expert_axes == ("expert",)
  assert moe.router.name == moe_layer.MoeMlpBlock.router["name"]


@pytest.mark.parametrize("name", sorted(routers.ROUTERS))
def test_switching_the_router_name_alone_gives_the_class_defaults(name):
  config = train_testing.load_config(
      "digits_vmoe.py", f"--config.model.encoder.moe.router.name={name}")
  router = routers.create_router(config.model.encoder.moe.router,
                                 num_experts=8, num_selected_experts=2)
  cls = routers.ROUTERS[name]
  set_by_config = {"capacity_factor": 1.25, "regularization": 0.1}
  for field, default in _field_defaults(
      cls, ("parent", "name", "num_experts", "num_selected_experts")).items():
    assert getattr(router, field) == set_by_config.get(field, default), field
  expected_noise = {"NoisyTopExpertsPerItem": 1.0, "SparseTopK": 0.0}
  if name in expected_noise:
    assert router.noise_std == expected_noise[name]


def test_noisy_router_from_the_override_is_noisy_at_train_time():
  config = train_testing.load_config(
      "digits_vmoe.py:runlocal",
      "--config.model.encoder.moe.router.name=NoisyTopExpertsPerItem")
  router = routers.create_router(config.model.encoder.moe.router,
                                 num_experts=8, num_selected_experts=2)
  assert router.noise_std == 1.0
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(4, 17, 32)),
                       jnp.float32)
  params = router.init(jax.random.key(0), tokens)

  @jax.jit
  def load_loss(key):
    _, metrics = router.apply(params, tokens, train=True,
                              rngs={"gating": key})
    return metrics["load_loss"]

  # The load loss is 0 without noise and differs between noise draws.
  first, second = load_loss(jax.random.key(1)), load_loss(jax.random.key(2))
  assert first > 0 and first != second


def test_placeholders_are_typed_command_line_overrides():
  config = train_testing.load_config(
      "digits_vmoe.py", "--config.model.encoder.moe.router.noise_std=0.5",
      "--config.model.representation_size=16",
      "--config.model.encoder.moe.group_size=34")
  assert config.model.encoder.moe.router.noise_std == 0.5
  assert config.model.representation_size == 16
  assert config.model.encoder.moe.group_size == 34
  router = routers.create_router(config.model.encoder.moe.router,
                                 num_experts=8, num_selected_experts=2)
  assert router.noise_std == 0.5


def test_a_none_router_field_keeps_its_own_default_and_overrides_win():
  section = recipes.router_config("NoisyTopExpertsPerItem", noise_std=0.5)
  assert section.noise_std == 0.5
  assert routers.create_router(section, num_experts=4,
                               num_selected_experts=1).noise_std == 0.5
  with pytest.raises(ValueError, match=r"config.model.encoder.moe.router has "
                     r"unknown field\(s\) noise; allowed fields: "
                     r"capacity_factor"):
    recipes.router_config("SparseTopK", noise=1.0)
  with pytest.raises(ValueError, match=r"config.model.encoder.moe.router.name "
                     r"must be one of 'NoisyTopExpertsPerItem'"):
    recipes.router_config("Switch")


def test_schema_errors_name_the_section():
  @dataclasses.dataclass(frozen=True)
  class Section:
    size: int
    rate: float = 0.5

  with pytest.raises(ValueError, match=r"config.x has unknown field\(s\) "
                     r"siz; allowed fields: size, rate"):
    schema.parse_section(Section, {"siz": 1}, "config.x")
  with pytest.raises(ValueError, match="config.x must set size"):
    schema.parse_section(Section, ml_collections.ConfigDict(
        {"size": None}), "config.x")
  with pytest.raises(TypeError, match="config.x must be a ConfigDict or a "
                     "dict, got 3"):
    schema.parse_section(Section, 3, "config.x")
  assert schema.section_defaults(Section).to_dict() == {"size": None,
                                                        "rate": 0.5}
  with pytest.raises(ValueError, match=r"config.y must be one of 'a', 'b'; "
                     r"got 'c'"):
    schema.check_choice("c", "config.y", ("a", "b"))
  for bad in (float("inf"), float("nan"), True, "1"):
    with pytest.raises(ValueError, match="config.z must be a number"):
      schema.check_number(bad, "config.z")


def _params():
  return {"Experts": {"kernel": np.zeros((4, 2, 2), np.float32)},
          "head": {"kernel": np.zeros((2, 3), np.float32),
                   "bias": np.zeros((3,), np.float32)}}


def test_partition_rule_that_matches_nothing_is_an_error(eight_devices):
  mesh = partitioning.create_mesh(2)
  with pytest.raises(ValueError, match=r"config.mesh.partition_rules: regex "
                     r"'.\*/Experts/.\*' matches no parameter"):
    partitioning.param_shardings(_params(), mesh,
                                 recipes.EXPERT_PARTITION_RULES)
  shardings = partitioning.param_shardings(_params(), mesh,
                                           (("Experts/.*", ("expert",)),))
  assert shardings["Experts"]["kernel"].spec == jax.sharding.PartitionSpec(
      "expert")


@pytest.mark.parametrize("field, value", [
    ("frozen_params", ("haed/.*",)),
    ("weight_decay_params", ("haed/.*",)),
    ("weight_decay_exclude", ("haed/.*",)),
    ("lr_mults", (("haed/.*", 2.0),)),
])
def test_optimizer_regex_that_matches_nothing_is_an_error(field, value):
  optimizer = optimizers.create_optimizer(
      {"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.1,
       field: value})
  with pytest.raises(ValueError, match=rf"config.optimizer.{field}: regex "
                     r"'haed/.\*' matches no .*parameter"):
    optimizer.tx.init(_params())


def test_weight_decay_regexes_are_not_checked_without_weight_decay():
  optimizer = optimizers.create_optimizer(
      {"name": "adam", "learning_rate": 0.1,
       "weight_decay_exclude": ("haed/.*",)})
  optimizer.tx.init(_params())
