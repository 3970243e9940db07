"""Pre-norm transformer encoder whose MLPs may be mixtures of experts.

Shapes: B batch, L tokens per example, D width, H hidden width of an MLP.

Parameter names follow the public ViT checkpoints (google-research/
vision_transformer, big_vision):

  posembed_input/pos_embedding                  [1, L, D]
  encoderblock_N/LayerNorm_0/{scale,bias}       [D]
  encoderblock_N/MultiHeadDotProductAttention_1/{query,key,value}/kernel
                                                [D, heads, D / heads]
  encoderblock_N/MultiHeadDotProductAttention_1/out/kernel
                                                [heads, D / heads, D]
                                                (also with `attention` set:
                                                `attention.SelfAttention`,
                                                plus its gate parameters)
  encoderblock_N/LayerNorm_2/{scale,bias}       [D]
  encoderblock_N/MlpBlock_3/Dense_{0,1}/...     dense MLP (`blocks.MlpBlock`)
  encoderblock_N/MoeBlock_3/...                 MoE MLP (`moe_layer`)
  encoder_norm/{scale,bias}                     [D]
"""
from __future__ import annotations

import numbers
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.nn import attention as attention_lib
from moe.nn import blocks
from moe.nn import moe_layer

Array = jax.Array
Metrics = dict[str, Array]
MoeLayers = Union[str, Sequence[int]]


def moe_layer_indices(layers: MoeLayers, num_layers: int) -> tuple[int, ...]:
  """Resolves `moe.layers` into sorted block indices.

  Args:
    layers: a sequence of block indices in `0..num_layers-1`, or a preset:
      "every_N" (blocks N-1, 2N-1, ...: "every_2" is every other block, the
      V-MoE choice) or "last_N" (the last N blocks).
    num_layers: number of encoder blocks.

  Returns:
    The sorted, distinct indices.
  """
  if isinstance(layers, str):
    match = re.fullmatch(r"(every|last)_([1-9][0-9]*)", layers)
    if match is None:
      raise ValueError(f"moe.layers must be a tuple of block indices or one of "
                       f"'every_N', 'last_N' (e.g. 'every_2', 'last_2'), got "
                       f"{layers!r}.")
    n = int(match.group(2))
    if n > num_layers:
      raise ValueError(f"moe.layers={layers!r} does not fit an encoder of "
                       f"num_layers={num_layers} blocks.")
    if match.group(1) == "every":
      return tuple(range(n - 1, num_layers, n))
    return tuple(range(num_layers - n, num_layers))
  if any(not isinstance(i, numbers.Integral) or not 0 <= i < num_layers
         for i in layers):
    raise ValueError(f"moe.layers must hold block indices in "
                     f"0..{num_layers - 1} (num_layers={num_layers}), got "
                     f"{tuple(layers)}.")
  return tuple(sorted({int(i) for i in layers}))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: `x + Attn(LN(x))`, then `x + Mlp(LN(x))`.

  The MLP is dense (`MlpBlock_3`) or a mixture of experts (`MoeBlock_3`) when
  `moe` is given. Tokens the MoE layer drops get a zero MLP output, so they
  pass through the residual connection unchanged.

  Attributes:
    mlp_dim: hidden width H of the MLP (of each expert for an MoE).
    num_heads: number of attention heads; must divide D.
    dropout_rate: dropout after the attention and after each dense layer of
      the MLP (of the experts).
    attention_dropout_rate: dropout on the attention weights.
    stochastic_depth: probability of dropping each residual branch of an
      example at train time (drop path); 0 disables it.
    moe: None for a dense MLP, else the attributes of
      `moe_layer.MoeMlpBlock` other than `mlp_dim` and `dropout_rate`.
    attention: None for flax's dense attention, else the attributes of
      `attention.SelfAttention` other than `num_heads` and `dropout_rate`
      (e.g. `sparsity`, `causal`, `keys_per_query`); same parameters.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  moe: Optional[Mapping[str, Any]] = None
  attention: Optional[Mapping[str, Any]] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None) -> tuple[Array, Metrics]:
    """Applies the block.

    Args:
      x: `[B, L, D]` tokens.
      train: whether dropout, drop path and router noise are active.
      step: the train step (router schedules); None: their end.

    Returns:
      `[B, L, D]` tokens and metrics: the MoE layer's (none for a dense
      MLP) and, with `attention` set, the attention's under
      `attention/<name>`.
    """
    if x.shape[-1] % self.num_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must divide the width "
                       f"D ({x.shape[-1]}).")
    deterministic = not train
    drop_path = nn.Dropout(self.stochastic_depth,
                           broadcast_dims=tuple(range(1, x.ndim)))

    y, metrics = self._attention(nn.LayerNorm(name="LayerNorm_0")(x), train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + drop_path(y, deterministic=deterministic)

    y = nn.LayerNorm(name="LayerNorm_2")(x)
    if self.moe is None:
      y = blocks.MlpBlock(self.mlp_dim, self.dropout_rate, name="MlpBlock_3")(
          y, train)
    else:
      y, moe_metrics = moe_layer.MoeMlpBlock(
          mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
          name="MoeBlock_3", **self.moe)(y, train=train, step=step)
      metrics.update(moe_metrics)
    return x + drop_path(y, deterministic=deterministic), metrics

  def _attention(self, y: Array, train: bool) -> tuple[Array, Metrics]:
    """Self-attention of `[B, L, D]` y and its metrics `attention/<name>`."""
    name = "MultiHeadDotProductAttention_1"
    if self.attention is None:
      return nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads,
          dropout_rate=self.attention_dropout_rate,
          broadcast_dropout=False,
          kernel_init=nn.initializers.xavier_uniform(),
          name=name)(y, y, deterministic=not train), {}
    y, metrics = attention_lib.SelfAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        name=name, **self.attention)(y, train=train)
    return y, {f"attention/{key}": value for key, value in metrics.items()}


