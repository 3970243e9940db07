"""The experiment config: one typed section per top-level field.

An experiment is one `ml_collections.ConfigDict` whose top-level fields are
`CONFIG_FIELDS`. Each section is a dataclass that lists its fields, their
types, their only defaults and their checks; the module that reads a section
owns its dataclass:

  seed, total_steps  `ExperimentConfig` (here)
  dataset            `moe.data.DatasetConfig`
  model              `moe.nn.models.build_model` (the model's module
                     attributes, e.g. `moe.nn.vit.VisionTransformer`)
  task               `moe.train.tasks.TASKS[task.name]` (e.g.
                     `ClassificationTask`)
  optimizer          `moe.train.optimizers.OptimizerConfig`
  mesh               `moe.parallel.partitioning.MeshConfig`
  checkpoint         `moe.checkpoints.CheckpointConfig`
  evaluation         `EvaluationConfig` (here)
  logging            `LoggingConfig` (here)
  init_from          `moe.checkpoints.init_from.InitFromConfig`

`base_config()` is built from these dataclasses, so a default is written once;
`ExperimentConfig.from_config(config)` parses and checks every section but
the model and the task, which their builders check.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from moe import checkpoints
from moe import data
from moe.checkpoints import init_from as init_from_lib
from moe.config import schema
from moe.parallel import partitioning
from moe.train import optimizers
from moe.train import tasks

@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """Evaluation, `config.evaluation`.

  Attributes:
    every_steps: evaluate when the step is a multiple of this (and at the
      last step).
    model_overrides: fields merged into `config.model` to build the eval
      model, which must have the same parameters, e.g.
      `{"encoder": {"moe": {"num_selected_experts": 1}}}`; read by the task.
  """
  every_steps: int = 1000
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    schema.check_int(self.every_steps, "config.evaluation.every_steps", 1)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Metric writing and progress reports, `config.logging`.

  Attributes:
    every_steps: write the mean train metrics every so many steps.
    progress_every_secs: report steps/s and ETA at most this often.
    profile: capture a jax profile of a few steps into the workdir.
  """
  every_steps: int = 100
  progress_every_secs: float = 60.0
  profile: bool = False

  def __post_init__(self):
    schema.check_int(self.every_steps, "config.logging.every_steps", 1)
    schema.check_number(self.progress_every_secs,
                        "config.logging.progress_every_secs", strict=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """The parsed experiment config.

  Attributes:
    seed: int >= 0: parameters, dropout and router noise (the data has
      `dataset.seed`).
    total_steps: train steps (micro-batches); with
      `optimizer.accumulation_steps` = A the optimizer makes
      total_steps / A updates.
    dataset: `config.dataset`.
    model: `config.model`, as a dict (checked by the model's builder).
    task: `config.task`, as a dict (checked by the task's builder).
    optimizer: `config.optimizer`.
    mesh: `config.mesh`.
    checkpoint: `config.checkpoint`.
    evaluation: `config.evaluation`.
    logging: `config.logging`.
    init_from: `config.init_from`.
  """
  seed: int = 0
  total_steps: int
  dataset: data.DatasetConfig = data.DatasetConfig()
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  task: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: optimizers.OptimizerConfig
  mesh: partitioning.MeshConfig = partitioning.MeshConfig()
  checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig()
  evaluation: EvaluationConfig = EvaluationConfig()
  logging: LoggingConfig = LoggingConfig()
  init_from: init_from_lib.InitFromConfig = init_from_lib.InitFromConfig()

  def __post_init__(self):
    schema.check_int(self.total_steps, "config.total_steps", 1)
    schema.check_int(self.seed, "config.seed", 0)
    accumulation = self.optimizer.accumulation_steps
    if self.total_steps % accumulation:
      raise ValueError(
          f"config.total_steps={self.total_steps} must be a multiple of "
          f"config.optimizer.accumulation_steps={accumulation}.")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]
                  ) -> "ExperimentConfig":
    """Parses and checks every section of the experiment config.

    Raises:
      ValueError: naming the field, for an unknown field, a missing
        required one or a bad value in any section.
    """
    return schema.parse_section(cls, config, "config")


def base_config() -> ml_collections.ConfigDict:
  """Returns an experiment config with every field at its default.

  Every section holds all the fields of its dataclass, so that each can be
  overridden on the command line (`--config.a.b=value`) although the config
  is locked. Required fields (`total_steps`, `optimizer.name`,
  `optimizer.learning_rate`) are typed placeholders that the caller must
  set; so is `model`, an empty section here (`moe.config.recipes.vit_model`
  builds one). The task is classification.
  """
  config = schema.section_defaults(ExperimentConfig)
  config.task = tasks.default_task_config("classification")
  return config


# The top-level fields of an experiment config.
CONFIG_FIELDS = schema.field_names(ExperimentConfig)
