"""Pruning masks by top-k in magnitude, and the sparsity schedule.

A pruned parameter W (any shape, N entries) has a mask M of W's shape, 1.0
on the kept ("important") weights and 0.0 on the pruned ones. Masks only
shrink: a new mask keeps the k weights of largest |W| among those the
current mask keeps, so weights pruned in an earlier round stay pruned.

Scope "layer" keeps k = N - round(s N) weights of every parameter; scope
"global" ranks the weights of all pruned parameters together and keeps
sum(N) - round(s sum(N)) of them, so layers end at different sparsities.
Ties in |W| are broken by position, so the count is exact in both scopes.

Soft pruning replaces W in the forward pass by σ · topk_magnitude(W / σ, k)
(`moe.ops.topk_magnitude`, σ the root mean square of the kept weights, no
gradient through σ): exactly 0 on the small weights, W itself on the
clearly large ones, a differentiable shrinkage in between, so the gradient
decides which weights near the threshold survive the next hard round.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from moe import ops
from moe.config import param_names

SCOPES = ("layer", "global")
METHODS = ("hard", "soft")


def check_sparsity(value, field: str) -> float:
  """Returns `value` if it is a number in [0, 1), else raises naming it."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not 0 <= value < 1):
    raise ValueError(f"{field} must be a number in [0, 1), got {value!r}.")
  return float(value)


def cubic_sparsity(round_index: int, num_rounds: int, initial: float,
                   final: float) -> float:
  """Zhu & Gupta (2017): s_r = s_f + (s_i - s_f) (1 - r / R)^3.

  Args:
    round_index: r in 0..R (0: before the first round).
    num_rounds: R >= 1.
    initial: s_i, the sparsity before pruning.
    final: s_f, the sparsity after the last round.

  Returns:
    The sparsity of round r; fast pruning early, slow near the end.
  """
  return final + (initial - final) * (1 - round_index / num_rounds) ** 3


def keep_count(size: int, sparsity: float) -> int:
  """Weights kept out of `size` at `sparsity`: size - round(sparsity size)."""
  return size - int(round(sparsity * size))


def select_params(names: Sequence[str], patterns: Sequence[str],
                  field: str) -> tuple[str, ...]:
  """The parameter names that fully match one of `patterns`.

  Raises:
    ValueError: naming `field` if a pattern matches no parameter.
  """
  compiled = param_names.compile_regexes(patterns, field)
  param_names.check_every_pattern_matches(compiled, names, field)
  return tuple(name for name in names
               if param_names.matches_any(compiled, name))


def _top_count_mask(scores: jax.Array, k: jax.Array) -> jax.Array:
  """1.0 on the k largest of the flat `scores` (ties: the first), else 0.0.

  `k` may be traced: the mask comes from ranks, not from a static top_k.
  """
  order = jnp.argsort(-scores, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(
      jnp.arange(scores.size, dtype=order.dtype))
  return (ranks < k).astype(jnp.float32)


def magnitude_masks(weights: Mapping[str, jax.Array],
                    masks: Mapping[str, jax.Array],
                    keep: Mapping[str, jax.Array] | jax.Array,
                    scope: str) -> dict[str, jax.Array]:
  """New masks: the largest |W| among the weights the current masks keep.

  Args:
    weights: name -> W.
    masks: name -> current M (W's shape).
    keep: scope "layer": name -> k (int, may be traced); "global": the total
      k over all parameters.
    scope: one of SCOPES.

  Returns:
    name -> new M, with exactly k ones (per parameter, or in total).
  """
  scores = {name: jnp.where(masks[name] > 0, jnp.abs(w), -1.0).reshape(-1)
            for name, w in weights.items()}
  if scope == "layer":
    return {name: _top_count_mask(score, keep[name]).reshape(
        weights[name].shape) for name, score in scores.items()}
  flat = _top_count_mask(jnp.concatenate(list(scores.values())), keep)
  return _split_like(flat, weights)


def soft_pruned(weights: Mapping[str, jax.Array],
                masks: Mapping[str, jax.Array],
                keep: Mapping[str, int] | int, scope: str, *,
                regularization: float, p: float) -> dict[str, jax.Array]:
  """σ · topk_magnitude((W ⊙ M) / σ, k) per parameter or over all of them.

  Args:
    weights: name -> W.
    masks: name -> M; weights outside it stay exactly 0.
    keep: static k per name ("layer") or in total ("global").
    scope: one of SCOPES.
    regularization: λ of the soft top-k, relative to σ.
    p: its p-norm exponent.

  Returns:
    name -> the pruned W used by the forward pass.
  """
  def shrink(flat, mask, k):
    kept = jnp.maximum(jnp.sum(mask), 1.0)
    scale = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(flat)) / kept))
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale * ops.topk_magnitude(flat / scale, k,
                                      regularization=regularization, p=p)

  flats = {name: (w * masks[name]).reshape(-1) for name, w in weights.items()}
  if scope == "layer":
    return {name: shrink(flat, masks[name], keep[name]).reshape(
        weights[name].shape) for name, flat in flats.items()}
  out = shrink(jnp.concatenate(list(flats.values())),
               jnp.concatenate([masks[n].reshape(-1) for n in flats]), keep)
  return _split_like(out, weights)


def _split_like(flat: jax.Array, like: Mapping[str, jax.Array]
                ) -> dict[str, jax.Array]:
  """Cuts a concatenation of `like`'s flattened arrays back into them."""
  out, start = {}, 0
  for name, value in like.items():
    out[name] = flat[start:start + value.size].reshape(value.shape)
    start += value.size
  return out


def keep_counts(sizes: Mapping[str, int], sparsity: float, scope: str
                ) -> dict[str, int] | int:
  """Static k at `sparsity`: per name ("layer") or in total ("global")."""
  if scope == "layer":
    return {name: keep_count(size, sparsity) for name, size in sizes.items()}
  return keep_count(sum(sizes.values()), sparsity)