class Encoder(nn.Module):
  """Position embedding, a stack of `EncoderBlock`s and a final LayerNorm.

  Attributes:
    num_layers: number of blocks.
    mlp_dim: hidden width H of the MLPs.
    num_heads: attention heads.
    moe: None for a dense encoder, else `layers` (see `moe_layer_indices`)
      plus the attributes of `moe_layer.MoeMlpBlock` other than `mlp_dim`
      and `dropout_rate` (`num_experts`, `num_selected_experts`,
      `group_size`, `router`, `dispatcher`, `dtype`).
    dropout_rate: dropout after the position embedding and in every block.
    attention_dropout_rate: dropout on the attention weights.
    stochastic_depth: drop-path rate of the last block; block i uses
      `stochastic_depth * i / (num_layers - 1)` (0 for the first block).
    attention: None for dense attention, else the attributes of
      `attention.SelfAttention` other than `num_heads` and `dropout_rate`
      (`sparsity`, `causal`, `keys_per_query`, ...), for every block.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  moe: Optional[Mapping[str, Any]] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    if not isinstance(self.num_layers, int) or self.num_layers < 1:
      raise ValueError(f"num_layers must be an int >= 1, got "
                       f"{self.num_layers!r}.")
    if self.moe is not None:
      if "layers" not in self.moe:
        raise ValueError("moe.layers is required when moe is set, e.g. "
                         "'every_2', 'last_2' or a tuple of block indices.")
      moe_layer_indices(self.moe["layers"], self.num_layers)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None) -> tuple[Array, Metrics]:
    """Encodes `[B, L, D]` tokens.

    Args:
      x: `[B, L, D]` embedded patches (and class token), before the
        position embedding, which the encoder adds.
      train: whether dropout, drop path and router noise are active (in
        every block).
      step: the train step (router schedules); None: their end.

    Returns:
      `[B, L, D]` encoded tokens and metrics: `auxiliary_loss`, the sum of
      the MoE layers' auxiliary losses (0 for a dense encoder), and every
      block's metrics (MoE layer, `attention/...`) under
      `encoderblock_N/<metric>`.
    """
    x = blocks.PositionEmbedding(name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    moe_layers, moe_kwargs = (), None
    if self.moe is not None:
      moe_kwargs = dict(self.moe)
      moe_layers = moe_layer_indices(moe_kwargs.pop("layers"), self.num_layers)

    metrics, auxiliary_loss = {}, 0.
    for i in range(self.num_layers):
      x, block_metrics = EncoderBlock(
          mlp_dim=self.mlp_dim,
          num_heads=self.num_heads,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          stochastic_depth=(self.stochastic_depth * i /
                            max(self.num_layers - 1, 1)),
          moe=moe_kwargs if i in moe_layers else None,
          attention=self.attention,
          name=f"encoderblock_{i}")(x, train=train, step=step)
      for key, value in block_metrics.items():
        metrics[f"encoderblock_{i}/{key}"] = value
      auxiliary_loss += block_metrics.get("auxiliary_loss", 0.)
    metrics["auxiliary_loss"] = jnp.asarray(auxiliary_loss, jnp.float32)
    return nn.LayerNorm(name="encoder_norm")(x), metrics
