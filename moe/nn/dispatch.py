"""Routing tables and the dispatchers that move tokens to experts.

Shapes (used throughout `moe.nn`): G groups, S tokens per group (group size),
D width, E experts, C capacity (buffer slots per expert and group), K experts
selected per token.

A router decides, for every group, which token fills each of the `E x C`
expert buffer slots; that decision is a `Routing`. A dispatcher turns it into
the two operations an MoE layer needs:

  dispatch: `[G, S, D]` tokens -> `[E, G, C, D]` expert inputs,
  combine:  `[E, G, C, D]` expert outputs -> `[G, S, D]`, weighted.

`EinsumDispatcher` materialises one-hot `[G, S, E, C]` tensors (the V-MoE
way; simple and fast for small E); `IndexDispatcher` gathers and scatters with
the `[G, E, C]` table directly (memory O(G E C D) instead of O(G S E C)). Both
give the same numbers, forward and backward.

`SoftDispatcher` (Soft MoE) fills every slot with a weighted mix of all
tokens: dispatch and combine weights are dense `[G, S, E, C]` tensors.

`RaggedDispatcher` has no buffers and no capacity, so it drops no token: it
keeps each token's K choices (`[G, S, K]`), sorts the G S K (token, expert)
assignments by expert, once, into M = G S K rows (requested ones first), and
the experts run as one grouped matmul per layer on the rows
(`jax.lax.ragged_dot`, rows of expert e contiguous); combine unsorts the rows
and sums each token's K outputs, weighted.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from moe.config import schema

Array = jax.Array


@flax.struct.dataclass
class Routing:
  """Which token fills each expert buffer slot, and its combine weight.

  Attributes:
    token_index: `[G, E, C]` int32, index in `0..S-1` of the token in slot c
      of expert e (0 for empty slots).
    valid: `[G, E, C]` bool, whether the slot holds a token.
    combine_weights: `[G, E, C]` weight of the expert output of the slot in
      the token's output (0 for empty slots); differentiable w.r.t. the
      router.
  """
  token_index: Array
  valid: Array
  combine_weights: Array

  def experts_per_token(self, group_size: int) -> Array:
    """Returns `[G, S]`, the number of experts each token is dispatched to."""
    def count(index, valid):
      return jnp.zeros(group_size, jnp.int32).at[index.reshape(-1)].add(
          valid.reshape(-1).astype(jnp.int32))
    return jax.vmap(count)(self.token_index, self.valid)

  def tokens_per_expert(self) -> Array:
    """Returns `[G, E]`, the number of tokens dispatched to each expert."""
    return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


def per_item_routing(gates: Array,
                     expert_index: Array,
                     requested: Array,
                     capacity: int,
                     priority: Optional[Array] = None) -> Routing:
  """Fills expert buffers from per-token choices, dropping over capacity.

  Buffers are filled choice by choice: every token's first choice before any
  token's second choice (as in V-MoE), and within a choice in token order, or
  in decreasing `priority` when given (batch-priority routing). A choice that
  finds its expert's buffer full is dropped.

  Args:
    gates: `[G, S, E]` combine weight of each (token, expert) pair.
    expert_index: `[G, S, K]` int, the experts chosen by each token, best
      first; the K experts of a token must be distinct.
    requested: `[G, S, K]` bool, whether a choice asks for a slot at all.
    capacity: C, slots per expert and group.
    priority: optional `[G, S]` score; higher-priority tokens are served
      first (ties keep token order).

  Returns:
    The `Routing`, with combine weights gathered from `gates`.
  """
  num_groups, group_size, num_choices = expert_index.shape
  num_experts = gates.shape[-1]
  if priority is None:
    order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
  else:
    order = jnp.argsort(-priority, axis=1, stable=True)
  def choice_major(choices):
    """`[G, S, K]` -> `[G, K * S]`, tokens in serving order per choice."""
    served = jnp.take_along_axis(choices, order[..., None], axis=1)
    return jnp.swapaxes(served, 1, 2).reshape(num_groups, -1)

  expert = choice_major(expert_index)
  wanted = choice_major(requested)
  token = jnp.tile(order, (1, num_choices))

  one_hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)
  one_hot = one_hot * wanted[..., None]
  position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)
  kept = wanted & (position < capacity)
  # Slot `capacity` is out of bounds: scatters with mode="drop" ignore it.
  slot = jnp.where(kept, position, capacity)

  def fill(values, dtype):
    return jax.vmap(lambda e, c, v: jnp.zeros((num_experts, capacity), dtype)
                    .at[e, c].set(v, mode="drop"))(expert, slot, values)

  token_index = fill(token, jnp.int32)
  valid = fill(kept, jnp.bool_)
  weights = jnp.take_along_axis(jnp.swapaxes(gates, 1, 2), token_index, axis=2)
  return Routing(token_index, valid, jnp.where(valid, weights, 0.))


@flax.struct.dataclass
class EinsumDispatcher:
  """Dispatch and combine with one-hot `[G, S, E, C]` tensors.

  Attributes:
    dispatch_mask: `[G, S, E, C]` bool, token s goes to slot c of expert e.
    combine_weights: `[G, S, E, C]` weights of the expert outputs.
  """
  dispatch_mask: Array
  combine_weights: Array

  @classmethod
  def from_routing(cls, routing: Routing, group_size: int) -> EinsumDispatcher:
    """Builds the one-hot tensors of a `Routing` over groups of size S."""
    tokens = jnp.arange(group_size)[None, :, None, None]
    mask = (routing.token_index[:, None] == tokens) & routing.valid[:, None]
    weights = jnp.where(mask, routing.combine_weights[:, None], 0.)
    return cls(mask, weights)

  def load(self) -> tuple[Array, Array]:
    """Returns tokens per expert `[G, E]` and experts per token `[G, S]`."""
    return (jnp.sum(self.dispatch_mask, axis=(1, 3), dtype=jnp.int32),
            jnp.sum(self.dispatch_mask, axis=(2, 3), dtype=jnp.int32))

  def dispatch(self, x: Array) -> Array:
    """`[G, S, D]` -> `[E, G, C, D]` (zeros in empty slots)."""
    return jnp.einsum("GSD,GSEC->EGCD", x, self.dispatch_mask.astype(x.dtype))

  def combine(self, y: Array) -> Array:
    """`[E, G, C, D]` -> `[G, S, D]`, the weighted sum over slots."""
    return combine_slots(y, self.combine_weights)


def combine_slots(y: Array, weights: Array) -> Array:
  """`[E, G, C, D]` slot outputs, `[G, S, E, C]` weights -> `[G, S, D]`."""
  return jnp.einsum("EGCD,GSEC->GSD", y, weights.astype(y.dtype))


@flax.struct.dataclass
class SoftDispatcher:
  """Soft MoE: every slot is a weighted mix of all tokens of its group.

  Attributes:
    dispatch_weights: `[G, S, E, C]`, token s's weight in slot c of expert
      e; each slot's weights sum to 1 over s.
    combine_weights: `[G, S, E, C]`, slot (e, c)'s weight in token s's
      output; each token's weights sum to 1 over (e, c).
  """
  dispatch_weights: Array
  combine_weights: Array

  def load(self) -> tuple[Array, Array]:
    """Returns tokens per expert `[G, E]` (all S) and experts per token
    `[G, S]` (all E): every token has a weight in every slot."""
    num_groups, group_size, num_experts, _ = self.dispatch_weights.shape
    return (jnp.full((num_groups, num_experts), group_size, jnp.int32),
            jnp.full((num_groups, group_size), num_experts, jnp.int32))

  def dispatch(self, x: Array) -> Array:
    """`[G, S, D]` -> `[E, G, C, D]`, the slots' mixes of tokens."""
    return jnp.einsum("GSD,GSEC->EGCD", x,
                      self.dispatch_weights.astype(x.dtype))

  def combine(self, y: Array) -> Array:
    """`[E, G, C, D]` -> `[G, S, D]`, the weighted sum over slots."""
    return combine_slots(y, self.combine_weights)


