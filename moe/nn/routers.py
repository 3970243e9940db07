"""Routers: `[G, S, D]` tokens -> (dispatcher, metrics).

Shapes as in `moe.nn.dispatch`: G groups, S group size, D width, E experts,
C capacity, K experts selected per token.

Routers come in three families:

* token choice: each token picks experts (`NoisyTopExpertsPerItem`, V-MoE's;
  `SparseTopK`, the sparse differentiable top-k of Sander et al., 2023);
* experts choice: each expert picks C tokens of the group
  (`TopItemsPerExpert`, Zhou et al., 2022; `SparseTopItemsPerExpert`, the
  same sparse top-k taken over tokens);
* soft: every expert slot mixes all tokens (`SoftMoE`, Puigcerver et al.,
  2024).

Every router but `SoftMoE` computes logits with a bias-free dense layer
`dense` (kernel `[D, E]`, float32), decides which tokens fill the `E x C`
buffer slots of each group, and returns a dispatcher (`moe.nn.dispatch`) and
a metrics dict:

  auxiliary_loss: scalar, the router's weighted auxiliary losses
    (`moe.nn.router_losses.weighted_sum`; the trainer adds it to the task loss
    with its own weight).
  z_loss: router z-loss of the logits (weight `z_loss_weight`, default 0).
  tokens_per_expert: `[E]`, tokens dispatched to each expert, mean over
    groups (the load).
  dropped_fraction: fraction of tokens dispatched to no expert; their MoE
    output is 0, so they pass through the residual connection.
  experts_per_token: mean number of experts a token is dispatched to.
  router_entropy: mean entropy of the softmax of the router logits.

plus router-specific entries listed in each class. A router is picked by name
from config (`router.name`, see `create_router`); its other config fields are
the attributes of its class (fields of other routers are ignored). Router
noise draws from the "gating" rng stream. Routers take the train step
(`step`, a scalar) for the regularisation schedule of the sparse routers;
without it a schedule is at its end value.

Capacity follows `compute_capacity`. Where vmoe differs, options give its
meaning: `capacity_multiple_of=4` rounds C up as vmoe does by default (our
default 1 keeps C = ceil(K S cf / E): at the small group sizes of the
embedded datasets rounding to 4 adds up to 3 slots per expert, a third more
expert compute than the capacity factor says), and experts-choice routers
with `capacity_scales_with_k=False` use vmoe's C = ceil(S cf / E).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe import ops
from moe.config import schema
from moe.nn import dispatch
from moe.nn import router_losses
from moe.nn.router_losses import gshard_loss
from moe.nn.router_losses import importance_loss
from moe.nn.router_losses import load_loss
from moe.nn.router_losses import switch_loss
from moe.nn.router_losses import z_loss

Array = jax.Array
Metrics = dict[str, Array]

__all__ = ["gshard_loss", "importance_loss", "load_loss", "switch_loss",
           "z_loss"]


def compute_capacity(group_size: int,
                     num_experts: int,
                     num_selected_experts: int,
                     capacity_factor: float,
                     min_capacity: int = 1,
                     multiple_of: int = 1) -> int:
  """Returns C = ceil(K * S * capacity_factor / E), in [min_capacity, S].

  C is raised to `min_capacity`, then rounded up to a multiple of
  `multiple_of` (vmoe rounds to 4 by default), then capped at S: no expert
  can receive more than all tokens of a group.

  Args:
    group_size: S.
    num_experts: E.
    num_selected_experts: K.
    capacity_factor: how many slots per expert relative to a perfectly
      balanced assignment of K experts to every token.
    min_capacity: lower bound of C.
    multiple_of: C is rounded up to a multiple of this (1: no rounding).

  Returns:
    The capacity C as a Python int.
  """
  capacity = math.ceil(num_selected_experts * group_size * capacity_factor /
                       num_experts)
  capacity = max(min_capacity, capacity)
  capacity += -capacity % multiple_of
  return min(group_size, capacity)


def _entropy(probs: Array) -> Array:
  return -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)


class Router(nn.Module):
  """Attributes and steps shared by all routers.

  Attributes:
    num_experts: E.
    num_selected_experts: K; for experts-choice routers the average number
      of experts per token, which sets the capacity.
    capacity_factor: sets C through `compute_capacity` at train time.
    eval_capacity_factor: the same when `train=False`; None: as at train time.
    min_capacity: lower bound of C.
    capacity_multiple_of: C is rounded up to a multiple of this (vmoe: 4).
    dispatcher: "einsum", "index" (buffers of capacity C) or "ragged"
      (dropless: capacity fields unused), see `moe.nn.dispatch`.
    z_loss_weight: weight of the router z-loss in auxiliary_loss.
  """
  num_experts: int
  num_selected_experts: int = 1
  capacity_factor: float = 1.0
  eval_capacity_factor: Optional[float] = None
  min_capacity: int = 1
  capacity_multiple_of: int = 1
  dispatcher: str = "einsum"
  z_loss_weight: float = 0.0

  # The losses in auxiliary_loss; loss X has the weight attribute X_weight.
  AUXILIARY_LOSSES = ("z_loss",)

  def __post_init__(self):
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f"num_experts (E) must be an int >= 1, got "
                       f"{self.num_experts!r}.")
    if (not isinstance(self.num_selected_experts, int) or
        not 1 <= self.num_selected_experts <= self.num_experts):
      raise ValueError(
          f"num_selected_experts (K) must be an int in 1..num_experts "
          f"(E={self.num_experts}), got {self.num_selected_experts!r}.")
    for field in ("capacity_factor", "eval_capacity_factor"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(f"{field} must be > 0, got {value!r}.")
    for field in ("min_capacity", "capacity_multiple_of"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} must be an int >= 1, got {value!r}.")
    for name in self.AUXILIARY_LOSSES:
      schema.check_number(getattr(self, f"{name}_weight"), f"{name}_weight")
    dispatch.check_dispatcher_name(self.dispatcher)
    super().__post_init__()

  def slots_per_token(self) -> int:
    """The K of the capacity formula (`compute_capacity`)."""
    return self.num_selected_experts

  def capacity(self, group_size: int, train: bool) -> int:
    """Returns C for groups of size S at train or eval time."""
    factor = self.capacity_factor
    if not train and self.eval_capacity_factor is not None:
      factor = self.eval_capacity_factor
    return compute_capacity(group_size, self.num_experts,
                            self.slots_per_token(), factor,
                            self.min_capacity, self.capacity_multiple_of)

  def logits(self, x: Array) -> Array:
    """`[G, S, D]` -> `[G, S, E]` float32 router logits (call when compact)."""
    check_router_inputs(x)
    dense = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                     name="dense")
    return dense(x.astype(jnp.float32))

  def add_noise(self, logits: Array, noise_std: float) -> Array:
    """Returns logits + N(0, (noise_std / E)^2) noise ("gating" rng)."""
    noise = jax.random.normal(self.make_rng("gating"), logits.shape)
    return logits + noise * (noise_std / self.num_experts)

  def noisy(self, logits: Array, noise_std: float, train: bool) -> Array:
    """`logits`, plus noise (`add_noise`) at train time when noise_std > 0."""
    if train and noise_std > 0:
      return self.add_noise(logits, noise_std)
    return logits

  def with_auxiliary_loss(self, metrics: Metrics) -> Metrics:
    """Returns `metrics` plus `auxiliary_loss`, the weighted sum of the
    router's `AUXILIARY_LOSSES` (`router_losses.weighted_sum`)."""
    weights = {name: getattr(self, f"{name}_weight")
               for name in self.AUXILIARY_LOSSES}
    return dict(metrics,
                auxiliary_loss=router_losses.weighted_sum(metrics, weights))

  def finish(self, dispatcher: dispatch.Dispatcher, probs: Array,
             metrics: Metrics) -> tuple[dispatch.Dispatcher, Metrics]:
    """Returns the dispatcher and the completed metrics.

    Args:
      dispatcher: the dispatcher of the routing decision.
      probs: `[G, S, E]` softmax of the router logits (for the entropy).
      metrics: the router's own metrics, its auxiliary losses included.

    Returns:
      `dispatcher` and `metrics` plus `auxiliary_loss` and those every
      router reports (see the module docstring): `tokens_per_expert`,
      `dropped_fraction`, `experts_per_token` and `router_entropy`.
    """
    tokens, experts = dispatcher.load()
    metrics = dict(
        self.with_auxiliary_loss(metrics),
        tokens_per_expert=jnp.mean(tokens.astype(jnp.float32), axis=0),
        dropped_fraction=jnp.mean(experts == 0, dtype=jnp.float32),
        experts_per_token=jnp.mean(experts, dtype=jnp.float32),
        router_entropy=jnp.mean(_entropy(probs)))
    return dispatcher, metrics


