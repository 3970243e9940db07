"""Which embedding dimensions to keep: learnable logits and three selectors.

SMEC's Adaptive Dimension Selection (Zhang et al., EMNLP 2025) learns one
logit per dimension and keeps the d dimensions of largest logit. Training
needs a mask that the loss can differentiate; the selectors give it, over a
pool of M candidate dimensions (all D at first; in sequential halving, the
dimensions an earlier stage kept):

  gumbel_topk  the paper's selector, stochastic: Gumbel noise g on the
               logits, y = l + g; the forward mask is the hard top-d of y,
               the gradient is that of the relaxed top-d of Xie and Ermon
               (2019) at temperature τ, d successive softmaxes
                 y_1 = y,  a_j = softmax(y_j / τ),
                 y_{j+1} = y_j + log(1 - a_j),
               summed (straight-through: hard + (soft - stop_gradient(soft)),
               exactly the hard mask forward).
  sparse_topk  `moe.ops.topk_mask(l, d)`: deterministic, exactly sparse,
               values in [0, 1] summing to d; the gradient is the operator's
               own, nonzero on the dimensions its support keeps partially.
  hard_ste     the hard top-d of l forward, identity gradient to l
               (straight-through estimator).

At inference every selector keeps the same dimensions, the top-d logits of
the pool (`kept_indices`), gathered into a d-dimensional embedding.

Shapes: B examples, D dimensions, M pool size, d kept dimensions.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from moe import ops

SELECTORS = ("gumbel_topk", "sparse_topk", "hard_ste")


def check_dims(dims: Sequence[int], width: int, field: str) -> tuple[int, ...]:
  """Checks kept sizes against the width D; returns them as a tuple.

  Args:
    dims: the sizes to keep, strictly decreasing, each in 1..D-1.
    width: D.
    field: the config field, for the message.

  Raises:
    ValueError: naming `field` and the allowed range.
  """
  dims = tuple(dims)
  if not dims:
    raise ValueError(f"{field} must name at least one size in 1..{width - 1}.")
  for d in dims:
    if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < width:
      raise ValueError(f"{field}: every size must be an int in "
                       f"1..{width - 1} (the embedding has D={width}); got "
                       f"{d!r} in {dims}.")
  if any(a <= b for a, b in zip(dims, dims[1:])):
    raise ValueError(f"{field} must be strictly decreasing, got {dims}.")
  return dims


def hard_topk(scores: jax.Array, k: int) -> jax.Array:
  """The 0/1 indicator `[M]` of the k largest scores (ties: lower index)."""
  _, index = ops.top_k_by_sort(scores, k)
  return jnp.zeros(scores.shape, scores.dtype).at[index].set(1)


def _log_one_minus_softmax(y: jax.Array) -> jax.Array:
  """log(1 - softmax(y)) `[M]`, accurate where the softmax is near 1.

  Only the largest entry can exceed 1/2; there 1 - a is the softmax mass
  of the others, exp(logsumexp(others) - logsumexp(y)), whatever the gap.
  """
  a = jax.nn.softmax(y)
  is_top = jnp.arange(y.shape[-1]) == jnp.argmax(y)
  rest = (jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, y))
          - jax.nn.logsumexp(y))
  return jnp.where(is_top & (a > 0.5), rest,
                   jnp.log1p(-jnp.minimum(a, 0.5)))


def relaxed_topk(scores: jax.Array, k: int,
                 temperature: float = 1.0) -> jax.Array:
  """Xie and Ermon's relaxed top-k: k successive softmaxes at temperature
  τ, summed `[M]` (k < M); the hard top-k as τ -> 0."""
  def one_more(_, carry):
    total, y = carry
    return (total + jax.nn.softmax(y / temperature),
            y + _log_one_minus_softmax(y / temperature))

  total, _ = jax.lax.fori_loop(0, k, one_more,
                               (jnp.zeros_like(scores), scores))
  return total


def pool_indices(pool: jax.Array, size: int) -> jax.Array:
  """The indices `[size]` of the ones of a 0/1 pool mask `[D]`, ascending."""
  return jnp.nonzero(pool > 0, size=size, fill_value=0)[0]


def train_mask(logits: jax.Array, pool: jax.Array, d: int, *, selector: str,
               rng: jax.Array | None = None, temperature: float = 1.0,
               regularization: float = 0.1, p: float = 4 / 3) -> jax.Array:
  """The differentiable selection mask of training (module docstring).

  Args:
    logits: `[D]` learnable logits.
    pool: int32 `[M]` candidate dimensions (`pool_indices`).
    d: dimensions to keep, in 1..M.
    selector: one of SELECTORS.
    rng: the Gumbel noise's key (gumbel_topk only).
    temperature: τ of gumbel_topk.
    regularization: λ of sparse_topk.
    p: p-norm exponent of sparse_topk.

  Returns:
    `[D]`: zero outside the pool; d entries of 1 (gumbel_topk, hard_ste) or
    values in [0, 1] summing to d (sparse_topk) inside it.
  """
  scores = logits[pool]
  if selector == "sparse_topk":
    mask = ops.topk_mask(scores, d, regularization=regularization, p=p)
  elif selector == "gumbel_topk":
    if rng is None:
      raise ValueError("selector 'gumbel_topk' needs an rng.")
    noisy = scores + jax.random.gumbel(rng, scores.shape)
    soft = relaxed_topk(noisy, d, temperature)
    mask = hard_topk(noisy, d) + (soft - jax.lax.stop_gradient(soft))
  elif selector == "hard_ste":
    mask = hard_topk(scores, d) + (scores - jax.lax.stop_gradient(scores))
  else:
    raise ValueError(f"selector must be one of {', '.join(SELECTORS)}; got "
                     f"{selector!r}.")
  return jnp.zeros(logits.shape, mask.dtype).at[pool].set(mask)


def kept_indices(logits: jax.Array, pool: jax.Array, d: int) -> jax.Array:
  """The kept dimensions at inference: the top-d logits of the pool.

  Args:
    logits: `[D]`.
    pool: int32 `[M]` candidate dimensions.
    d: in 1..M.

  Returns:
    int32 `[d]`, ascending.
  """
  _, best = ops.top_k_by_sort(logits[pool], d)
  return jnp.sort(pool[best])


def keep_mask(indices: jax.Array, width: int) -> jax.Array:
  """The 0/1 float mask `[D]` of kept `indices`."""
  return jnp.zeros((width,), jnp.float32).at[indices].set(1)


def select(embeddings: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers the kept dimensions: `[B, D]` -> `[B, d]`."""
  return jnp.take(embeddings, indices, axis=-1)
