"""The rank loss between full and compressed similarity structure.

For query i and candidates j (the other examples of the batch, plus hard
pairs from a cross-batch memory), s_ij is the cosine similarity of the full
embeddings (the teacher, fixed) and t_ij that of the compressed ones. The
loss is a listwise KL divergence between the two rankings, each turned into
a distribution over the candidates by a softmax at temperature τ:

  P_ij = softmax_j(s_ij / τ),   Q_ij = softmax_j(t_ij / τ),
  L = mean_i Σ_j P_ij (log P_ij - log Q_ij).

Why listwise KL rather than pairwise hinge or logistic terms over
(j, k) pairs: it costs O(B M) instead of O(B M²); it is smooth, so every
selector's gradient (straight-through or soft top-k) passes through it
unchanged; and at a small τ it weights the head of each query's ranking,
the neighbours that nDCG@10 and recall@10 score, while the tail barely
counts. L = 0 exactly when the compressed similarities rank and space the
candidates as the full ones do, up to a shift per query.

Shapes: B queries, M candidates, D width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm; zero rows stay zero, with a finite
  gradient (empty memory slots)."""
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))


def candidate_similarities(queries: jax.Array, batch: jax.Array,
                           neighbors: jax.Array | None = None) -> jax.Array:
  """Cosine similarities of each query to the batch and to its neighbours.

  Args:
    queries: `[B, D]`.
    batch: `[B, D]`, the in-batch candidates (row i is query i itself).
    neighbors: `[B, m, D]`, each query's own extra candidates, or None.

  Returns:
    `[B, B + m]`: column j < B is example j of the batch, then the m
    neighbours of the row's query.
  """
  queries = normalize(queries)
  sims = queries @ normalize(batch).T
  if neighbors is None:
    return sims
  extra = jnp.einsum("bd,bmd->bm", queries, normalize(neighbors))
  return jnp.concatenate([sims, extra], axis=1)


def listwise_rank_loss(teacher: jax.Array, student: jax.Array,
                       valid: jax.Array, temperature: float) -> jax.Array:
  """The listwise KL rank loss (module docstring), averaged over queries.

  Args:
    teacher: `[B, M]` similarities s of the full embeddings (no gradient
      flows to them).
    student: `[B, M]` similarities t of the compressed embeddings.
    valid: bool `[B, M]`, the candidates each query ranks (not itself, not
      empty memory slots); every row needs one.
    temperature: τ > 0.

  Returns:
    The scalar loss.
  """
  teacher = jax.lax.stop_gradient(teacher)
  log_p = jax.nn.log_softmax(
      jnp.where(valid, teacher / temperature, -jnp.inf), axis=-1)
  log_q = jax.nn.log_softmax(
      jnp.where(valid, student / temperature, -jnp.inf), axis=-1)
  p = jnp.exp(log_p)
  kl = jnp.sum(jnp.where(valid, p * (log_p - log_q), 0.0), axis=-1)
  return jnp.mean(kl)
