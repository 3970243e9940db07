"""Routers: `[G, S, D]` tokens -> (dispatcher, metrics).

Shapes as in `moe.nn.dispatch`: G groups, S group size, D width, E experts,
C capacity, K experts selected per token.

Every router computes logits with a bias-free dense layer `dense` (kernel
`[D, E]`, float32), decides which tokens fill the `E x C` buffer slots of each
group, and returns a dispatcher (`moe.nn.dispatch`) and a metrics dict:

  auxiliary_loss: scalar, the router's weighted balancing losses (the trainer
    adds it to the task loss with its own weight).
  tokens_per_expert: `[E]`, tokens dispatched to each expert, mean over
    groups (the load).
  dropped_fraction: fraction of tokens dispatched to no expert; their MoE
    output is 0, so they pass through the residual connection.
  experts_per_token: mean number of experts a token is dispatched to.
  router_entropy: mean entropy of the softmax of the router logits.

plus router-specific entries listed in each class. A router is picked by name
from config (`router.name`, see `create_router`); its other config fields are
the attributes of its class (fields of other routers are ignored). Router
noise draws from the "gating" rng stream.
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

Array = jax.Array
Metrics = dict[str, Array]


def compute_capacity(group_size: int,
                     num_experts: int,
                     num_selected_experts: int,
                     capacity_factor: float,
                     min_capacity: int = 1) -> int:
  """Returns C = ceil(K * S * capacity_factor / E), in [min_capacity, S].

  C is capped at S: no expert can receive more than all tokens of a group.

  Args:
    group_size: S.
    num_experts: E.
    num_selected_experts: K.
    capacity_factor: how many slots per expert relative to a perfectly
      balanced assignment of K experts to every token.
    min_capacity: lower bound of C.

  Returns:
    The capacity C as a Python int.
  """
  capacity = math.ceil(num_selected_experts * group_size * capacity_factor /
                       num_experts)
  return min(group_size, max(min_capacity, capacity))


def importance_loss(probs: Array) -> Array:
  """Squared coefficient of variation of the per-expert mass, mean over G.

  Args:
    probs: `[G, S, E]` non-negative routing weights.

  Returns:
    Scalar loss, 0 when every expert receives the same total weight.
  """
  importance = jnp.sum(probs, axis=1)
  return jnp.mean(jnp.var(importance, axis=-1) /
                  jnp.mean(importance, axis=-1)**2)


def load_loss(logits: Array, noisy_logits: Array, noise_std: float,
              num_selected_experts: int) -> Array:
  """V-MoE load loss: CV^2 of each expert's probability of being selected.

  Args:
    logits: `[G, S, E]` clean router logits.
    noisy_logits: `[G, S, E]` logits plus Gaussian noise of std `noise_std`.
    noise_std: standard deviation of that noise (> 0).
    num_selected_experts: K.

  Returns:
    Scalar loss, smooth in `logits` through the Gaussian CDF.
  """
  threshold = ops.top_k_by_sort(noisy_logits, num_selected_experts)[0][..., -1:]
  prob_selected = jax.scipy.stats.norm.cdf((logits - threshold) / noise_std)
  load = jnp.mean(prob_selected, axis=1)
  return jnp.mean(jnp.var(load, axis=-1) / jnp.mean(load, axis=-1)**2)


def gshard_loss(probs: Array, scores: Optional[Array] = None) -> Array:
  """GShard loss: E^2 * mean_e(top-1 fraction of e * mean probability of e).

  Args:
    probs: `[G, S, E]` routing probabilities (each row sums to 1).
    scores: optional `[G, S, E]` values whose argmax is the top-1 expert
      (default `probs`); pass logits when `probs` has ties.

  Returns:
    Scalar loss, 1 for a perfectly balanced router, mean over G.
  """
  num_experts = probs.shape[-1]
  scores = probs if scores is None else scores
  top1 = jax.nn.one_hot(jnp.argmax(scores, axis=-1), num_experts)
  per_expert = jnp.mean(top1, axis=1) * jnp.mean(probs, axis=1)
  return jnp.mean(jnp.mean(per_expert, axis=-1)) * num_experts**2


def _entropy(probs: Array) -> Array:
  return -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)


class Router(nn.Module):
  """Attributes and steps shared by all routers.

  Attributes:
    num_experts: E.
    num_selected_experts: K; for `TopItemsPerExpert` the average number of
      experts per token, which sets the capacity.
    capacity_factor: sets C through `compute_capacity` at train time.
    eval_capacity_factor: the same when `train=False`; None: as at train time.
    min_capacity: lower bound of C.
    dispatcher: "einsum", "index" (buffers of capacity C) or "ragged"
      (dropless: capacity fields unused), see `moe.nn.dispatch`.
  """
  num_experts: int
  num_selected_experts: int = 1
  capacity_factor: float = 1.0
  eval_capacity_factor: Optional[float] = None
  min_capacity: int = 1
  dispatcher: str = "einsum"

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
    if not isinstance(self.min_capacity, int) or self.min_capacity < 1:
      raise ValueError(f"min_capacity must be an int >= 1, got "
                       f"{self.min_capacity!r}.")
    dispatch.check_dispatcher_name(self.dispatcher)
    super().__post_init__()

  def capacity(self, group_size: int, train: bool) -> int:
    """Returns C for groups of size S at train or eval time."""
    factor = self.capacity_factor
    if not train and self.eval_capacity_factor is not None:
      factor = self.eval_capacity_factor
    return compute_capacity(group_size, self.num_experts,
                            self.num_selected_experts, factor,
                            self.min_capacity)

  def logits(self, x: Array) -> Array:
    """`[G, S, D]` -> `[G, S, E]` float32 router logits (call when compact)."""
    if x.ndim != 3:
      raise ValueError(f"router inputs must have shape [G, S, D], got shape "
                       f"{x.shape}.")
    dense = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                     name="dense")
    return dense(x.astype(jnp.float32))

  def add_noise(self, logits: Array, noise_std: float) -> Array:
    """Returns logits + N(0, (noise_std / E)^2) noise ("gating" rng)."""
    noise = jax.random.normal(self.make_rng("gating"), logits.shape)
    return logits + noise * (noise_std / self.num_experts)

  def finish(self, dispatcher: dispatch.Dispatcher, probs: Array,
             metrics: Metrics) -> tuple[dispatch.Dispatcher, Metrics]:
    """Returns the dispatcher and the completed metrics.

    Args:
      dispatcher: the dispatcher of the routing decision.
      probs: `[G, S, E]` softmax of the router logits (for the entropy).
      metrics: the router's own metrics, `auxiliary_loss` included.

    Returns:
      `dispatcher` and `metrics` plus those every router reports (see the
      module docstring): `tokens_per_expert`, `dropped_fraction`,
      `experts_per_token` and `router_entropy`.
    """
    tokens, experts = dispatcher.load()
    metrics = dict(
        metrics,
        tokens_per_expert=jnp.mean(tokens.astype(jnp.float32), axis=0),
        dropped_fraction=jnp.mean(experts == 0, dtype=jnp.float32),
        experts_per_token=jnp.mean(experts, dtype=jnp.float32),
        router_entropy=jnp.mean(_entropy(probs)))
    return dispatcher, metrics

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
      metrics: the router's own metrics, `auxiliary_loss` included.
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


class NoisyTopExpertsPerItem(Router):
  """V-MoE router: each token picks its top-K experts of a noisy softmax.

  Gates are the softmax of the logits plus Gaussian noise of std
  `noise_std / E` at train time; a token goes to its K highest-gate experts
  with combine weight = gate. The selection is piecewise constant, so the
  router learns only through the combine weights and the auxiliary losses.

  Extra metrics: importance_loss, load_loss (0 without noise), gshard_loss.

  Attributes:
    noise_std: noise scale (times 1/E) at train time; 0 disables noise.
    importance_loss_weight: weight of `importance_loss` in auxiliary_loss.
    load_loss_weight: weight of `load_loss` in auxiliary_loss.
    gshard_loss_weight: weight of `gshard_loss` in auxiliary_loss.
    batch_priority: serve tokens in decreasing order of their top gate when
      filling buffers (batch-priority routing), instead of token order.
  """
  noise_std: float = 1.0
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0
  batch_priority: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    logits = self.logits(x)
    probs = jax.nn.softmax(logits)
    if train and self.noise_std > 0:
      noisy_logits = self.add_noise(logits, self.noise_std)
      load = load_loss(logits, noisy_logits, self.noise_std / self.num_experts,
                       self.num_selected_experts)
    else:
      noisy_logits, load = logits, jnp.zeros(())
    gates = jax.nn.softmax(noisy_logits)
    metrics = dict(importance_loss=importance_loss(probs), load_loss=load,
                   gshard_loss=gshard_loss(gates))
    metrics["auxiliary_loss"] = (
        self.importance_loss_weight * metrics["importance_loss"] +
        self.load_loss_weight * metrics["load_loss"] +
        self.gshard_loss_weight * metrics["gshard_loss"])

    top_gates, expert_index = ops.top_k_by_sort(gates,
                                                self.num_selected_experts)
    return self.dispatch_choices(
        gates, expert_index, jnp.ones(expert_index.shape, jnp.bool_), probs,
        metrics, train=train,
        priority=top_gates[..., 0] if self.batch_priority else None)


class TopItemsPerExpert(Router):
  """Experts-choice router: each expert takes its top-C tokens of a group.

  Gates are the softmax of the logits over experts; expert e fills its C slots
  with the C tokens of highest gate for e (combine weight = gate). Loads are
  balanced by construction; a token may get any number of experts, including
  none. C uses `num_selected_experts` as the average experts per token.

  Extra metrics: none; auxiliary_loss is 0.

  Buffers are its definition, so it has no dropless ("ragged") dispatch.
  """

  def __post_init__(self):
    if self.dispatcher == dispatch.RAGGED:
      raise ValueError(
          "dispatcher='ragged' needs a router that picks experts per token; "
          "TopItemsPerExpert fills each expert's C slots by design: use "
          "dispatcher 'einsum' or 'index'.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    probs = jax.nn.softmax(self.logits(x))
    weights, token_index = ops.top_k_by_sort(
        jnp.swapaxes(probs, 1, 2), self.capacity(x.shape[1], train))
    routing = dispatch.Routing(token_index.astype(jnp.int32),
                               jnp.ones(token_index.shape, jnp.bool_), weights)
    return self.finish(
        dispatch.make_dispatcher(routing, self.dispatcher, x.shape[1]), probs,
        {"auxiliary_loss": jnp.zeros(())})


class SparseTopK(Router):
  """The sparse differentiable top-k router (Sander et al., ICML 2023).

  Gates = `moe.ops.topk_mask(logits, K)`: values in [0, 1] summing to K per
  token and exactly 0 outside a small support. A token is dispatched only to
  experts with gate > 0 (> `min_gate`), at most K of them: if the support is
  larger, the K largest gates are kept and the rest of the gate mass is
  reported as dropped. The combine weights are the gates themselves
  ("gate") or gate x softmax probability renormalised over the dispatched
  experts ("gate_softmax"); either way the router receives gradient through
  the operator, i.e. through which experts are selected. Gates strictly
  between 0 and 1 (the only ones with a gradient) exist only when the
  support is larger than K, since the gates sum to K.

  Extra metrics: support_size (mean number of positive gates per token),
  dropped_gate_mass (fraction of the gate mass not dispatched: outside the K
  largest gates or not above `min_gate`; capacity drops are not counted),
  importance_loss (on the gates), gshard_loss (on gates / K).

  Attributes:
    regularization: strength l of the p-norm regularisation of the operator.
    p: exponent of the regularisation (4/3: continuously differentiable).
    solver: "exact" or "dykstra" (see `moe.ops.topk_mask`).
    combine: "gate" or "gate_softmax".
    min_gate: gates <= min_gate are not dispatched. 0 dispatches the exact
      support; a small value (e.g. 1e-3) stops near-zero gates, which add
      almost nothing to the output, from taking capacity slots (with p = 4/3
      gates near the support's edge are cubes of small numbers).
    noise_std: noise scale (times 1/E) on the logits at train time.
    importance_loss_weight: weight of `importance_loss` in auxiliary_loss.
    gshard_loss_weight: weight of `gshard_loss` in auxiliary_loss.
    batch_priority: serve tokens in decreasing order of their top softmax
      probability (of the noisy logits) when filling buffers.
  """
  regularization: float = 0.1
  p: float = 4 / 3
  solver: str = "exact"
  combine: str = "gate"
  min_gate: float = 0.0
  noise_std: float = 0.0
  importance_loss_weight: float = 1.0
  gshard_loss_weight: float = 0.0
  batch_priority: bool = False

  COMBINE = ("gate", "gate_softmax")

  def __post_init__(self):
    schema.check_choice(self.combine, "combine", self.COMBINE)
    if not 0 <= self.min_gate < 1:
      raise ValueError(f"min_gate must be in [0, 1), got {self.min_gate!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False
               ) -> tuple[dispatch.Dispatcher, Metrics]:
    """Routes `[G, S, D]` tokens; returns (dispatcher, metrics)."""
    num_selected = self.num_selected_experts
    logits = self.logits(x)
    noisy_logits = logits
    if train and self.noise_std > 0:
      noisy_logits = self.add_noise(logits, self.noise_std)
    gates = ops.topk_mask(noisy_logits, num_selected,
                          regularization=self.regularization, p=self.p,
                          solver=self.solver)
    top_gates, expert_index = ops.top_k_by_sort(gates, num_selected)
    requested = top_gates > self.min_gate

    if self.combine == "gate":
      weights = gates
    else:
      dispatched = jnp.sum(
          jax.nn.one_hot(expert_index, self.num_experts) * requested[..., None],
          axis=2)
      weights = gates * jax.nn.softmax(noisy_logits) * dispatched
      total = jnp.sum(weights, axis=-1, keepdims=True)
      weights = weights / jnp.where(total > 0, total, 1.)

    mass = jnp.sum(gates, axis=-1)
    metrics = dict(
        support_size=jnp.mean(jnp.sum(gates > 0, axis=-1, dtype=jnp.float32)),
        dropped_gate_mass=jnp.mean(
            (mass - jnp.sum(top_gates * requested, axis=-1)) / mass),
        importance_loss=importance_loss(gates),
        # Saturated gates tie at 1: the top-1 expert is the top logit.
        gshard_loss=gshard_loss(gates / num_selected, noisy_logits))
    metrics["auxiliary_loss"] = (
        self.importance_loss_weight * metrics["importance_loss"] +
        self.gshard_loss_weight * metrics["gshard_loss"])

    # Gates often saturate at 1, so tokens are ranked by their top logit
    # relative to the others (the top softmax probability, in log space).
    priority = None
    if self.batch_priority:
      priority = jnp.max(jax.nn.log_softmax(noisy_logits), axis=-1)
    return self.dispatch_choices(weights, expert_index, requested,
                                 jax.nn.softmax(logits), metrics, train=train,
                                 priority=priority)


ROUTERS: dict[str, type[Router]] = {
    cls.__name__: cls
    for cls in (NoisyTopExpertsPerItem, TopItemsPerExpert, SparseTopK)
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
