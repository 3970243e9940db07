"""Routing tables and the two dispatchers that move tokens to experts.

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

  def dispatch(self, x: Array) -> Array:
    """`[G, S, D]` -> `[E, G, C, D]` (zeros in empty slots)."""
    return jnp.einsum("GSD,GSEC->EGCD", x, self.dispatch_mask.astype(x.dtype))

  def combine(self, y: Array) -> Array:
    """`[E, G, C, D]` -> `[G, S, D]`, the weighted sum over slots."""
    return jnp.einsum("EGCD,GSEC->GSD", y, self.combine_weights.astype(y.dtype))


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


Dispatcher = Union[EinsumDispatcher, IndexDispatcher]
DISPATCHERS: dict[str, Callable[[Routing, int], Dispatcher]] = {
    "einsum": EinsumDispatcher.from_routing,
    "index": IndexDispatcher.from_routing,
}


def check_dispatcher_name(name: str) -> str:
  """Returns `name` if it names a dispatcher, else raises a ValueError."""
  return schema.check_choice(name, "dispatcher", tuple(DISPATCHERS))


def make_dispatcher(routing: Routing, name: str, group_size: int) -> Dispatcher:
  """Returns the dispatcher called `name` ("einsum" or "index") of `routing`."""
  return DISPATCHERS[check_dispatcher_name(name)](routing, group_size)
