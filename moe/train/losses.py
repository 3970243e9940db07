"""Per-example classification losses, chosen by name in `config.task.loss`.

Every loss maps logits `[B, C]` and label weights `[B, C]` (one-hot,
multi-hot or smoothed) to per-example losses `[B]`; the task averages them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy: `-sum_c labels_c * log softmax(logits)_c`."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-class sigmoid cross-entropy summed over the classes.

  For multi-label data such as ImageNet-21k (the V-MoE choice there).
  """
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


LOSSES: dict[str, Loss] = {
    "softmax_xent": softmax_xent,
    "sigmoid_xent": sigmoid_xent,
}
