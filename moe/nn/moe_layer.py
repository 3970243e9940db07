"""The mixture-of-experts MLP layer: route, dispatch, run experts, combine.

Shapes as in `moe.nn.dispatch` (G, S, D, E, C, K), plus H the hidden width
of an expert. Parameters of a `MoeMlpBlock`:

  Router/dense/kernel       [D, E]
  Experts/Dense_0/kernel    [E, D, H]
  Experts/Dense_0/bias      [E, H]
  Experts/Dense_1/kernel    [E, H, D]
  Experts/Dense_1/bias      [E, D]

Every expert parameter has the leading E axis, so one partition rule on
`Experts/` shards them all over the mesh's expert axis. An expert has the
parameter names of a dense `moe.nn.blocks.MlpBlock`, so a dense checkpoint is
upcycled by tiling its `MlpBlock_3/Dense_*` over E.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import schema
from moe.nn import blocks
from moe.nn import dispatch
from moe.nn import routers

Array = jax.Array
Metrics = dict[str, Array]

# E independent `MlpBlock`s: `Experts(mlp_dim, dropout_rate, dtype)(x, train)`
# maps `[E, N, D]` to `[E, N, D]`, expert e applied to `x[e]`. Parameters and
# dropout masks are drawn independently per expert.
Experts = nn.vmap(
    blocks.MlpBlock,
    in_axes=(0, None),
    out_axes=0,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True})


class MoeMlpBlock(nn.Module):
  """A sparse mixture of MLP experts in place of a dense MLP block.

  Tokens are split into groups of S; the router assigns each group's tokens
  to expert buffers of capacity C; experts run on their buffers; outputs are
  summed back with the combine weights. A token dispatched to no expert gets
  output 0.

  Attributes:
    num_experts: E.
    num_selected_experts: K, experts per token (see the routers for the
      exact meaning per router); sets the capacity.
    mlp_dim: hidden width H of each expert.
    group_size: S, tokens per group; None: the tokens of one example (the
      second-to-last axis of the input). Must divide the number of tokens.
    router: `name` of the router (a key of `moe.nn.routers.ROUTERS`) and its
      other attributes, e.g. `{"name": "SparseTopK", "capacity_factor":
      1.25}`.
    dispatcher: "einsum" or "index" (same results; see `moe.nn.dispatch`).
    dropout_rate: dropout inside the experts at train time.
    dtype: dtype of dispatch, expert computation and combine (e.g.
      "bfloat16"); the router and the parameters stay float32 and the output
      has the dtype of the input.
  """
  num_experts: int
  num_selected_experts: int
  mlp_dim: int
  group_size: Optional[int] = None
  router: Mapping[str, Any] = flax.core.FrozenDict(name="SparseTopK")
  dispatcher: str = "einsum"
  dropout_rate: float = 0.0
  dtype: Any = "float32"

  def __post_init__(self):
    dispatch.check_dispatcher_name(self.dispatcher)
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise ValueError(f"dtype must be a floating dtype (e.g. 'float32', "
                       f"'bfloat16'), got {self.dtype!r}.")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"group_size must be None or an int >= 1, got "
                       f"{self.group_size!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Metrics]:
    """Applies the layer.

    Args:
      x: `[..., L, D]` tokens, e.g. `[B, L, D]`; all of them are grouped.
      train: whether router noise (rng "gating"), dropout (rng "dropout") and
        the train-time capacity factor apply.

    Returns:
      Outputs of the shape and dtype of `x`, and the router metrics (see
      `moe.nn.routers`).
    """
    if x.ndim < 2:
      raise ValueError(f"x must have shape [..., L, D], got shape {x.shape}.")
    width = x.shape[-1]
    num_tokens = math.prod(x.shape[:-1])
    group_size = self.group_size or x.shape[-2]
    if num_tokens % group_size:
      raise ValueError(
          f"group_size ({group_size}) must divide the number of tokens "
          f"({num_tokens} = product of the input shape {x.shape[:-1]}).")
    groups = x.reshape(-1, group_size, width)

    router = routers.create_router(
        self.router, num_experts=self.num_experts,
        num_selected_experts=self.num_selected_experts,
        dispatcher=self.dispatcher, name="Router")
    dispatcher, metrics = router(groups, train=train)

    dtype = jnp.dtype(self.dtype)
    inputs = dispatcher.dispatch(groups.astype(dtype))
    num_experts, num_groups, capacity, _ = inputs.shape
    outputs = Experts(self.mlp_dim, self.dropout_rate, dtype, name="Experts")(
        inputs.reshape(num_experts, num_groups * capacity, width), train)
    outputs = dispatcher.combine(
        outputs.reshape(num_experts, num_groups, capacity, width))
    return outputs.reshape(x.shape).astype(x.dtype), metrics


# The fields of `MoeMlpBlock` that the encoder passes (its own), and those
# that `config.model.encoder.moe` sets.
ENCODER_FIELDS = ("mlp_dim", "dropout_rate")
MOE_CONFIG_FIELDS = tuple(name for name in schema.field_names(MoeMlpBlock)
                          if name not in ENCODER_FIELDS)
