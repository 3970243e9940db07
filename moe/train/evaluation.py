"""Evaluation: one pass over a task's eval data with a jitted, sharded step.

Each padded eval batch goes through `task.eval_metrics` under `jax.jit`
(parameters placed as in training, the batch split over all devices); the
per-batch clu metrics come back replicated and are merged on the host, so
every process ends with the same totals. Eval-time model changes (e.g. a
larger capacity factor) live in the task's eval model.
"""
from __future__ import annotations

from typing import Any, Optional

from clu import metrics as clu_metrics
import jax
import numpy as np

from moe.parallel import partitioning
from moe.train import tasks
from moe.train import train_state

EVAL_PREFIX = "eval_"


def _to_host(value: Any) -> np.ndarray:
  """Returns a replicated (possibly multi-process) jax Array as numpy."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = value.addressable_data(0)
  return np.asarray(value)


def _is_metric(x: Any) -> bool:
  return isinstance(x, clu_metrics.Metric)


class Evaluator:
  """Evaluates parameters on the task's eval split.

  Attributes:
    task: the task.
  """

  def __init__(self, task: tasks.Task, layout: train_state.StateLayout):
    """Prepares the eval data and the jitted eval step.

    Args:
      task: the task to evaluate.
      layout: the train state layout; parameters keep its shardings.
    """
    self.task = task
    self._data = task.make_eval_data()
    self._mesh = layout.mesh
    self._step = partitioning.jit_on_mesh(
        task.eval_metrics, layout.mesh,
        in_shardings=(layout.shardings.params,
                      partitioning.batch_sharding(layout.mesh),
                      partitioning.replicated(layout.mesh)),
        out_shardings=partitioning.replicated(layout.mesh))

  def __call__(self, params: Any,
               step: Optional[jax.Array] = None) -> dict[str, float]:
    """Returns `eval_<name>` for every metric of the task, over the split.

    Args:
      params: the parameters, in the layout's shardings.
      step: the train step of `params` (for schedules inside the model);
        None: the model at the end of its schedules.
    """
    totals = None
    for local_batch in self._data:
      batch = partitioning.shard_batch(local_batch, self._mesh)
      metrics = jax.tree.map(_to_host, self._step(params, batch, step))
      totals = metrics if totals is None else jax.tree.map(
          lambda a, b: a.merge(b), totals, metrics, is_leaf=_is_metric)
    if totals is None:
      raise ValueError("The eval split yielded no batch.")
    return {f"{EVAL_PREFIX}{name}": float(metric.compute())
            for name, metric in totals.items()}
