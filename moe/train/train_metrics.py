"""Train metrics between two reports, and the checks that training is finite.

The train step returns its metrics as device arrays; reading them every step
would stall the device queue. `TrainMetrics` keeps them until `flush` (at a
report, an evaluation or a checkpoint), then fetches them at once, checks
that the loss of every step is finite and that every step left a finite
state (`state_finite`, computed in the step from the updated parameters and
optimizer state), and returns the means. The loop flushes before every
checkpoint, so no checkpoint holds a diverged state.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from moe.checkpoints import integrity
from moe.train import metrics_writing

TRAIN_PREFIX = "train_"
LOSS = "loss"
STATE_FINITE = "state_finite"
ADVICE = ("Lower config.optimizer.learning_rate, set "
          "config.optimizer.grad_clip_norm or add warmup "
          "(config.optimizer.schedule.warmup_steps), then restart: the run "
          "resumes from its last checkpoint, which is finite (every state is "
          "checked before it is saved).")


class NonFiniteLossError(FloatingPointError):
  """The train loss became NaN or infinite."""


class NonFiniteStateError(FloatingPointError):
  """A train step produced NaN or infinite parameters or optimizer state."""


class TrainMetrics:
  """Per-step train metrics, kept on device until `flush`."""

  def __init__(self):
    self._pending: list[tuple[int, Mapping[str, jax.Array]]] = []

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Records the metrics of train step `step` (scalars, replicated)."""
    self._pending.append((step, metrics))

  def flush(self, state: Any = None) -> dict[str, float]:
    """Returns `train_<name>`, the mean of each metric since the last flush.

    Args:
      state: the current train state, searched for the names of non-finite
        leaves when a step reports a non-finite state.

    Returns:
      The means; empty if nothing was recorded.

    Raises:
      NonFiniteLossError: if the loss of a recorded step is NaN or infinite,
        naming the first such step.
      NonFiniteStateError: if a recorded step produced a non-finite state,
        naming the step and the first non-finite leaves of `state`.
    """
    pending, self._pending = self._pending, []
    if not pending:
      return {}
    host = [(step, {name: metrics_writing.to_host_scalar(value)
                    for name, value in metrics.items()})
            for step, metrics in pending]
    for step, metrics in host:
      _check_finite(step, metrics, state)
    names = [name for name in host[0][1] if name != STATE_FINITE]
    return {f"{TRAIN_PREFIX}{name}": float(np.mean([m[name] for _, m in host]))
            for name in names}


def _check_finite(step: int, metrics: Mapping[str, Any], state: Any) -> None:
  """Raises if the loss of `step` or the state it produced is not finite."""
  details = ", ".join(f"{name}={metrics[name]:.4g}"
                      for name in ("learning_rate", "grad_norm")
                      if name in metrics)
  loss = metrics[LOSS]
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"The train loss became {loss} at step {step} ({details}); training "
        f"stops. {ADVICE}")
  if metrics.get(STATE_FINITE, True):
    return
  where = ""
  if state is not None:
    bad = integrity.non_finite(integrity.digest(state))
    if bad:
      where = (f": {len(bad)} non-finite arrays, first "
               f"{', '.join(bad[:3])}")
  raise NonFiniteStateError(
      f"The update of step {step} made the train state non-finite (loss "
      f"{loss:.4g}, {details}){where}; training stops before saving it. "
      f"{ADVICE}")
