"""S-XBM: a FIFO queue of frozen-backbone embeddings, mined for hard pairs.

SMEC's selectable cross-batch memory keeps the full (frozen) embeddings of
the last Q training examples. Each query's m most similar entries, by the
full embeddings, join its candidates in the rank loss: neighbours too close
to tell apart inside one batch. The queue holds full embeddings, not
compressed ones, so nothing in it goes stale as the selection trains: the
compressed view of an entry is recomputed at every step.

The memory is a dict of float arrays (it lives in the task's parameters,
untrained, and is checkpointed with them):

  embeddings  [Q, D]  the entries;
  filled      [Q]     1 where a slot holds an entry;
  pointer     []      the next slot to write, in 0..Q-1 (exact as float32
                      for Q < 2**24).

An entry whose full embedding equals the query's (cosine >= 1 - 1e-5: the
same example seen in an earlier epoch) is not a pair and is left out.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from moe import ops
from moe.compress import rank_loss

Memory = Mapping[str, jax.Array]
DUPLICATE_COSINE = 1 - 1e-5


def check_sizes(size: int, neighbors: int, batch_size: int,
                field: str) -> None:
  """Raises a ValueError unless 0 < batch_size <= size and
  1 <= neighbors <= size."""
  for name, value in ((f"{field}.memory_size", size),
                      (f"{field}.memory_neighbors", neighbors)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  if neighbors > size:
    raise ValueError(f"{field}.memory_neighbors must be in 1..memory_size="
                     f"{size}, got {neighbors}.")
  if batch_size > size:
    raise ValueError(f"{field}.memory_size={size} must hold one global batch "
                     f"(config.dataset.batch_size={batch_size}).")


def init_memory(size: int, width: int) -> dict[str, jax.Array]:
  """An empty memory of `size` entries of `width` dimensions."""
  return {"embeddings": jnp.zeros((size, width), jnp.float32),
          "filled": jnp.zeros((size,), jnp.float32),
          "pointer": jnp.zeros((), jnp.float32)}


def enqueue(memory: Memory, embeddings: jax.Array) -> dict[str, jax.Array]:
  """Writes `[B, D]` embeddings over the oldest entries (B <= Q)."""
  size = memory["filled"].shape[0]
  slots = (memory["pointer"].astype(jnp.int32)
           + jnp.arange(embeddings.shape[0])) % size
  return {"embeddings": memory["embeddings"].at[slots].set(
              embeddings.astype(jnp.float32)),
          "filled": memory["filled"].at[slots].set(1.0),
          "pointer": ((memory["pointer"] + embeddings.shape[0])
                      % size).astype(jnp.float32)}


def hard_neighbors(memory: Memory, queries: jax.Array, k: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Each query's k most similar memory entries, by cosine similarity.

  Args:
    memory: the memory (module docstring).
    queries: `[B, D]` full embeddings.
    k: neighbours per query, in 1..Q.

  Returns:
    `(neighbors [B, k, D], valid bool [B, k])`; invalid where the slot is
    empty or the entry duplicates the query.
  """
  entries = jax.lax.stop_gradient(memory["embeddings"])
  sims = rank_loss.normalize(queries) @ rank_loss.normalize(entries).T
  usable = (memory["filled"][None, :] > 0) & (sims < DUPLICATE_COSINE)
  scores, index = ops.top_k_by_sort(jnp.where(usable, sims, -jnp.inf), k)
  return entries[index], jnp.isfinite(scores)
