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
upcycled by tiling its `MlpBlock_3/Dense_*` over E. All dispatchers share
these parameters and their initialisation.

Expert parallelism (docs/design.md §5). Under a context mesh the layer pins
its buffers with sharding constraints whose axis names come from config:
tokens `[G, S, D]` are split over `group_axes` on G; the buffer dispatchers
build `[E, G, C, D]` where the tokens are (split on G), then re-pin it with E
over `expert_axes` and G over the other group axes, which XLA compiles into
one all-to-all over `expert_axes`; the experts run where their weights live;
the output buffers go back by a second all-to-all before combine (and the
same two in the backward pass). The ragged dispatcher runs inside
`jax.shard_map` over `group_axes`: each device sorts and computes its own
tokens with all experts, so it needs the experts replicated
(`expert_axes` of size 1). Without a mesh nothing is constrained.
"""
from __future__ import annotations

import math
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import schema
from moe.nn import blocks
from moe.nn import dispatch
from moe.nn import placement
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
    dispatcher: "einsum" or "index" (buffers of capacity C, same results),
      or "ragged" (dropless, `jax.lax.ragged_dot`); see `moe.nn.dispatch`.
    dropout_rate: dropout inside the experts at train time.
    dtype: dtype of dispatch, expert computation and combine (e.g.
      "bfloat16"); the router and the parameters stay float32 and the output
      has the dtype of the input.
    group_axes: mesh axes that split the groups G (the batch's axes, e.g.
      ("data", "expert")); () : no constraint.
    expert_axes: mesh axes that split E in the dispatched `[E, G, C, D]`
      buffers, those of the `Experts/` partition rule (e.g. ("expert",));
      () : experts not split.
  """
  num_experts: int
  num_selected_experts: int
  mlp_dim: int
  group_size: Optional[int] = None
  router: Mapping[str, Any] = flax.core.FrozenDict(name="SparseTopK")
  dispatcher: str = "einsum"
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  group_axes: Sequence[str] = ()
  expert_axes: Sequence[str] = ()

  def __post_init__(self):
    dispatch.check_dispatcher_name(self.dispatcher)
    for field in ("group_axes", "expert_axes"):
      axes = getattr(self, field)
      if (isinstance(axes, str) or
          not all(isinstance(axis, str) for axis in axes) or
          len(set(axes)) != len(axes)):
        raise ValueError(f"{field} must be a tuple of distinct mesh axis "
                         f"names, got {axes!r}.")
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise ValueError(f"dtype must be a floating dtype (e.g. 'float32', "
                       f"'bfloat16'), got {self.dtype!r}.")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"group_size must be None or an int >= 1, got "
                       f"{self.group_size!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None) -> tuple[Array, Metrics]:
    """Applies the layer.

    Args:
      x: `[..., L, D]` tokens, e.g. `[B, L, D]`; all of them are grouped.
      train: whether router noise (rng "gating"), dropout (rng "dropout") and
        the train-time capacity factor apply.
      step: the train step, for routers with a schedule; None: the end of
        the schedule.

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
    groups = placement.constrain(x.reshape(-1, group_size, width),
                                 (self.group_axes,))

    router = routers.create_router(
        self.router, num_experts=self.num_experts,
        num_selected_experts=self.num_selected_experts,
        dispatcher=self.dispatcher, name="Router")
    dispatcher, metrics = router(groups, train=train, step=step)

    dtype = jnp.dtype(self.dtype)
    experts = Experts(self.mlp_dim, self.dropout_rate, dtype, name="Experts")
    if isinstance(dispatcher, dispatch.RaggedDispatcher):
      outputs = self._ragged(dispatcher, groups.astype(dtype), experts, train)
    else:
      outputs = self._buffered(dispatcher, groups.astype(dtype), experts,
                               train)
    return outputs.reshape(x.shape).astype(x.dtype), metrics

  def _buffered(self, dispatcher: dispatch.BufferDispatcher, groups: Array,
                experts: nn.Module, train: bool) -> Array:
    """Dispatch to `[E, G, C, D]` buffers, experts, combine: `[G, S, D]`."""
    by_group = ((), self.group_axes)
    by_expert = (self.expert_axes,
                 tuple(a for a in self.group_axes if a not in self.expert_axes))
    inputs = placement.constrain(dispatcher.dispatch(groups), by_group)
    inputs = placement.constrain(inputs, by_expert)          # all-to-all
    num_experts, num_groups, capacity, width = inputs.shape
    outputs = experts(
        inputs.reshape(num_experts, num_groups * capacity, width), train)
    outputs = placement.constrain(
        outputs.reshape(num_experts, num_groups, capacity, width), by_expert)
    outputs = placement.constrain(outputs, by_group)         # all-to-all
    return dispatcher.combine(outputs)

  def _ragged(self, dispatcher: dispatch.RaggedDispatcher, groups: Array,
              experts: nn.Module, train: bool) -> Array:
    """Dropless: sort by expert, grouped matmuls, unsort: `[G, S, D]`."""
    expert_parts = placement.axes_size(self.expert_axes)
    if expert_parts > 1:
      raise ValueError(
          f"dispatcher='ragged' runs every expert on every device: it does "
          f"not split experts over the mesh axes expert_axes="
          f"{tuple(self.expert_axes)} (size {expert_parts}); dropless expert "
          "parallelism (jax.lax.ragged_all_to_all) is not implemented. Use "
          "dispatcher 'einsum' or 'index', or config.mesh.expert=1.")
    if self.is_initializing():   # The parameters every dispatcher shares.
      experts(jnp.zeros((self.num_experts, 1, groups.shape[-1]),
                        groups.dtype), False)
    params = self.variables["params"]["Experts"]
    rng = None
    if train and self.dropout_rate > 0:
      rng = self.make_rng("dropout")
    mesh = placement.context_mesh()
    group_axes = tuple(self.group_axes)

    def local(groups, dispatcher, params, rng):
      if rng is not None and mesh is not None and group_axes:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(group_axes))
      return dispatcher(groups, functools.partial(
          ragged_mlp, params=params, dtype=groups.dtype,
          dropout_rate=self.dropout_rate, rng=rng))

    if mesh is None or not group_axes:
      return local(groups, dispatcher, params, rng)
    split = jax.sharding.PartitionSpec(group_axes)
    return jax.shard_map(
        local, mesh=mesh, out_specs=split,
        in_specs=(split, split, jax.sharding.PartitionSpec(),
                  jax.sharding.PartitionSpec()))(groups, dispatcher, params,
                                                 rng)


def ragged_mlp(rows: Array, group_sizes: Array, row_expert: Array, *,
               params: Mapping[str, Any], dtype: Any,
               dropout_rate: float = 0.0,
               rng: Optional[jax.Array] = None) -> Array:
  """The experts' `MlpBlock`s on rows sorted by expert: `[M, D] -> [M, D]`.

  Computes what `Experts` computes, with one `jax.lax.ragged_dot` per dense
  layer instead of E dense matmuls on buffers.

  Args:
    rows: `[M, D]`; rows of expert e are contiguous, experts in order.
    group_sizes: `[E]` int32, rows per expert; rows after their sum are
      padding (their outputs are the bias of expert E-1 and are ignored).
    row_expert: `[M]` int32, the expert of each row (for the biases).
    params: the `Experts` parameters, `Dense_{0,1}/{kernel [E, ...], bias}`.
    dtype: computation dtype.
    dropout_rate: dropout after each dense layer, when `rng` is given.
    rng: dropout rng; None: no dropout.

  Returns:
    `[M, D]` in `dtype`.
  """
  def dense(h, layer):
    kernel = jnp.asarray(params[layer]["kernel"], dtype)
    bias = jnp.asarray(params[layer]["bias"], dtype)
    return jax.lax.ragged_dot(h, kernel, group_sizes,
                              preferred_element_type=dtype) + bias[row_expert]

  def dropout(h, key):
    if key is None or dropout_rate == 0:
      return h
    keep = 1.0 - dropout_rate
    mask = jax.random.bernoulli(key, keep, h.shape)
    return jnp.where(mask, h / keep, jnp.zeros_like(h))

  keys = (None, None) if rng is None else tuple(jax.random.split(rng))
  hidden = dropout(nn.gelu(dense(rows.astype(dtype), "Dense_0")), keys[0])
  return dropout(dense(hidden, "Dense_1"), keys[1])


# The fields of `MoeMlpBlock` that the encoder passes (its own), and those
# that `config.model.encoder.moe` sets.
ENCODER_FIELDS = ("mlp_dim", "dropout_rate")
MOE_CONFIG_FIELDS = tuple(name for name in schema.field_names(MoeMlpBlock)
                          if name not in ENCODER_FIELDS)