def check_router_inputs(x: Array) -> None:
  """Raises unless `x` has shape `[G, S, D]`."""
  if x.ndim != 3:
    raise ValueError(f"router inputs must have shape [G, S, D], got shape "
                     f"{x.shape}.")


class TokenChoiceRouter(Router):
  """Routers where each token picks up to K experts: shared losses, filling.

  Extra metrics: importance_loss, gshard_loss, switch_loss (each with a
  weight attribute; see `moe.nn.router_losses`).

  Attributes:
    noise_std: noise scale (times 1/E) on the logits at train time.
    importance_loss_weight: weight of `importance_loss` in auxiliary_loss.
    gshard_loss_weight: weight of `gshard_loss` in auxiliary_loss.
    switch_loss_weight: weight of `switch_loss` in auxiliary_loss.
    batch_priority: serve tokens in decreasing order of their top gate when
      filling buffers (batch-priority routing), instead of token order.
  """
  noise_std: float = 0.0
  importance_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0
  switch_loss_weight: float = 0.0
  batch_priority: bool = False

  AUXILIARY_LOSSES = ("z_loss", "importance_loss", "gshard_loss",
                      "switch_loss")

  def dispatch_choices(self, gates: Array, expert_index: Array,
                       requested: Array, probs: Array, metrics: Metrics, *,
                       train: bool, priority: Optional[Array] = None
                       ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Dispatches per-token choices with `self.dispatcher`.

    "ragged" keeps every requested choice; "einsum" and "index" fill buffers
    of capacity C (`dispatch.per_item_routing`), dropping over capacity.

    Args:
      gates: `[G, S, E]` combine weight of each (token, expert) pair.
      expert_index: `[G, S, K]` int, the distinct experts of each token.
      requested: `[G, S, K]` bool, whether a choice is dispatched.
      probs: `[G, S, E]` softmax of the router logits.
      metrics: the router's own metrics, its auxiliary losses included.
      train: whether the train-time capacity factor applies.
      priority: optional `[G, S]` serving order for buffer filling.

    Returns:
      As `finish`.
    """
    if self.dispatcher == dispatch.RAGGED:
      return self.finish(
          dispatch.RaggedDispatcher.from_choices(gates, expert_index,
                                                 requested), probs, metrics)
    group_size = gates.shape[1]
    routing = dispatch.per_item_routing(
        gates, expert_index, requested, self.capacity(group_size, train),
        priority=priority)
    return self.finish(
        dispatch.make_dispatcher(routing, self.dispatcher, group_size), probs,
        metrics)


class ExpertsChoiceRouter(Router):
  """Routers where each expert fills its C slots with tokens of the group.

  Loads are balanced by construction; a token may get any number of experts,
  including none. Buffers are their definition, so they have no dropless
  ("ragged") dispatch.

  Attributes:
    noise_std: noise scale (times 1/E) on the logits at train time (vmoe's
      experts-choice router: 1.0).
    capacity_scales_with_k: C = ceil(K S cf / E), K slots per token on
      average (True), or vmoe's C = ceil(S cf / E) (False).
  """
  noise_std: float = 0.0
  capacity_scales_with_k: bool = True

  def __post_init__(self):
    if self.dispatcher == dispatch.RAGGED:
      raise ValueError(
          f"dispatcher='ragged' needs a router that picks experts per token; "
          f"{type(self).__name__} fills each expert's C slots by design: use "
          "dispatcher 'einsum' or 'index'.")
    super().__post_init__()

  def slots_per_token(self) -> int:
    return self.num_selected_experts if self.capacity_scales_with_k else 1

  def dispatch_slots(self, weights: Array, token_index: Array, valid: Array,
                     group_size: int, probs: Array, metrics: Metrics
                     ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Dispatches the experts' `[G, E, C]` choices of tokens."""
    routing = dispatch.Routing(token_index.astype(jnp.int32), valid,
                               jnp.where(valid, weights, 0.))
    return self.finish(
        dispatch.make_dispatcher(routing, self.dispatcher, group_size), probs,
        metrics)


class SparseGates(nn.Module):
  """The soft top-k mask of the sparse routers and its regularisation schedule.

  A mixin of `SparseTopK` and `SparseTopItemsPerExpert` (list it first among
  the bases). The mask is `moe.ops.topk_mask` with strength λ; λ is either
  fixed (`regularization_end` None) or moves from `regularization` at step 0
  to `regularization_end` at step `regularization_steps` and stays there
  (smaller λ is closer to the hard top-k). A schedule uses
  `topk_mask(x / λ, regularization=1)`, which equals `topk_mask(x,
  regularization=λ)` since the regulariser is scaled by λ.

  Attributes:
    regularization: strength λ of the p-norm regularisation (λ₀ of a
      schedule).
    p: exponent of the regularisation (4/3: continuously differentiable).
    solver: "exact" or "dykstra" (see `moe.ops.topk_mask`).
    combine: "gate" (combine weight = gate) or "gate_softmax" (gate times the
      softmax probability over experts, see each router).
    min_gate: gates <= min_gate are not dispatched. 0 dispatches the exact
      support; a small value (e.g. 1e-3) stops near-zero gates, which add
      almost nothing to the output, from taking slots (with p = 4/3 gates
      near the support's edge are cubes of small numbers).
    regularization_end: λ₁, the value at the end of the schedule; None: λ
      is fixed.
    regularization_schedule: "linear", "cosine" or "geometric" (linear in
      log λ) from λ₀ to λ₁.
    regularization_steps: steps from λ₀ to λ₁ (e.g. `config.total_steps`).
  """
  regularization: float = 0.1
  p: float = 4 / 3
  solver: str = "exact"
  combine: str = "gate"
  min_gate: float = 0.0
  regularization_end: Optional[float] = None
  regularization_schedule: str = "cosine"
  regularization_steps: int = 1

  COMBINE = ("gate", "gate_softmax")
  SCHEDULES = ("linear", "cosine", "geometric")

  def __post_init__(self):
    schema.check_choice(self.combine, "combine", self.COMBINE)
    schema.check_choice(self.regularization_schedule,
                        "regularization_schedule", self.SCHEDULES)
    if not 0 <= self.min_gate < 1:
      raise ValueError(f"min_gate must be in [0, 1), got {self.min_gate!r}.")
    schema.check_number(self.regularization, "regularization", strict=True)
    if self.regularization_end is not None:
      schema.check_number(self.regularization_end, "regularization_end",
                          strict=True)
    steps = self.regularization_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
      raise ValueError(f"regularization_steps must be an int >= 1, got "
                       f"{steps!r}.")
    super().__post_init__()

  def regularization_at(self, step: Optional[Array]) -> Array:
    """λ at train step `step` (float32 scalar); None: the end value."""
    start = self.regularization
    end = start if self.regularization_end is None else self.regularization_end
    if step is None or self.regularization_end is None:
      return jnp.asarray(end, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / self.regularization_steps,
                 0., 1.)
    if self.regularization_schedule == "linear":
      value = start + (end - start) * t
    elif self.regularization_schedule == "cosine":
      value = end + (start - end) * 0.5 * (1. + jnp.cos(jnp.pi * t))
    else:
      value = start * (end / start)**t
    return value.astype(jnp.float32)

  def soft_topk_mask(self, scores: Array, k: int, axis: int,
                     step: Optional[Array]) -> tuple[Array, Array]:
    """Returns (`topk_mask(scores, k)` along `axis` at λ(step), λ(step))."""
    regularization = self.regularization_at(step)
    if self.regularization_end is None:   # Fixed λ: a static operator.
      return ops.topk_mask(scores, k, regularization=self.regularization,
                           p=self.p, axis=axis,
                           solver=self.solver), regularization
    return ops.topk_mask(scores / regularization, k, regularization=1.0,
                         p=self.p, axis=axis,
                         solver=self.solver), regularization


class NoisyTopExpertsPerItem(TokenChoiceRouter):
  """V-MoE router: each token picks its top-K experts of a noisy softmax.

  Gates are the softmax of the logits plus Gaussian noise of std
  `noise_std / E` at train time; a token goes to its K highest-gate experts
  with combine weight = gate. The selection is piecewise constant, so the
  router learns only through the combine weights and the auxiliary losses.

  Extra metrics: load_loss (0 without noise) and those of
  `TokenChoiceRouter`. vmoe's paper configs weight importance and load
  losses 0.005 each in the total loss: with the trainer's default
  `aux_loss_weight` 0.01 that is `importance_loss_weight` =
  `load_loss_weight` = 0.5.

  Attributes:
    noise_std: noise scale (times 1/E) at train time; 0 disables noise.
    load_loss_weight: weight of `load_loss` in auxiliary_loss.
  """
  noise_std: float = 1.0
  load_loss_weight: float = 1.0

  AUXILIARY_LOSSES = TokenChoiceRouter.AUXILIARY_LOSSES + ("load_loss",)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    del step  # No schedule.
    logits = self.logits(x)
    probs = jax.nn.softmax(logits)
    noisy_logits = self.noisy(logits, self.noise_std, train)
    load = jnp.zeros(())
    if train and self.noise_std > 0:
      load = load_loss(logits, noisy_logits, self.noise_std / self.num_experts,
                       self.num_selected_experts)
    gates = jax.nn.softmax(noisy_logits)
    top_gates, expert_index = ops.top_k_by_sort(gates,
                                                self.num_selected_experts)
    requested = jnp.ones(expert_index.shape, jnp.bool_)
    metrics = dict(importance_loss=importance_loss(probs), load_loss=load,
                   gshard_loss=gshard_loss(gates),
                   switch_loss=switch_loss(gates, expert_index, requested),
                   z_loss=z_loss(logits))
    return self.dispatch_choices(
        gates, expert_index, requested, probs, metrics, train=train,
        priority=top_gates[..., 0] if self.batch_priority else None)


class SparseTopK(SparseGates, TokenChoiceRouter):
  """The sparse differentiable top-k router (Sander et al., ICML 2023).

  Gates = `moe.ops.topk_mask(logits, K)` over experts: values in [0, 1]
  summing to K per token and exactly 0 outside a small support. A token is
  dispatched only to experts with gate > 0 (> `min_gate`), at most K of
  them: if the support is larger, the K largest gates are kept and the rest
  of the gate mass is reported as dropped. The combine weights are the gates
  themselves ("gate") or gate x softmax probability renormalised over the
  dispatched experts ("gate_softmax"); either way the router receives
  gradient through the operator, i.e. through which experts are selected.
  Gates strictly between 0 and 1 (the only ones with a gradient) exist only
  when the support is larger than K, since the gates sum to K. λ can follow
  a schedule (`SparseGates`).

  Extra metrics: support_size (mean number of positive gates per token),
  dropped_gate_mass (fraction of the gate mass not dispatched: outside the K
  largest gates or not above `min_gate`; capacity drops are not counted),
  regularization (the current λ), importance_loss (on the gates),
  gshard_loss (on gates / K), switch_loss (probabilities: softmax of the
  noisy logits; choices: the dispatched gates).

  Buffers are filled with batch priority by the top softmax probability of
  the noisy logits (gates often saturate at 1, so they cannot rank tokens).
  """

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    num_selected = self.num_selected_experts
    logits = self.logits(x)
    noisy_logits = self.noisy(logits, self.noise_std, train)
    gates, regularization = self.soft_topk_mask(noisy_logits, num_selected,
                                                -1, step)
    top_gates, expert_index = ops.top_k_by_sort(gates, num_selected)
    requested = top_gates > self.min_gate
    noisy_probs = jax.nn.softmax(noisy_logits)

    if self.combine == "gate":
      weights = gates
    else:
      dispatched = jnp.sum(
          jax.nn.one_hot(expert_index, self.num_experts) * requested[..., None],
          axis=2)
      weights = gates * noisy_probs * dispatched
      total = jnp.sum(weights, axis=-1, keepdims=True)
      weights = weights / jnp.where(total > 0, total, 1.)

    mass = jnp.sum(gates, axis=-1)
    metrics = dict(
        support_size=jnp.mean(jnp.sum(gates > 0, axis=-1, dtype=jnp.float32)),
        dropped_gate_mass=jnp.mean(
            (mass - jnp.sum(top_gates * requested, axis=-1)) / mass),
        regularization=regularization,
        importance_loss=importance_loss(gates),
        # Saturated gates tie at 1: the top-1 expert is the top logit.
        gshard_loss=gshard_loss(gates / num_selected, noisy_logits),
        switch_loss=switch_loss(noisy_probs, expert_index, requested),
        z_loss=z_loss(logits))

    priority = None
    if self.batch_priority:
      priority = jnp.max(jax.nn.log_softmax(noisy_logits), axis=-1)
    return self.dispatch_choices(weights, expert_index, requested,
                                 jax.nn.softmax(logits), metrics, train=train,
                                 priority=priority)


class TopItemsPerExpert(ExpertsChoiceRouter):
  """Experts-choice router (Zhou et al., 2022): expert e takes its top-C tokens.

  Gates are the softmax over experts of the logits (plus noise at train time
  when `noise_std` > 0); expert e fills its C slots with the C tokens of
  highest gate for e (combine weight = gate). C counts
  `num_selected_experts` as the average experts per token unless
  `capacity_scales_with_k` is False (vmoe's meaning).

  Extra metrics: z_loss; auxiliary_loss is `z_loss_weight * z_loss`.
  """

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    del step  # No schedule.
    logits = self.logits(x)
    probs = jax.nn.softmax(logits)
    gates = jax.nn.softmax(self.noisy(logits, self.noise_std, train))
    weights, token_index = ops.top_k_by_sort(
        jnp.swapaxes(gates, 1, 2), self.capacity(x.shape[1], train))
    return self.dispatch_slots(weights, token_index,
                               jnp.ones(token_index.shape, jnp.bool_),
                               x.shape[1], probs, {"z_loss": z_loss(logits)})


class SparseTopItemsPerExpert(SparseGates, ExpertsChoiceRouter):
  """Sparse differentiable experts choice: the soft top-C over tokens.

  For every expert e, its gates over the S tokens of a group are
  `moe.ops.topk_mask(logits[:, :, e], C)` along the token axis (Sander et
  al., 2023, applied as in experts-choice routing, Zhou et al., 2022): in
  [0, 1], summing to C, exactly 0 outside a small support. Expert e takes
  the C tokens of largest gate (the support has at least C tokens; larger
  supports lose the mass outside the top C, reported as dropped) if the gate
  is > `min_gate`. Combine weight = gate ("gate"), or gate times the
  softmax probability of e over experts ("gate_softmax", as
  `TopItemsPerExpert` weights its slots). Unlike `TopItemsPerExpert`, the
  router gets gradient through which tokens each expert selects. λ can
  follow a schedule (`SparseGates`).

  Extra metrics: support_size (mean over experts of the tokens with a
  positive gate), dropped_gate_mass (fraction of the gate mass of the
  group not in a filled slot), regularization (the current λ), z_loss.
  """

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    group_size = x.shape[1]
    capacity = self.capacity(group_size, train)
    logits = self.logits(x)
    noisy_logits = self.noisy(logits, self.noise_std, train)
    gates, regularization = self.soft_topk_mask(noisy_logits, capacity, 1,
                                                step)
    weights, token_index = ops.top_k_by_sort(jnp.swapaxes(gates, 1, 2),
                                             capacity)
    valid = weights > self.min_gate
    if self.combine == "gate_softmax":
      weights = weights * jnp.take_along_axis(
          jnp.swapaxes(jax.nn.softmax(noisy_logits), 1, 2), token_index,
          axis=2)
    kept = jnp.sum(jnp.where(valid, jnp.take_along_axis(
        jnp.swapaxes(gates, 1, 2), token_index, axis=2), 0.), axis=-1)
    metrics = dict(
        support_size=jnp.mean(jnp.sum(gates > 0, axis=1, dtype=jnp.float32)),
        dropped_gate_mass=1. - jnp.mean(kept) / capacity,
        regularization=regularization,
        z_loss=z_loss(logits))
    return self.dispatch_slots(weights, token_index, valid, group_size,
                               jax.nn.softmax(logits), metrics)


def _l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) +
                           eps)


