"""Auxiliary losses of MoE routers, and the one helper that weights them.

Shapes as in `moe.nn.dispatch`: G groups, S group size, E experts, K
experts selected per token. Every loss is a scalar, averaged over groups.

  importance_loss: V-MoE (Riquelme et al., 2021), squared coefficient of
    variation of the per-expert routing mass.
  load_loss: V-MoE, squared coefficient of variation of each expert's
    probability of being selected under the router noise.
  gshard_loss: GShard (Lepikhin et al., 2021), E^2 * mean_e of (fraction of
    tokens whose top-1 expert is e) * (mean probability of e).
  switch_loss: Switch Transformer (Fedus et al., 2022), E * sum_e of
    (fraction of the dispatched choices that go to e) * (mean probability
    of e); for K = 1 it equals gshard_loss.
  z_loss: ST-MoE (Zoph et al., 2022), mean over tokens of
    logsumexp(logits)^2; keeps router logits small.

A router names the losses it computes in `AUXILIARY_LOSSES`; the weight of
loss `X` is its attribute `X_weight`, and `weighted_sum` adds them up into the
router's `auxiliary_loss`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from moe import ops

Array = jax.Array


def _cv_squared(values: Array) -> Array:
  """`[G, E]` -> mean over G of var_e / mean_e^2."""
  return jnp.mean(jnp.var(values, axis=-1) / jnp.mean(values, axis=-1)**2)


def importance_loss(probs: Array) -> Array:
  """Squared coefficient of variation of the per-expert mass, mean over G.

  Args:
    probs: `[G, S, E]` non-negative routing weights.

  Returns:
    Scalar loss, 0 when every expert receives the same total weight.
  """
  return _cv_squared(jnp.sum(probs, axis=1))


def load_loss(logits: Array, noisy_logits: Array, noise_std: float,
              num_selected_experts: int) -> Array:
  """V-MoE load loss: CV^2 of each expert's probability of being selected.

  Args:
    logits: `[G, S, E]` clean router logits.
    noisy_logits: `[G, S, E]` logits plus Gaussian noise of std `noise_std`.
    noise_std: standard deviation of that noise (> 0).
    num_selected_experts: K.

  Returns:
    Scalar loss, smooth in `logits` through the Gaussian CDF.
  """
  threshold = ops.top_k_by_sort(noisy_logits, num_selected_experts)[0][..., -1:]
  prob_selected = jax.scipy.stats.norm.cdf((logits - threshold) / noise_std)
  return _cv_squared(jnp.mean(prob_selected, axis=1))


def gshard_loss(probs: Array, scores: Array | None = None) -> Array:
  """GShard loss: E^2 * mean_e(top-1 fraction of e * mean probability of e).

  Args:
    probs: `[G, S, E]` routing probabilities (each row sums to 1).
    scores: optional `[G, S, E]` values whose argmax is the top-1 expert
      (default `probs`); pass logits when `probs` has ties.

  Returns:
    Scalar loss, 1 for a perfectly balanced router, mean over G.
  """
  num_experts = probs.shape[-1]
  scores = probs if scores is None else scores
  top1 = jax.nn.one_hot(jnp.argmax(scores, axis=-1), num_experts)
  per_expert = jnp.mean(top1, axis=1) * jnp.mean(probs, axis=1)
  return jnp.mean(jnp.mean(per_expert, axis=-1)) * num_experts**2


def switch_loss(probs: Array, expert_index: Array, requested: Array) -> Array:
  """Switch Transformer load-balancing loss, for K choices per token.

  `E * sum_e f_e * P_e`, where f_e is the fraction of the G S K choices
  that ask for expert e (before capacity) and P_e the mean of `probs[..., e]`
  over the group; the gradient flows through P only. Equal to 1 when both
  are uniform; for K = 1 it is the Switch paper's loss (and `gshard_loss`).

  Args:
    probs: `[G, S, E]` router probabilities.
    expert_index: `[G, S, K]` int, the experts chosen by each token.
    requested: `[G, S, K]` bool, whether a choice is dispatched at all; a
      choice not requested counts for no expert.

  Returns:
    Scalar loss, mean over G.
  """
  num_experts = probs.shape[-1]
  num_choices = expert_index.shape[-1]
  chosen = jnp.sum(jax.nn.one_hot(expert_index, num_experts) *
                   requested[..., None], axis=2)
  fraction = jnp.mean(chosen, axis=1) / num_choices
  return jnp.mean(jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1) *
                  num_experts)


def z_loss(logits: Array) -> Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp_e(logits)^2.

  Args:
    logits: `[G, S, E]` router logits.

  Returns:
    Scalar loss.
  """
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def weighted_sum(losses: Mapping[str, Array],
                 weights: Mapping[str, float]) -> Array:
  """Returns `sum_name weights[name] * losses[name]` (float32 scalar).

  Losses of weight 0 are left out, so that a loss nobody asked for cannot
  turn the sum into NaN.

  Args:
    losses: scalar losses by name (e.g. a router's metrics).
    weights: the weight of each loss to add; every name must be in
      `losses`.

  Returns:
    The weighted sum; 0 when every weight is 0.

  Raises:
    KeyError: a weighted name has no loss.
  """
  missing = sorted(name for name in weights if name not in losses)
  if missing:
    raise KeyError(f"weighted losses {missing} are not among the computed "
                   f"losses {sorted(losses)}.")
  total = jnp.zeros((), jnp.float32)
  for name, weight in weights.items():
    if weight:
      total = total + weight * jnp.asarray(losses[name], jnp.float32)
  return total
