"""The phase schedule of PQK: dense, prune (with QAT), warm-up, mutual KD.

Steps [0, d) train the full net ("dense"); [d, d + p) prune it in R rounds
with quantization-aware training of the pruned net ("prune"); then
[d + p, d + p + w) the student (pruned, quantized) and the teacher (the
full net: the student's weights plus the pruned ones) train independently
by cross-entropy ("warmup"); the rest, up to total_steps, mutually by
knowledge distillation ("mutual"). Round r = 1..R starts at step
d + floor((r - 1) p / R) with the cubic sparsity s_r of
`pruning.cubic_sparsity`.

Masks change only at "mask events", static steps. Hard pruning: at the
start of round r the mask keeps the top k(s_r). Soft pruning: during round
r the forward pass uses the soft top-k(s_r) of the weights the mask keeps,
and the mask, cut at the start of round r to the top k(s_{r-1}), is one
round behind (the candidates the soft operator chooses from); at the start of the warm-up both end with the
hard top-k(s_R), so phase 2 is the same in both.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.compress import pruning

PHASES = ("dense", "prune", "warmup", "mutual")
DENSE, PRUNE, WARMUP, MUTUAL = range(len(PHASES))


def _check_steps(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{field} must be an integer >= 0, got {value!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
  """When each phase runs and how sparse the pruned net is.

  Attributes:
    total_steps: the run's steps (`config.total_steps`).
    dense_steps: d, steps of dense training.
    prune_steps: p, steps of pruning rounds with QAT.
    warmup_steps: w, steps of independent training; the rest is mutual.
    pruning_rounds: R >= 1 when p > 0.
    initial_sparsity: s_0.
    sparsity: s_R, the final sparsity.
    method: "hard" or "soft" (`pruning.METHODS`).
  """
  total_steps: int
  dense_steps: int
  prune_steps: int
  warmup_steps: int
  pruning_rounds: int
  initial_sparsity: float
  sparsity: float
  method: str

  def __post_init__(self):
    for name in ("total_steps", "dense_steps", "prune_steps", "warmup_steps",
                 "pruning_rounds"):
      field = "config.total_steps" if name == "total_steps" else (
          f"config.task.{name}")
      _check_steps(getattr(self, name), field)
    pruning.check_sparsity(self.initial_sparsity,
                           "config.task.initial_sparsity")
    pruning.check_sparsity(self.sparsity, "config.task.sparsity")
    if self.initial_sparsity > self.sparsity:
      raise ValueError(
          f"config.task.initial_sparsity ({self.initial_sparsity}) must be "
          f"<= config.task.sparsity ({self.sparsity}).")
    used = self.dense_steps + self.prune_steps + self.warmup_steps
    if used > self.total_steps:
      raise ValueError(
          f"The PQK phases do not fit config.total_steps={self.total_steps}: "
          f"dense_steps + prune_steps + warmup_steps = {self.dense_steps} + "
          f"{self.prune_steps} + {self.warmup_steps} = {used}.")
    if self.prune_steps == 0 and self.dense_steps != self.total_steps:
      raise ValueError(
          "config.task.prune_steps is 0, so nothing is pruned: set "
          "config.task.dense_steps to config.total_steps "
          f"({self.total_steps}) for a dense run, or prune_steps >= 1.")
    if self.prune_steps and not 1 <= self.pruning_rounds <= self.prune_steps:
      raise ValueError(
          f"config.task.pruning_rounds must be in 1..prune_steps "
          f"({self.prune_steps}), got {self.pruning_rounds}.")

  @property
  def boundaries(self) -> tuple[int, int, int]:
    """First steps of the prune, warm-up and mutual phases."""
    prune = self.dense_steps
    warmup = prune + self.prune_steps
    return prune, warmup, warmup + self.warmup_steps

  def round_sparsity(self, round_index: int) -> float:
    """s_r, r in 0..R (0: before pruning)."""
    if not self.prune_steps:
      return self.initial_sparsity
    return pruning.cubic_sparsity(round_index, self.pruning_rounds,
                                  self.initial_sparsity, self.sparsity)

  @property
  def round_starts(self) -> tuple[int, ...]:
    """First step of each round r = 1..R."""
    if not self.prune_steps:
      return ()
    return tuple(self.dense_steps + (r - 1) * self.prune_steps
                 // self.pruning_rounds
                 for r in range(1, self.pruning_rounds + 1))

  @property
  def mask_events(self) -> tuple[tuple[int, float], ...]:
    """(step, sparsity) pairs: at `step` the mask is cut to `sparsity`."""
    if not self.prune_steps:
      return ()
    lag = 1 if self.method == "soft" else 0
    events = [(start, self.round_sparsity(r - lag))
              for r, start in enumerate(self.round_starts, 1)]
    events.append((self.boundaries[1], self.round_sparsity(
        self.pruning_rounds)))
    return tuple(events)

  def phase(self, step: jax.Array) -> jax.Array:
    """int32 index into PHASES of the phase that `step` belongs to."""
    return sum(jnp.asarray(step >= b, jnp.int32) for b in self.boundaries)

  def round_index(self, step: jax.Array) -> jax.Array:
    """int32 r - 1 of the round `step` is in (0 before the first)."""
    starts = jnp.asarray(self.round_starts or (0,))
    return jnp.maximum(jnp.sum(step >= starts) - 1, 0)

  def target_sparsity(self, step: jax.Array) -> jax.Array:
    """The sparsity the student's forward pass has at `step`."""
    rounds = jnp.asarray([self.round_sparsity(r) for r in range(
        1, max(self.pruning_rounds, 1) + 1)], jnp.float32)
    phase = self.phase(step)
    return jnp.where(phase == DENSE, 0.0, rounds[
        jnp.where(phase == PRUNE, self.round_index(step), -1)])
