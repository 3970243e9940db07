"""Train metrics between two reports, and the check that the loss is finite.

The train step returns its metrics as device arrays; reading them every step
would stall the device queue. `TrainMetrics` keeps them until `flush` (at a
report, an evaluation or a checkpoint), then fetches them at once, checks
that the loss of every step is finite and returns the means. Flushing before
every checkpoint guarantees that no checkpoint holds a diverged state.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from moe.train import metrics_writing

TRAIN_PREFIX = "train_"
LOSS = "loss"


class NonFiniteLossError(FloatingPointError):
  """The train loss became NaN or infinite."""


class TrainMetrics:
  """Per-step train metrics, kept on device until `flush`."""

  def __init__(self):
    self._pending: list[tuple[int, Mapping[str, jax.Array]]] = []

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Records the metrics of train step `step` (scalars, replicated)."""
    self._pending.append((step, metrics))

  def flush(self) -> dict[str, float]:
    """Returns `train_<name>`, the mean of each metric since the last flush.

    Returns:
      The means; empty if nothing was recorded.

    Raises:
      NonFiniteLossError: if the loss of a recorded step is NaN or infinite,
        naming the first such step.
    """
    pending, self._pending = self._pending, []
    if not pending:
      return {}
    host = [(step, {name: metrics_writing.to_host_scalar(value)
                    for name, value in metrics.items()})
            for step, metrics in pending]
    for step, metrics in host:
      _check_finite(step, metrics)
    names = host[0][1].keys()
    return {f"{TRAIN_PREFIX}{name}": float(np.mean([m[name] for _, m in host]))
            for name in names}


def _check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  """Raises `NonFiniteLossError` if the loss of `step` is not finite."""
  loss = metrics[LOSS]
  if math.isfinite(loss):
    return
  details = ", ".join(f"{name}={metrics[name]:.4g}"
                      for name in ("learning_rate", "grad_norm")
                      if name in metrics)
  raise NonFiniteLossError(
      f"The train loss became {loss} at step {step} ({details}); training "
      f"stops. Lower config.optimizer.learning_rate, set "
      f"config.optimizer.grad_clip_norm or add warmup "
      f"(config.optimizer.schedule.warmup_steps), then restart: the run "
      f"resumes from its last checkpoint, which is finite.")
