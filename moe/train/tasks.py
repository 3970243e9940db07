"""Tasks: the data, model, loss and metrics that the train loop runs.

The loop (`moe.train.trainer`) is written once against the `Task` protocol
and knows nothing about images, labels or models; a new pipeline
(distillation with a teacher inside the parameters, masked gradients,
sequence models) is a new task, not a new loop:

  train = task.make_train_iterator()          # local batches, resumable
  params = task.init(rng, batch)              # batch: arrays or shapes
  loss, metrics = task.train_loss(params, batch, rng, step)  # jit and grad
  for batch in task.make_eval_data():         # padded local batches
    metrics = task.eval_metrics(params, batch, step)  # dict of clu Metrics

Batches are dicts of arrays with a leading axis B; eval batches also hold
`moe.data.MASK_KEY` (bool [B], False for padding rows), and eval metrics
must weight by it. `train_loss` metrics are scalars; the loop averages them
over the steps between two reports and writes them as `train_<name>`; eval
metrics are merged over the eval split and written as `eval_<name>`.

A task may also define three hooks that the train step calls when present
(`moe.train.train_state.make_train_step`), for state that lives in the
parameters but is not trained (pruning masks, a queue of embeddings, a
Lagrange multiplier; `metrics` are the step's `train_loss` metrics):

  params = task.prepare_params(params, step)      # before the forward pass
  updates = task.mask_updates(updates, params, step)  # after the optimizer
  params = task.after_update(params, batch, step, metrics)  # after it

and `summary_metrics`, the eval metrics of the run's final line (default
`eval_accuracy`, `eval_top5`, `eval_loss`).

Tasks are built from config by `create_task(config)`: `config.task.name` is a
key of `TASKS`, the other `config.task` fields are that task's options.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Protocol

from clu import metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from moe import data as data_lib
from moe.config import schema
from moe.train import losses
from moe.train import pqk_task
from moe.train import sequence_task
from moe.train import smec_task
from moe.train import sparse_attention_task
from moe.train import task_parts

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
PyTree = Any

# The shared pieces live in `task_parts`; these names are kept here.
MODEL_RNG_STREAMS = task_parts.MODEL_RNG_STREAMS
topk_correct = task_parts.topk_correct
scalar_model_metrics = task_parts.scalar_model_metrics
merged_model_config = task_parts.merged_model_config


class TrainIterator(Protocol):
  """An infinite iterator of local batches whose position can be saved."""

  def __iter__(self) -> "TrainIterator":
    """Returns the iterator itself."""

  def __next__(self) -> dict[str, Any]:
    """Returns the next local batch."""

  def get_state(self) -> dict[str, Any]:
    """Returns the position of the next batch, a JSON-able dict."""

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position returned by `get_state`."""


