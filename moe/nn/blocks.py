"""Leaf building blocks shared by every model family.

Shapes: B batch, L tokens per example, D width, H hidden width of an MLP.

Parameter names follow the public ViT checkpoints (google-research/
vision_transformer, big_vision): an MLP block holds `Dense_0` (`[D, H]`) and
`Dense_1` (`[H, D]`); a position embedding holds `pos_embedding`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class MlpBlock(nn.Module):
  """Two dense layers with a GELU in between: `[..., D] -> [..., D]`.

  Attributes:
    mlp_dim: hidden width H.
    dropout_rate: dropout after each dense layer at train time.
    dtype: computation dtype (parameters stay float32).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Applies the MLP.

    `train` is positional (not keyword-only) so that `nn.vmap` can broadcast
    it when the block is stacked into experts.

    Args:
      x: `[..., D]` inputs.
      train: whether dropout is active (needs the "dropout" rng).

    Returns:
      `[..., D]` outputs in `dtype`.
    """
    dense = functools.partial(
        nn.Dense, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, name="Dense_0")(x)
    y = nn.gelu(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = dense(x.shape[-1], name="Dense_1")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class PositionEmbedding(nn.Module):
  """Adds a learned position embedding `pos_embedding` `[1, L, D]`.

  Attributes:
    stddev: standard deviation of the normal initialiser.
  """
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Returns `x + pos_embedding` for `x` of shape `[B, L, D]`."""
    if x.ndim != 3:
      raise ValueError(f"x must have shape [B, L, D], got shape {x.shape}.")
    embedding = self.param("pos_embedding",
                           nn.initializers.normal(stddev=self.stddev),
                           (1,) + x.shape[1:])
    return x + embedding