@flax.struct.dataclass
class IndexDispatcher:
  """Dispatch by gather and combine by scatter-add with `[G, E, C]` indices.

  Attributes:
    routing: the slot table.
    group_size: S (static).
  """
  routing: Routing
  group_size: int = flax.struct.field(pytree_node=False)

  @classmethod
  def from_routing(cls, routing: Routing, group_size: int) -> IndexDispatcher:
    """Wraps a `Routing` over groups of size S."""
    return cls(routing, group_size)

  def load(self) -> tuple[Array, Array]:
    """Returns tokens per expert `[G, E]` and experts per token `[G, S]`."""
    return (self.routing.tokens_per_expert(),
            self.routing.experts_per_token(self.group_size))

  def dispatch(self, x: Array) -> Array:
    """`[G, S, D]` -> `[E, G, C, D]` (zeros in empty slots)."""
    gathered = jax.vmap(lambda xg, index: xg[index])(
        x, self.routing.token_index)
    gathered = jnp.where(self.routing.valid[..., None], gathered, 0)
    return jnp.swapaxes(gathered, 0, 1)

  def combine(self, y: Array) -> Array:
    """`[E, G, C, D]` -> `[G, S, D]`, the weighted sum over slots."""
    weights = self.routing.combine_weights.astype(y.dtype)
    y = jnp.swapaxes(y, 0, 1) * weights[..., None]
    width = y.shape[-1]
    def scatter(yg, index):
      return jnp.zeros((self.group_size, width), y.dtype).at[
          index.reshape(-1)].add(yg.reshape(-1, width))
    return jax.vmap(scatter)(y, self.routing.token_index)


