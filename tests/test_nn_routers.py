"""Tests of moe.nn.routers and moe.nn.dispatch on tiny shapes."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import ops
from moe.nn import dispatch
from moe.nn import moe_layer
from moe.nn import routers
import nn_test_util

ROUTER_NAMES = ("NoisyTopExpertsPerItem", "TopItemsPerExpert", "SparseTopK",
                "SparseTopItemsPerExpert")
EXPERTS_CHOICE = ("TopItemsPerExpert", "SparseTopItemsPerExpert")
KEY = jax.random.key(0)
jit = nn_test_util.jit
_normal = nn_test_util.normal


def _apply(router, params, x, train=False):
  return router.apply({"params": params}, x, train=train,
                      rngs={"gating": jax.random.key(1)})


def _route_many(*cases):
  """Applies routers to inputs, all in one jit (compiling is the slow part).

  Args:
    *cases: (router, params, x, train) tuples.

  Returns:
    A list of (dispatcher, metrics), one per case.
  """
  def run(arrays):
    return [_apply(router, params, x, train)
            for (router, _, _, train), (params, x) in zip(cases, arrays)]
  return jit(run)([(params, x) for _, params, x, _ in cases])


def _kernel(width, num_experts, seed=1):
  return {"dense": {"kernel": _normal(seed, width, num_experts)}}


def _dense_view(dispatcher, num_groups, group_size, num_experts, capacity):
  """Returns the `[G, S, E, C]` dispatch mask and combine weights.

  Works for any dispatcher through its public interface: dispatching one-hot
  token ids shows which token fills each slot, combining one-hot slot ids
  shows each slot's weight in each token's output.
  """
  token_ids = jnp.broadcast_to(jnp.eye(group_size),
                               (num_groups, group_size, group_size))
  mask = jnp.einsum("EGCS->GSEC", dispatcher.dispatch(token_ids))
  slot_ids = jnp.eye(num_experts * capacity).reshape(
      num_experts, 1, capacity, num_experts * capacity)
  slot_ids = jnp.broadcast_to(slot_ids, (num_experts, num_groups, capacity,
                                         num_experts * capacity))
  weights = dispatcher.combine(slot_ids).reshape(
      num_groups, group_size, num_experts, capacity)
  return mask, weights


@pytest.mark.parametrize(
    "group_size, num_experts, k, factor, minimum, expected", [
    (8, 4, 1, 1.0, 1, 2),
    (8, 4, 2, 1.25, 1, 5),      # ceil(2 * 8 * 1.25 / 4) = 5
    (10, 4, 2, 1.1, 1, 6),      # ceil(5.5) = 6
    (16, 8, 2, 0.5, 1, 2),
    (16, 8, 1, 0.1, 1, 1),      # ceil(0.2) = 1
    (16, 8, 1, 0.1, 4, 4),      # raised to min_capacity
    (8, 2, 2, 2.0, 1, 8),       # 16 > S: capped at S
])
def test_compute_capacity(group_size, num_experts, k, factor, minimum,
                          expected):
  assert routers.compute_capacity(group_size, num_experts, k, factor,
                                  minimum) == expected


def test_capacity_factor_differs_between_train_and_eval():
  router = routers.TopItemsPerExpert(num_experts=4, num_selected_experts=1,
                                     capacity_factor=1.0,
                                     eval_capacity_factor=2.0)
  assert router.capacity(8, train=True) == 2
  assert router.capacity(8, train=False) == 4
  assert router.clone(eval_capacity_factor=None).capacity(8, train=False) == 2


SHAPE_CONFIGS = ((4, 1, 1.0), (4, 2, 1.25), (8, 2, 0.5))   # (E, K, factor)
NUM_GROUPS, GROUP_SIZE, WIDTH = 2, 8, 6


@functools.cache
def _route_every_config(name):
  """Routes one input with every (E, K, factor) of SHAPE_CONFIGS, jit once.

  Returns, per config, the metrics and for each dispatcher the expert inputs,
  the combined outputs and the `_dense_view`, both dispatchers being built
  from the same routing.
  """
  def run(x):
    results = []
    for num_experts, k, factor in SHAPE_CONFIGS:
      router = routers.create_router(
          {"name": name, "capacity_factor": factor}, num_experts=num_experts,
          num_selected_experts=k, dispatcher="index")
      index, metrics = _apply(router, _kernel(WIDTH, num_experts), x,
                              train=True)
      capacity = index.routing.valid.shape[-1]
      views = {}
      for kind in ("einsum", "index"):
        dispatcher = dispatch.make_dispatcher(index.routing, kind, GROUP_SIZE)
        inputs = dispatcher.dispatch(x)
        views[kind] = (inputs, dispatcher.combine(inputs),
                       dispatcher.dispatch(x.astype(jnp.bfloat16)),
                       _dense_view(dispatcher, NUM_GROUPS, GROUP_SIZE,
                                   num_experts, capacity))
      results.append((metrics, views))
    return results
  x = _normal(0, NUM_GROUPS, GROUP_SIZE, WIDTH)
  return x, jax.device_get(jit(run)(x))


@pytest.mark.parametrize("name", ROUTER_NAMES)
@pytest.mark.parametrize("dispatcher_name", ("einsum", "index"))
@pytest.mark.parametrize("config", range(len(SHAPE_CONFIGS)))
def test_router_shapes_dtypes_and_invariants(name, dispatcher_name, config):
  num_experts, k, factor = SHAPE_CONFIGS[config]
  x, results = _route_every_config(name)
  metrics, views = results[config]
  expert_inputs, outputs, bf16_inputs, (mask, weights) = views[dispatcher_name]
  capacity = routers.compute_capacity(GROUP_SIZE, num_experts, k, factor)

  assert expert_inputs.shape == (num_experts, NUM_GROUPS, capacity, WIDTH)
  assert expert_inputs.dtype == np.float32
  assert outputs.shape == x.shape and outputs.dtype == np.float32
  assert bf16_inputs.dtype == jnp.bfloat16
  assert metrics["tokens_per_expert"].shape == (num_experts,)
  for key in ("auxiliary_loss", "dropped_fraction", "experts_per_token",
              "router_entropy"):
    assert metrics[key].shape == () and metrics[key].dtype == np.float32

  assert mask.shape == weights.shape == (NUM_GROUPS, GROUP_SIZE, num_experts,
                                         capacity)
  assert set(np.unique(mask)) <= {0., 1.}
  assert mask.sum(axis=1).max() <= 1     # a slot holds at most one token
  assert mask.sum(axis=3).max() <= 1     # a token uses an expert at most once
  assert np.all(weights[mask == 0] == 0)
  assert np.all(weights >= 0)
  experts_per_token = mask.sum(axis=(2, 3))
  if name not in EXPERTS_CHOICE:
    assert experts_per_token.max() <= k
  else:   # Every expert fills its C slots.
    np.testing.assert_array_equal(mask.sum(axis=(1, 3)), capacity)
  np.testing.assert_allclose(metrics["tokens_per_expert"],
                             mask.sum(axis=(1, 3)).mean(axis=0))
  np.testing.assert_allclose(metrics["experts_per_token"],
                             experts_per_token.mean())
  np.testing.assert_allclose(metrics["dropped_fraction"],
                             (experts_per_token == 0).mean())
  # Expert inputs are the dispatched tokens; outputs weight them back.
  np.testing.assert_allclose(expert_inputs,
                             np.einsum("GSD,GSEC->EGCD", x, mask), atol=1e-6)
  np.testing.assert_allclose(outputs, np.einsum("GSD,GSEC->GSD", x, weights),
                             rtol=1e-5, atol=1e-6)


def test_einsum_and_index_dispatchers_agree_on_the_routing():
  for name in ROUTER_NAMES:
    _, results = _route_every_config(name)
    for _, views in results:
      for a, b in zip(views["einsum"], views["index"]):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
          np.testing.assert_allclose(np.asarray(u, np.float32),
                                     np.asarray(v, np.float32), rtol=1e-6,
                                     atol=1e-6)


def _skewed_tokens(group_size=8, num_experts=4):
  """Tokens that all prefer expert 0, token s more strongly as s grows.

  With the router kernel set to the identity, logits = x: token s has logit
  1 + s/4 for expert 0 and 0 for the others.
  """
  x = np.zeros((1, group_size, num_experts), np.float32)
  x[0, :, 0] = 1 + np.arange(group_size) / 4
  return jnp.asarray(x), {"dense": {"kernel": jnp.eye(num_experts)}}


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


CAPACITY_CASES = (
    # (router, batch_priority, {expert: tokens in its slots, in slot order})
    ("NoisyTopExpertsPerItem", False, {0: [0, 1]}),
    ("NoisyTopExpertsPerItem", True, {0: [7, 6]}),
    ("SparseTopK", False, {0: [0, 1]}),
    ("SparseTopK", True, {0: [7, 6]}),
    # Expert 0 takes its two highest-gate tokens; experts 1-3, which see
    # equal gates, all take the two tokens with the weakest preference for 0.
    ("TopItemsPerExpert", None, {0: [7, 6], 1: [0, 1], 2: [0, 1], 3: [0, 1]}),
)


@functools.cache
def _route_capacity_cases():
  x, params = _skewed_tokens()
  cases = []
  for name, batch_priority, _ in CAPACITY_CASES:
    config = {"name": name, "capacity_factor": 1.0}   # C = ceil(8 / 4) = 2
    if batch_priority is not None:
      config["batch_priority"] = batch_priority
    router = routers.create_router(config, num_experts=4,
                                   num_selected_experts=1, dispatcher="index")
    cases.append((router, params, x, False))
  return x, jax.device_get(_route_many(*cases))


@pytest.mark.parametrize(
    "case", range(len(CAPACITY_CASES)),
    ids=[f"{n}-priority={p}" for n, p, _ in CAPACITY_CASES])
def test_capacity_drops_exactly_the_expected_tokens(case):
  name, _, kept = CAPACITY_CASES[case]
  x, results = _route_capacity_cases()
  dispatcher, metrics = results[case]
  routing = dispatcher.routing
  for expert in range(4):
    slots = routing.token_index[0, expert][routing.valid[0, expert]]
    assert list(slots) == kept.get(expert, [])

  probs = _softmax(np.asarray(x[0]))
  served = {s for tokens in kept.values() for s in tokens}
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 - len(served) / 8)
  np.testing.assert_allclose(metrics["tokens_per_expert"],
                             [len(kept.get(e, [])) for e in range(4)])
  np.testing.assert_allclose(
      metrics["experts_per_token"], sum(map(len, kept.values())) / 8)
  np.testing.assert_allclose(metrics["router_entropy"],
                             -(probs * np.log(probs)).sum(-1).mean(), rtol=1e-5)
  for expert, tokens in kept.items():
    if name == "SparseTopK":   # K = 1 and a clear winner: the gate is 1
      expected = np.ones(len(tokens))
    else:
      expected = probs[tokens, expert]
    weights = routing.combine_weights[0, expert, :len(tokens)]
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    assert np.all(routing.combine_weights[0, expert, len(tokens):] == 0)


def test_sparse_topk_support_larger_than_k():
  # Three equal logits and K = 2: the operator spreads the gate mass 2/3 on
  # each; two are dispatched and a third of the mass is dropped.
  router = routers.SparseTopK(num_experts=4, num_selected_experts=2,
                              capacity_factor=2.0)
  x = jnp.asarray([[[1., 1., 1., -5.]] * 4])
  params = {"dense": {"kernel": jnp.eye(4)}}
  (gate, metrics), (gate_softmax, _), (_, above_min) = _route_many(
      (router, params, x, False),
      (router.clone(combine="gate_softmax"), params, x, False),
      (router.clone(min_gate=0.7), params, x, False))
  np.testing.assert_allclose(metrics["support_size"], 3.)
  np.testing.assert_allclose(metrics["dropped_gate_mass"], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics["experts_per_token"], 2.)
  weights = gate.combine_weights.sum(axis=-1)      # [G, S, E]
  assert np.all((weights > 0).sum(-1) == 2)
  np.testing.assert_allclose(weights[weights > 0], 2 / 3, rtol=1e-5)
  weights = gate_softmax.combine_weights.sum(axis=-1)
  assert np.all((weights > 0).sum(-1) == 2)
  np.testing.assert_allclose(weights[weights > 0], 0.5, rtol=1e-5)
  # No gate exceeds min_gate = 0.7: nothing is dispatched.
  np.testing.assert_allclose(above_min["experts_per_token"], 0.)
  np.testing.assert_allclose(above_min["dropped_gate_mass"], 1.)
  np.testing.assert_allclose(above_min["dropped_fraction"], 1.)


def test_auxiliary_losses_against_hand_computed_values():
  probs = jnp.asarray([[[1., 0.], [1., 0.]]])       # importance [2, 0]
  np.testing.assert_allclose(routers.importance_loss(probs), 1.)
  np.testing.assert_allclose(routers.gshard_loss(probs), 2.)
  uniform = jnp.full((3, 5, 4), 0.25)
  np.testing.assert_allclose(routers.importance_loss(uniform), 0.)

  logits = jnp.asarray([[[0., 1., 2.], [2., 0., 1.]]])
  noisy = logits + jnp.asarray([[[0.1, 0., 0.], [0., 0.3, 0.]]])
  std = 0.5
  # K = 1: threshold = max noisy logit; p = Phi((logit - threshold) / std).
  phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
  p = np.array([[phi((l - t) / std) for l in row]
                for row, t in zip(np.asarray(logits[0]), [2., 2.])])
  load = p.mean(0)
  expected = load.var() / load.mean()**2
  np.testing.assert_allclose(routers.load_loss(logits, noisy, std, 1),
                             expected, rtol=1e-5)


def test_noisy_router_metrics_and_noise():
  router = routers.NoisyTopExpertsPerItem(num_experts=4, num_selected_experts=2,
                                          importance_loss_weight=0.5,
                                          load_loss_weight=2.0)
  x = _normal(0, 2, 8, 4)
  params = {"dense": {"kernel": jnp.eye(4)}}
  (_, eval_metrics), (_, train_metrics) = _route_many(
      (router, params, x, False), (router, params, x, True))
  probs = _softmax(np.asarray(x))
  importance = probs.sum(1)
  expected = (importance.var(-1) / importance.mean(-1)**2).mean()
  np.testing.assert_allclose(eval_metrics["importance_loss"], expected,
                             rtol=1e-5)
  assert eval_metrics["load_loss"] == 0
  np.testing.assert_allclose(eval_metrics["auxiliary_loss"], 0.5 * expected,
                             rtol=1e-5)
  assert train_metrics["load_loss"] > 0
  np.testing.assert_allclose(
      train_metrics["auxiliary_loss"],
      0.5 * expected + 2.0 * train_metrics["load_loss"], rtol=1e-5)


def _random_params(module, *inputs, scale=0.5):
  return nn_test_util.random_params(module, *inputs, key=KEY, scale=scale)


def _task_loss(router_config):
  """Returns loss(router kernel) of an MoE layer, the kernel and the logits."""
  layer = moe_layer.MoeMlpBlock(num_experts=4, num_selected_experts=2,
                                mlp_dim=8, router=router_config)
  x = _normal(3, 2, 8, 6)
  target = _normal(4, 2, 8, 6)
  params = _random_params(layer, x)

  def loss(kernel):
    router = {"Router": {"dense": {"kernel": kernel}}}
    y, _ = layer.apply({"params": {**params, **router}}, x)
    return jnp.mean((y - target)**2)

  kernel = params["Router"]["dense"]["kernel"]
  return loss, kernel, x @ kernel


def _stop_softmax_gradient(monkeypatch):
  softmax = jax.nn.softmax
  monkeypatch.setattr(
      jax.nn, "softmax",
      lambda *a, **kw: jax.lax.stop_gradient(softmax(*a, **kw)))


def test_hard_router_gradient_flows_only_through_combine_weights(monkeypatch):
  config = {"name": "NoisyTopExpertsPerItem", "capacity_factor": 2.0}
  loss, kernel, _ = _task_loss(config)
  assert np.abs(jit(jax.grad(loss))(kernel)).max() > 1e-3
  # The combine weights are softmax gates; with their gradient cut, the
  # (piecewise constant) expert selection passes nothing to the kernel.
  _stop_softmax_gradient(monkeypatch)
  np.testing.assert_array_equal(jit(jax.grad(loss))(kernel), 0.)


def test_sparse_topk_gradient_flows_through_the_mask(monkeypatch):
  # Softmax gradients are cut: for combine="gate" softmax is not on the
  # path at all; for "gate_softmax" what remains is the mask's gradient.
  _stop_softmax_gradient(monkeypatch)
  # Small steps: the loss jumps where the K-th and (K+1)-th gates swap.
  eps = 1e-3
  direction = _normal(5, 6, 4)

  def grads_and_differences():
    results = {}
    for combine in ("gate", "gate_softmax"):
      loss, kernel, logits = _task_loss(
          {"name": "SparseTopK", "capacity_factor": 2.0,
           "regularization": 1.0, "combine": combine})
      numeric = (loss(kernel + eps * direction) -
                 loss(kernel - eps * direction)) / (2 * eps)
      results[combine] = (jax.grad(loss)(kernel), numeric,
                          ops.topk_mask(logits, 2, regularization=1.0))
    return results

  results = jit(grads_and_differences)()
  for combine, (grad, numeric, gates) in results.items():
    assert np.any((gates > 0) & (gates < 1)), "needs gates strictly in (0, 1)"
    assert np.abs(grad).max() > 1e-3, combine
  # With combine="gate" nothing but the operator carries gradient, and the
  # gradient is the true derivative of the loss.
  grad, numeric, _ = results["gate"]
  np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=2e-2)


@pytest.mark.parametrize("config, kwargs, field", [
    ({"name": "Nope"}, {}, "router.name"),
    ({"name": "SparseTopK"}, {"num_selected_experts": 5},
     "num_selected_experts"),
    ({"name": "TopItemsPerExpert", "capacity_factr": 1.}, {}, "capacity_factr"),
    ({"name": "SparseTopK", "combine": "sum"}, {}, "combine"),
    ({"name": "SparseTopK", "min_gate": 1.}, {}, "min_gate"),
    ({"name": "SparseTopK", "capacity_factor": 0.}, {}, "capacity_factor"),
    ({"name": "SparseTopK", "num_experts": 3}, {}, "num_experts"),
    ({"name": "NoisyTopExpertsPerItem"}, {"dispatcher": "sparse"},
     "dispatcher"),
])
def test_bad_router_config_raises_naming_the_field(config, kwargs, field):
  kwargs = {"num_experts": 4, "num_selected_experts": 2, **kwargs}
  with pytest.raises(ValueError, match=field):
    routers.create_router(config, **kwargs)


def test_router_name_alone_switches_routers():
  config = {"name": "SparseTopK", "capacity_factor": 1.5, "p": 2.0,
            "noise_std": 0.5, "combine": "gate_softmax"}
  for name, cls in routers.ROUTERS.items():
    router = routers.create_router({**config, "name": name}, num_experts=4)
    assert type(router) is cls and router.capacity_factor == 1.5
  assert routers.create_router(config, num_experts=4).p == 2.0


def test_sparse_topk_solver_is_validated_by_the_operator():
  router = routers.SparseTopK(num_experts=4, num_selected_experts=2,
                              solver="pav")
  with pytest.raises(ValueError, match="solver"):
    router.init(KEY, jnp.ones((1, 4, 3)))


def test_per_item_routing_fills_first_choices_first():
  # Token 0 chooses (expert 0, expert 1), token 1 (expert 1, expert 0), and
  # C = 1. First choices are served before second choices, so each token
  # keeps its first choice (token order would give token 0 both experts).
  gates = jnp.asarray([[[0.6, 0.4], [0.3, 0.7]]])
  routing = jit(dispatch.per_item_routing, static_argnums=3)(
      gates, jnp.asarray([[[0, 1], [1, 0]]]), jnp.ones((1, 2, 2), bool), 1)
  np.testing.assert_array_equal(routing.token_index[0, :, 0], [0, 1])
  np.testing.assert_allclose(routing.combine_weights[0, :, 0], [0.6, 0.7])
  np.testing.assert_array_equal(routing.experts_per_token(2), [[1, 1]])


@pytest.mark.parametrize("schedule, quarter", [
    ("linear", 1.0 - 0.9 / 4),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("geometric", 0.1**0.25),
])
def test_regularization_schedule_values(schedule, quarter):
  router = routers.SparseTopK(
      num_experts=4, regularization=1.0, regularization_end=0.1,
      regularization_schedule=schedule, regularization_steps=100)
  values = [float(router.regularization_at(jnp.asarray(step)))
            for step in (0, 25, 100, 300)]
  np.testing.assert_allclose(values, [1.0, quarter, 0.1, 0.1], rtol=1e-6)
  assert float(router.regularization_at(None)) == pytest.approx(0.1)
  fixed = routers.SparseTopK(num_experts=4, regularization=0.3)
  assert float(fixed.regularization_at(jnp.asarray(7))) == pytest.approx(0.3)


@pytest.mark.parametrize("name", ("SparseTopK", "SparseTopItemsPerExpert"))
def test_scheduled_router_equals_the_fixed_router_at_that_lambda(name):
  config = {"name": name, "regularization": 1.0, "regularization_end": 0.05,
            "regularization_schedule": "geometric", "regularization_steps": 10}
  scheduled = routers.create_router(config, num_experts=4,
                                    num_selected_experts=2, dispatcher="index")
  x = _normal(0, NUM_GROUPS, GROUP_SIZE, WIDTH)
  params = {"params": _kernel(WIDTH, 4)}
  step = jnp.asarray(4)
  value = float(scheduled.regularization_at(step))   # 0.05 ** 0.4
  fixed = scheduled.clone(regularization=value, regularization_end=None)

  def run(params, x, step):
    return (scheduled.apply(params, x, step=step), fixed.apply(params, x),
            scheduled.apply(params, x))
  (got, got_metrics), (want, want_metrics), (_, end_metrics) = jit(run)(
      params, x, step)
  np.testing.assert_array_equal(got.routing.token_index,
                                want.routing.token_index)
  np.testing.assert_allclose(got.routing.combine_weights,
                             want.routing.combine_weights, atol=2e-6)
  np.testing.assert_allclose(got_metrics["regularization"], value, rtol=1e-6)
  np.testing.assert_allclose(end_metrics["regularization"], 0.05, rtol=1e-6)
  assert got_metrics["support_size"] > end_metrics["support_size"]


@pytest.mark.parametrize("fields, match", [
    ({"regularization_end": 0.0}, "regularization_end"),
    ({"regularization_steps": 0}, "regularization_steps"),
    ({"regularization_schedule": "step"}, "regularization_schedule"),
    ({"regularization": -1.0}, "regularization"),
    ({"z_loss_weight": -1.0}, "z_loss_weight"),
])
def test_bad_schedule_fields_raise(fields, match):
  for name in ("SparseTopK", "SparseTopItemsPerExpert"):
    with pytest.raises(ValueError, match=match):
      routers.create_router({"name": name, **fields}, num_experts=4)
