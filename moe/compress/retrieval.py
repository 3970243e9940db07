"""Retrieval metrics with class labels as relevance.

Each query ranks the whole corpus by cosine similarity (ties: the lower
corpus index first); an item is relevant when it has the query's label. R is
the number of relevant items of the corpus, rel_i whether the i-th ranked
item is relevant (i = 1, 2, ...):

  nDCG@k    Σ_{i<=k} rel_i / log2(i + 1), divided by its best value
            Σ_{i<=min(k, R)} 1 / log2(i + 1) (binary gains);
  recall@k  1 if a relevant item is in the top k, else 0: the Recall@K of
            metric learning (Song et al., 2016), since with hundreds of
            relevant items per class the IR ratio |top k ∩ relevant| / R
            could not exceed k / R;
  mAP@k     AP@k = Σ_{i<=k} rel_i P@i / min(k, R), P@i the precision of the
            top i; its mean over queries.

A query without a relevant item scores 0 on all three. Values are per query,
to be averaged over the real queries of padded eval batches.

Shapes: Q queries, N corpus items, D width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe import ops
from moe.compress import rank_loss

NDCG_AT, RECALL_AT, MAP_AT = 10, 10, 100


def _discounts(k: int) -> jax.Array:
  return 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))


def retrieval_metrics(queries: jax.Array, query_labels: jax.Array,
                      corpus: jax.Array, corpus_labels: jax.Array, *,
                      ndcg_at: int = NDCG_AT, recall_at: int = RECALL_AT,
                      map_at: int = MAP_AT) -> dict[str, jax.Array]:
  """Per-query nDCG@k, recall@k and AP@k (module docstring).

  Args:
    queries: `[Q, D]`.
    query_labels: int `[Q]`.
    corpus: `[N, D]`.
    corpus_labels: int `[N]`.
    ndcg_at: k of nDCG, in 1..N.
    recall_at: k of recall, in 1..N.
    map_at: k of mAP, in 1..N.

  Returns:
    float32 `[Q]` arrays named `ndcg@<k>`, `recall@<k>`, `map@<k>`.
  """
  num_items = corpus.shape[0]
  for name, k in (("ndcg_at", ndcg_at), ("recall_at", recall_at),
                  ("map_at", map_at)):
    if not 1 <= k <= num_items:
      raise ValueError(f"{name} must be in 1..{num_items} (the corpus size), "
                       f"got {k}.")
  sims = rank_loss.normalize(queries) @ rank_loss.normalize(corpus).T
  depth = max(ndcg_at, recall_at, map_at)
  _, ranked = ops.top_k_by_sort(sims, depth)
  relevant = (corpus_labels[ranked] == query_labels[:, None]).astype(
      jnp.float32)
  total = jnp.sum(corpus_labels[None, :] == query_labels[:, None],
                  axis=1).astype(jnp.float32)

  discounts = _discounts(ndcg_at)
  dcg = relevant[:, :ndcg_at] @ discounts
  ideal = jnp.cumsum(discounts)[jnp.clip(total.astype(jnp.int32), 1,
                                         ndcg_at) - 1]
  hits = relevant[:, :map_at]
  precision = jnp.cumsum(hits, axis=1) / jnp.arange(1, map_at + 1)
  has_relevant = total > 0
  return {
      f"ndcg@{ndcg_at}": jnp.where(has_relevant, dcg / ideal, 0.0),
      f"recall@{recall_at}": jnp.max(relevant[:, :recall_at], axis=1),
      f"map@{map_at}": jnp.where(
          has_relevant, jnp.sum(hits * precision, axis=1)
          / jnp.maximum(jnp.minimum(total, map_at), 1), 0.0),
  }