@flax.struct.dataclass
class RaggedDispatcher:
  """Dropless dispatch: assignments sorted by expert, no capacity.

  Works on any number of groups: inside `shard_map` it sees the groups of one
  device and sorts only those (`moe.nn.moe_layer`).

  Attributes:
    expert_index: `[G, S, K]` int32, the experts chosen by each token.
    combine_weights: `[G, S, K]` weight of each choice's expert output in
      the token's output (0 for choices not dispatched).
    requested: `[G, S, K]` bool, whether a choice is dispatched at all.
    num_experts: E (static).
  """
  expert_index: Array
  combine_weights: Array
  requested: Array
  num_experts: int = flax.struct.field(pytree_node=False)

  @classmethod
  def from_choices(cls, gates: Array, expert_index: Array,
                   requested: Array) -> RaggedDispatcher:
    """Keeps every requested choice.

    Args:
      gates: `[G, S, E]` combine weight of each (token, expert) pair.
      expert_index: `[G, S, K]` int, the experts chosen by each token.
      requested: `[G, S, K]` bool, whether a choice is dispatched.

    Returns:
      The dispatcher, with the combine weights of the choices.
    """
    weights = jnp.take_along_axis(gates, expert_index, axis=-1)
    return cls(expert_index.astype(jnp.int32),
               jnp.where(requested, weights, 0.), requested, gates.shape[-1])

  def load(self) -> tuple[Array, Array]:
    """Returns tokens per expert `[G, E]` and experts per token `[G, S]`."""
    one_hot = jax.nn.one_hot(self.expert_index, self.num_experts,
                             dtype=jnp.int32) * self.requested[..., None]
    return (jnp.sum(one_hot, axis=(1, 2)),
            jnp.sum(self.requested, axis=-1, dtype=jnp.int32))

  def __call__(self, x: Array, experts: RaggedExperts) -> Array:
    """Dispatches, runs the experts and combines: `[G, S, D]` -> `[G, S, D]`.

    Args:
      x: `[G, S, D]` tokens.
      experts: `experts(rows [M, D], group_sizes [E], row_expert [M])`
        returns `[M, D]`, rows `group_sizes[:e].sum()` to
        `group_sizes[:e + 1].sum() - 1` computed by expert e; rows after
        `group_sizes.sum()` are padding, their outputs are ignored.

    Returns:
      `[G, S, D]`: for each token the weighted sum of its experts' outputs
      (0 for a token with no dispatched choice).
    """
    num_groups, group_size, width = x.shape
    num_choices = self.expert_index.shape[-1]
    num_rows = num_groups * group_size * num_choices
    # Choices not dispatched get key E: they sort after every expert's rows.
    key = jnp.where(self.requested, self.expert_index,
                    self.num_experts).reshape(num_rows)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros(self.num_experts, jnp.int32).at[key].add(
        1, mode="drop")
    rows = x.reshape(-1, width)[order // num_choices]
    row_expert = jnp.minimum(key[order], self.num_experts - 1)
    y = experts(rows, group_sizes, row_expert)
    inverse = jnp.zeros(num_rows, jnp.int32).at[order].set(
        jnp.arange(num_rows, dtype=jnp.int32))
    y = y[inverse].reshape(num_groups, group_size, num_choices, width)
    weights = self.combine_weights.astype(y.dtype)
    return jnp.einsum("GSKD,GSK->GSD", y, weights)


# `experts(rows [M, D], group_sizes [E], row_expert [M]) -> [M, D]`.
RaggedExperts = Callable[[Array, Array, Array], Array]

BufferDispatcher = Union[EinsumDispatcher, IndexDispatcher, SoftDispatcher]
Dispatcher = Union[EinsumDispatcher, IndexDispatcher, SoftDispatcher,
                   RaggedDispatcher]
# Dispatchers with `[E, G, C, D]` expert buffers, built from a `Routing`.
BUFFER_DISPATCHERS: dict[str, Callable[[Routing, int], BufferDispatcher]] = {
    "einsum": EinsumDispatcher.from_routing,
    "index": IndexDispatcher.from_routing,
}
RAGGED = "ragged"
DISPATCHER_NAMES = tuple(BUFFER_DISPATCHERS) + (RAGGED,)


def check_dispatcher_name(name: str) -> str:
  """Returns `name` if it names a dispatcher, else raises a ValueError."""
  return schema.check_choice(name, "dispatcher", DISPATCHER_NAMES)


def make_dispatcher(routing: Routing, name: str,
                    group_size: int) -> BufferDispatcher:
  """Returns the buffer dispatcher `name` ("einsum" or "index") of `routing`."""
  schema.check_choice(name, "dispatcher", tuple(BUFFER_DISPATCHERS))
  return BUFFER_DISPATCHERS[name](routing, group_size)