class Task(Protocol):
  """What the train loop needs from a task (see the module docstring)."""

  def make_train_iterator(self) -> TrainIterator:
    """Returns this process's train batches, from the start of the stream."""

  def make_eval_data(self) -> Iterable[dict[str, Any]]:
    """Returns this process's eval batches; every iteration is one pass."""

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    """Returns fresh parameters for batches shaped like `batch`."""

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, Metrics]:
    """Returns the scalar loss to minimise and scalar metrics.

    `step` is the train step of the state being updated (for schedules
    inside the model, e.g. a router's regularisation).
    """

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    """Returns mergeable metrics of one padded eval batch at train step
    `step` (None: the model at the end of its schedules)."""


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """Image classification with a model from `moe.nn`.

  Train loss: mean over the batch of `loss(logits, smoothed labels)` plus
  `aux_loss_weight` times the model's `auxiliary_loss` (the sum of the MoE
  routers' balancing losses). Train metrics: `loss` (the total),
  `task_loss`, `accuracy` (top-1) and the model's metrics
  (`scalar_model_metrics`). Eval metrics: `loss` (without label smoothing),
  `accuracy` (top-1), `top5` and the model's metrics; the first three are
  averaged over real examples, the model's metrics over batches (padding rows
  included, since routers see whole batches).

  Attributes:
    model: flax module, `model.apply(variables, inputs, train=..., step=...)`
      returns `(logits [B, num_classes], metrics)`; used for training.
      `step` is the train step (None outside training), for schedules in
      the model.
    eval_model: the module used for evaluation; it must have the parameters
      of `model` (e.g. the same model with another capacity factor).
    dataset: the dataset config (`moe.data.DatasetConfig`).
    loss: key of `moe.train.losses.LOSSES`.
    label_smoothing: s; train labels become
      `labels * (1 - s) + s / num_classes`.
    aux_loss_weight: weight of the model's `auxiliary_loss`.
    inputs_key: batch entry fed to the model.
    labels_key: batch entry holding `[B, num_classes]` one-hot or multi-hot
      labels.
    loss_options: the loss's options (`moe.train.losses.create_loss`), e.g.
      `{"topk_weights": (0.5, 0, 0, 0, 0.5)}` for "topk_xent"; empty: its
      defaults.
  """
  model: nn.Module
  eval_model: nn.Module
  dataset: data_lib.DatasetConfig
  loss: str = "softmax_xent"
  label_smoothing: float = 0.0
  aux_loss_weight: float = 0.01
  inputs_key: str = "image"
  labels_key: str = "labels"
  loss_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    losses.create_loss(self.loss, self.loss_options)  # Checks name, options.
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"config.task.label_smoothing must be in [0, 1), got "
                       f"{self.label_smoothing!r}.")
    schema.check_number(self.aux_loss_weight, "config.task.aux_loss_weight")

  # Attributes built from other sections; `config.task` sets the others.
  BUILT_FIELDS = ("model", "eval_model", "dataset")

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    """The attributes that `config.task` sets (all but modules and data)."""
    return task_parts.config_fields(cls)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict
                  ) -> "ClassificationTask":
    """Builds the task from the whole experiment config
    (`task_parts.task_from_config`)."""
    return task_parts.task_from_config(cls, config)

  def loss_fn(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example losses `[B]` of the configured loss and options."""
    return losses.create_loss(self.loss, self.loss_options)(logits, labels)

  def make_train_iterator(self) -> data_lib.TrainIterator:
    return data_lib.make_train_iterator(self.dataset)

  def make_eval_data(self) -> data_lib.EvalData:
    return data_lib.make_eval_data(self.dataset)

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    return self.model.init({"params": rng}, batch[self.inputs_key],
                           train=False)["params"]

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, Metrics]:
    logits, model_metrics = self.model.apply(
        {"params": params}, batch[self.inputs_key], train=True, step=step,
        rngs=task_parts.model_rngs(rng))
    labels = batch[self.labels_key]
    targets = labels
    if self.label_smoothing:
      targets = optax.smooth_labels(labels, self.label_smoothing)
    task_loss = jnp.mean(self.loss_fn(logits, targets))
    loss = task_loss + self.aux_loss_weight * model_metrics["auxiliary_loss"]
    return loss, {
        **scalar_model_metrics(model_metrics),
        "loss": loss,
        "task_loss": task_loss,
        "accuracy": jnp.mean(topk_correct(logits, labels, 1)),
    }

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    logits, model_metrics = self.eval_model.apply(
        {"params": params}, batch[self.inputs_key], train=False, step=step)
    metrics = {name: clu_metrics.Average.from_model_output(value)
               for name, value in scalar_model_metrics(model_metrics).items()}
    metrics.update(task_parts.eval_classification(
        logits, batch[self.labels_key], batch[data_lib.MASK_KEY],
        self.loss_fn))
    return metrics


# Task classes by `config.task.name`; each has `from_config(config)`,
# `config_fields()` (the fields of `config.task` besides `name`) and
# `BUILT_FIELDS` (its other attributes).
TASKS: dict[str, type] = {"classification": ClassificationTask,
                          "pqk": pqk_task.PqkTask,
                          "smec": smec_task.SmecTask,
                          "addition": sequence_task.SequenceTask,
                          "sparse_attention":
                              sparse_attention_task.SparseAttentionTask}


def default_task_config(name: str) -> ml_collections.ConfigDict:
  """Returns the `config.task` section of task `name`, fields at defaults."""
  schema.check_choice(name, "config.task.name", tuple(TASKS))
  cls = TASKS[name]
  return schema.section_defaults(cls, exclude=cls.BUILT_FIELDS, name=name)


def create_task(config: ml_collections.ConfigDict) -> Task:
  """Returns the task `config.task.name` (a key of `TASKS`) of `config`."""
  name = config.task.get("name")
  schema.check_choice(name, "config.task.name", tuple(TASKS))
  return TASKS[name].from_config(config)