class SoftMoE(Router):
  """Soft MoE (Puigcerver et al., ICLR 2024, "From Sparse to Soft Mixtures").

  Every expert has C slots. With logits `L[g, s, e, c] = <x̂_s, φ̂_ec>`, the
  slot (e, c) receives the convex combination of the group's tokens with
  dispatch weights softmax over s of L, and token s receives the convex
  combination of all slot outputs with combine weights softmax over (e, c)
  of L. As in the paper (Section 2.3), tokens x and slot parameters φ
  (`phi`, `[D, E, C]`) are L2-normalised over D and one learned scalar
  `scale` (init 1) multiplies the smaller of the two. Nothing is dropped
  and there is no auxiliary balancing loss; every token reaches every
  expert, so `tokens_per_expert` is S, `experts_per_token` E,
  `dropped_fraction` 0. The dispatcher is always `dispatch.SoftDispatcher`
  (dense `[G, S, E, C]` weights); `dispatcher` must be "einsum".

  Extra metrics: dispatch_weight_max (mean over slots of the largest
  dispatch weight: 1 when a slot is a single token, 1/S when uniform),
  combine_weight_max (mean over tokens of the largest combine weight),
  scale; router_entropy is that of the combine weights summed per expert.

  Attributes:
    slots_per_expert: C; None: the train-time capacity (`capacity_factor`;
      `eval_capacity_factor` does not apply, the slots are parameters), so
      that the experts compute as many slots as a K-choice router with the
      same capacity factor (matched compute).
    noise_std: standard deviation of Gaussian noise on the logits at train
      time (the paper uses none).
  """
  slots_per_expert: Optional[int] = None
  noise_std: float = 0.0

  def __post_init__(self):
    if self.dispatcher != "einsum":
      raise ValueError(
          f"SoftMoE mixes every token into every slot with dense weights: "
          f"dispatcher must be 'einsum', got {self.dispatcher!r}.")
    slots = self.slots_per_expert
    if slots is not None and (not isinstance(slots, int) or slots < 1):
      raise ValueError(f"slots_per_expert must be None or an int >= 1, got "
                       f"{slots!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               step: Optional[Array] = None
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    del step  # No schedule.
    check_router_inputs(x)
    # The slots are parameters: their number cannot change at eval time.
    num_slots = self.slots_per_expert or self.capacity(x.shape[1], True)
    width = x.shape[-1]
    phi = self.param("phi", nn.initializers.lecun_normal(),
                     (width, self.num_experts, num_slots), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    tokens = _l2_normalize(x.astype(jnp.float32), -1)
    phi = _l2_normalize(phi, 0)
    if tokens.size < phi.size:
      tokens = tokens * scale
    else:
      phi = phi * scale
    logits = jnp.einsum("GSD,DEC->GSEC", tokens, phi)
    if train and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(
          self.make_rng("gating"), logits.shape)
    dispatch_weights = jax.nn.softmax(logits, axis=1)
    combine_weights = jax.nn.softmax(logits, axis=(2, 3))
    metrics = dict(
        dispatch_weight_max=jnp.mean(jnp.max(dispatch_weights, axis=1)),
        combine_weight_max=jnp.mean(jnp.max(combine_weights, axis=(2, 3))),
        scale=scale,
        z_loss=z_loss(logits.reshape(*logits.shape[:2], -1)))
    return self.finish(
        dispatch.SoftDispatcher(dispatch_weights, combine_weights),
        jnp.sum(combine_weights, axis=-1), metrics)


ROUTERS: dict[str, type[Router]] = {
    cls.__name__: cls
    for cls in (NoisyTopExpertsPerItem, TopItemsPerExpert, SparseTopK,
                SparseTopItemsPerExpert, SoftMoE)
}


def get_router(name: str) -> type[Router]:
  """Returns the router class called `name` (a key of `ROUTERS`)."""
  schema.check_choice(name, "config.model.encoder.moe.router.name",
                      tuple(ROUTERS))
  return ROUTERS[name]


# Router attributes the MoE layer sets itself; config sets the others.
LAYER_FIELDS = ("num_experts", "num_selected_experts", "dispatcher")


def config_fields() -> tuple[str, ...]:
  """The router fields config may set: those of any router, in class order."""
  names = dict.fromkeys(
      name for cls in ROUTERS.values() for name in schema.field_names(cls)
      if name not in LAYER_FIELDS)
  return tuple(names)


def create_router(config: Mapping[str, Any], **kwargs) -> Router:
  """Builds a router from config.

  Fields that belong to other routers only (e.g. `regularization` when
  `name` is "NoisyTopExpertsPerItem") are ignored, and a field left None
  takes the chosen router's own default, so that changing `router.name`
  alone gives that router as its class defines it (`router_config` in
  `moe.config.recipes` leaves None where routers' defaults differ, e.g.
  `noise_std`); a field of no router is an error.

  Args:
    config: `name` (a key of `ROUTERS`) and attributes of router classes
      other than those passed in `kwargs`, e.g. `capacity_factor`.
    **kwargs: attributes set by the caller (the MoE layer passes
      `num_experts`, `num_selected_experts`, `dispatcher` and `name`).

  Returns:
    The unbound router module.
  """
  field = "config.model.encoder.moe.router"
  config = schema.to_dict(config, field)
  cls = get_router(config.pop("name", None))
  settable = tuple(name for name in config_fields() if name not in kwargs)
  schema.check_unknown_fields(config, ("name",) + settable, field)
  own = schema.field_defaults(cls)
  values = {name: value for name, value in config.items()
            if name in own and name in settable
            and (value is not None or own[name] is None)}
  return cls(**values, **kwargs)
