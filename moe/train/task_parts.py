"""What every task shares: rng streams, metrics, building from config.

Shapes: B examples, C classes.
"""
from __future__ import annotations

from typing import Any, Mapping

from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import ml_collections

from moe import data as data_lib
from moe import ops
from moe.config import schema
from moe.nn import models

# Rng streams of the models in `moe.nn`: dropout and router noise.
MODEL_RNG_STREAMS = ("dropout", "gating")


def model_rngs(rng: jax.Array) -> dict[str, jax.Array]:
  """One rng per stream of MODEL_RNG_STREAMS, split from `rng`."""
  return dict(zip(MODEL_RNG_STREAMS,
                  jax.random.split(rng, len(MODEL_RNG_STREAMS))))


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether one of the k highest logits is a positive label.

  Args:
    logits: `[B, C]`.
    labels: `[B, C]`, one-hot or multi-hot (positive where > 0).
    k: number of predictions; capped at C.

  Returns:
    float32 `[B]`, 1 where a top-k prediction is a positive label.
  """
  _, predicted = ops.top_k_by_sort(logits, min(k, logits.shape[-1]))
  hits = jnp.take_along_axis(labels, predicted, axis=-1) > 0
  return jnp.any(hits, axis=-1).astype(jnp.float32)


def scalar_model_metrics(metrics: Mapping[str, jax.Array]
                         ) -> dict[str, jax.Array]:
  """Turns a model's metrics into scalars that can be averaged and logged.

  Scalars are kept. A vector (the MoE load `tokens_per_expert` [E]) becomes
  `<name>_cv`, its coefficient of variation std / mean: 0 for perfectly
  balanced experts.

  Args:
    metrics: the model's metrics, e.g. `auxiliary_loss` and
      `encoderblock_N/<router metric>`.

  Returns:
    float32 scalars.
  """
  scalars = {}
  for name, value in metrics.items():
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
      scalars[name] = value
    else:
      mean = jnp.mean(value)
      scalars[f"{name}_cv"] = jnp.std(value) / jnp.where(mean > 0, mean, 1.)
  return scalars


def eval_classification(logits: jax.Array, labels: jax.Array,
                        mask: jax.Array, loss_fn, prefix: str = ""
                        ) -> dict[str, clu_metrics.Metric]:
  """`loss`, `accuracy` (top-1) and `top5` averaged over the real examples.

  Args:
    logits: `[B, C]`.
    labels: `[B, C]`.
    mask: bool `[B]`, False for padding rows.
    loss_fn: `(logits, labels) -> [B]`.
    prefix: put before each name, e.g. "teacher_".

  Returns:
    Mergeable metrics.
  """
  def per_example(values):
    return clu_metrics.Average.from_model_output(values, mask=mask)

  return {f"{prefix}loss": per_example(loss_fn(logits, labels)),
          f"{prefix}accuracy": per_example(topk_correct(logits, labels, 1)),
          f"{prefix}top5": per_example(topk_correct(logits, labels, 5))}


def merged_model_config(model: Any, overrides: Any) -> dict[str, Any]:
  """Returns `model` (a config section) with `overrides` merged in, deeply."""
  merged = schema.to_dict(model, "config.model")
  for key, value in schema.to_dict(
      overrides, "config.evaluation.model_overrides").items():
    if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
      value = merged_model_config(merged[key], value)
    merged[key] = value
  return merged


def config_fields(cls: type) -> tuple[str, ...]:
  """The attributes of task class `cls` that `config.task` sets."""
  return tuple(name for name in schema.field_names(cls)
               if name not in cls.BUILT_FIELDS)


def task_from_config(cls: type, config: ml_collections.ConfigDict,
                     **built: Any) -> Any:
  """Builds task `cls` from the whole experiment config.

  Reads `config.task` (the task's options), `config.model`,
  `config.dataset` and `config.evaluation.model_overrides` (merged into
  `config.model` to build `eval_model`).

  Args:
    cls: a task class with attributes `model`, `eval_model`, `dataset`.
    config: the experiment config.
    **built: its other `BUILT_FIELDS`.

  Returns:
    The task.
  """
  options = schema.to_dict(config.task, "config.task")
  options.pop("name", None)
  schema.check_unknown_fields(options, ("name",) + config_fields(cls),
                              "config.task")
  overrides = config.get("evaluation", {}).get("model_overrides")
  return cls(
      model=models.build_model(config.model),
      eval_model=models.build_model(
          merged_model_config(config.model, overrides)),
      dataset=data_lib.DatasetConfig.from_config(config.dataset),
      **built, **options)
