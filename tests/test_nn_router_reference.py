"""Every router and dispatcher against a per-token brute-force numpy reference.

The reference (written from the routers' docstrings, not their code) loops
over tokens and experts in float64: token-choice routers fill buffers choice
by choice, in token order or by batch priority; experts-choice routers let
each expert take its top-C tokens; Soft MoE follows the paper's equations.
The MoE layer's output must then equal, token by token, the weighted sum of
the numpy expert MLPs of the slots that hold the token.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import test_util as jax_test_util
import numpy as np
import pytest

from moe.nn import moe_layer
from moe.nn import routers
import nn_test_util
import topk_reference

NUM_GROUPS, GROUP_SIZE, WIDTH, HIDDEN = 2, 9, 5, 6
NUM_EXPERTS, K = 4, 2
CAPACITY_FACTOR = 0.75          # C = ceil(2 * 9 * 0.75 / 4) = 4: drops.
REGULARIZATION = 0.3
jit = nn_test_util.jit


def _softmax(z, axis=-1):
  z = z - np.max(z, axis=axis, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=axis, keepdims=True)


def _gelu(x):   # flax's nn.gelu (tanh approximation)
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _expert_mlp(params, e, x):
  """Expert e's MLP on one token `[D]` (or slot) in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["Experts"])
  h = _gelu(x @ p["Dense_0"]["kernel"][e] + p["Dense_0"]["bias"][e])
  return h @ p["Dense_1"]["kernel"][e] + p["Dense_1"]["bias"][e]


def fill_token_choice(gates, choices, requested, capacity, priority=None):
  """Per-token buffer filling: every first choice before any second choice.

  Args:
    gates: `[S, E]` combine weights.
    choices: `[S, K]` experts of each token, best first.
    requested: `[S, K]` bool.
    capacity: slots per expert (None: unlimited).
    priority: optional `[S]`; higher is served first, ties in token order.

  Returns:
    {expert: [(token, weight), ...] in slot order}.
  """
  group_size, num_choices = choices.shape
  order = list(range(group_size))
  if priority is not None:
    order.sort(key=lambda s: -priority[s])   # Python's sort is stable.
  slots = {e: [] for e in range(gates.shape[1])}
  for k in range(num_choices):
    for s in order:
      e = int(choices[s, k])
      if requested[s, k] and (capacity is None or len(slots[e]) < capacity):
        slots[e].append((s, gates[s, e]))
  return slots


def fill_experts_choice(gates, weights, capacity, min_gate=0.0):
  """Expert e takes the `capacity` tokens of largest `gates[:, e]`."""
  slots = {}
  for e in range(gates.shape[1]):
    top = sorted(range(gates.shape[0]), key=lambda s: -gates[s, e])
    slots[e] = [(s, weights[s, e]) for s in top[:capacity]
                if gates[s, e] > min_gate]
  return slots


def _top_k(values, k):
  return np.array([sorted(range(len(row)), key=lambda e: -row[e])[:k]
                   for row in values])


def _soft_topk(values, k):
  """The reference soft top-k mask of a 1-D array; capped entries are
  exactly 1 (the bisection leaves them 1e-15 off), so ties go to the lower
  index as in `moe.ops.top_k_by_sort`."""
  return np.round(topk_reference.topk_mask(values, k, REGULARIZATION, 4 / 3),
                  12)


def reference_slots(name, config, logits, capacity):
  """The numpy routing of one group: {expert: [(token, weight)]}."""
  probs = _softmax(logits)
  if name == "NoisyTopExpertsPerItem":     # eval: no noise
    choices = _top_k(probs, K)
    priority = probs.max(-1) if config.get("batch_priority") else None
    return fill_token_choice(probs, choices, np.ones(choices.shape, bool),
                             capacity, priority)
  if name == "SparseTopK":
    gates = np.stack([_soft_topk(row, K) for row in logits])
    choices = _top_k(gates, K)
    requested = np.take_along_axis(gates, choices, -1) > 0
    priority = (np.max(np.log(probs), -1) if config.get("batch_priority")
                else None)
    return fill_token_choice(gates, choices, requested, capacity, priority)
  if name == "TopItemsPerExpert":
    return fill_experts_choice(probs, probs, capacity)
  gates = np.stack([_soft_topk(col, capacity) for col in logits.T], -1)
  return fill_experts_choice(gates, gates, capacity)


def reference_output(params, x, slots):
  """`[S, D]`: each token's weighted sum of its slots' expert outputs."""
  out = np.zeros(x.shape)
  for e, held in slots.items():
    for s, weight in held:
      out[s] += weight * _expert_mlp(params, e, x[s])
  return out


CASES = (
    ("NoisyTopExpertsPerItem", {}, "einsum"),
    ("NoisyTopExpertsPerItem", {"batch_priority": True}, "index"),
    ("NoisyTopExpertsPerItem", {}, "ragged"),
    ("SparseTopK", {}, "einsum"),
    ("SparseTopK", {"batch_priority": True}, "index"),
    ("SparseTopK", {}, "ragged"),
    ("TopItemsPerExpert", {}, "einsum"),
    ("TopItemsPerExpert", {}, "index"),
    ("SparseTopItemsPerExpert", {}, "einsum"),
    ("SparseTopItemsPerExpert", {}, "index"),
)


def _layer(name, config, dispatcher):
  router = {"name": name, "capacity_factor": CAPACITY_FACTOR,
            "regularization": REGULARIZATION, **config}
  return moe_layer.MoeMlpBlock(
      num_experts=NUM_EXPERTS, num_selected_experts=K, mlp_dim=HIDDEN,
      router=router, dispatcher=dispatcher)


def _inputs():
  return nn_test_util.normal(0, NUM_GROUPS, GROUP_SIZE, WIDTH)


@functools.cache
def _run_cases():
  """Every case's params and (outputs, metrics), in one jit."""
  x = _inputs()
  layers = [_layer(*case) for case in CASES]
  params = [nn_test_util.random_params(layer, x, scale=1.0)
            for layer in layers]
  def run(params):
    return [layer.apply({"params": p}, x) for layer, p in zip(layers, params)]
  return x, params, jax.device_get(jit(run)(params))


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{n}-{c}-{d}" for n, c, d in CASES])
def test_layer_equals_per_token_reference(case):
  name, config, dispatcher = CASES[case]
  x, all_params, results = _run_cases()
  params, (outputs, metrics) = all_params[case], results[case]
  x = np.asarray(x, np.float64)
  capacity = None if dispatcher == "ragged" else routers.compute_capacity(
      GROUP_SIZE, NUM_EXPERTS, K, CAPACITY_FACTOR)
  kernel = np.asarray(params["Router"]["dense"]["kernel"], np.float64)
  served, loads = [], []
  for g in range(NUM_GROUPS):
    slots = reference_slots(name, config, x[g] @ kernel, capacity)
    np.testing.assert_allclose(outputs[g], reference_output(params, x[g],
                                                            slots),
                               rtol=1e-4, atol=1e-4)
    served.append({s for held in slots.values() for s, _ in held})
    loads.append([len(slots[e]) for e in range(NUM_EXPERTS)])
  np.testing.assert_allclose(metrics["tokens_per_expert"],
                             np.mean(loads, axis=0))
  np.testing.assert_allclose(
      metrics["dropped_fraction"],
      1 - np.mean([len(s) / GROUP_SIZE for s in served]))


def test_drops_happen_in_the_reference_cases():
  """The capacity of CASES is binding for token-choice routers."""
  x, all_params, _ = _run_cases()
  capacity = routers.compute_capacity(GROUP_SIZE, NUM_EXPERTS, K,
                                      CAPACITY_FACTOR)
  kernel = np.asarray(all_params[0]["Router"]["dense"]["kernel"])
  full = reference_slots("NoisyTopExpertsPerItem", {},
                         np.asarray(x[0]) @ kernel, None)
  assert max(len(held) for held in full.values()) > capacity


def _soft_moe_reference(params, x, num_slots):
  """Soft MoE of one group `[S, D]`, the paper's equations in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["Router"])
  xn = x / np.sqrt(np.sum(x**2, -1, keepdims=True) + 1e-6)
  phi = p["phi"] / np.sqrt(np.sum(p["phi"]**2, 0, keepdims=True) + 1e-6)
  logits = p["scale"] * np.einsum("sd,dec->sec", xn, phi)
  dispatch = _softmax(logits, axis=0)
  combine = _softmax(logits.reshape(len(x), -1)).reshape(logits.shape)
  out = np.zeros(x.shape)
  for e in range(NUM_EXPERTS):
    for c in range(num_slots):
      slot_out = _expert_mlp(params, e, dispatch[:, e, c] @ x)
      out += combine[:, e, c, None] * slot_out[None]
  return out, dispatch, combine


def test_soft_moe_equals_the_papers_equations():
  layer = moe_layer.MoeMlpBlock(
      num_experts=NUM_EXPERTS, num_selected_experts=K, mlp_dim=HIDDEN,
      router={"name": "SoftMoE", "capacity_factor": 1.0})
  x = _inputs()
  params = nn_test_util.random_params(layer, x, scale=1.0)
  num_slots = routers.compute_capacity(GROUP_SIZE, NUM_EXPERTS, K, 1.0)
  assert params["Router"]["phi"].shape == (WIDTH, NUM_EXPERTS, num_slots)
  outputs, metrics = jax.device_get(jit(layer.apply)({"params": params}, x))
  for g in range(NUM_GROUPS):
    expected, dispatch, combine = _soft_moe_reference(
        params, np.asarray(x[g], np.float64), num_slots)
    np.testing.assert_allclose(outputs[g], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["dispatch_weight_max"],
                             np.mean([_soft_moe_reference(
                                 params, np.asarray(xg, np.float64),
                                 num_slots)[1].max(0) for xg in x]),
                             rtol=1e-5)
  assert metrics["dropped_fraction"] == 0
  assert metrics["experts_per_token"] == NUM_EXPERTS
  np.testing.assert_allclose(metrics["tokens_per_expert"],
                             np.full(NUM_EXPERTS, GROUP_SIZE))
  assert metrics["auxiliary_loss"] == 0


def test_soft_moe_rejects_buffer_dispatchers_and_bad_slots():
  with pytest.raises(ValueError, match="dispatcher must be 'einsum'"):
    routers.SoftMoE(num_experts=4, dispatcher="index")
  with pytest.raises(ValueError, match="slots_per_expert"):
    routers.SoftMoE(num_experts=4, slots_per_expert=0)


def test_sparse_experts_choice_gradients_match_finite_differences():
  router = routers.SparseTopItemsPerExpert(
      num_experts=NUM_EXPERTS, num_selected_experts=K, regularization=1.0,
      dispatcher="index")
  x = _inputs()
  kernel = nn_test_util.normal(3, WIDTH, NUM_EXPERTS)
  slot_outputs = nn_test_util.normal(4, NUM_EXPERTS, NUM_GROUPS,
                                     router.capacity(GROUP_SIZE, False), WIDTH)

  def combined(kernel):
    dispatcher, _ = router.apply({"params": {"dense": {"kernel": kernel}}}, x)
    return dispatcher.combine(slot_outputs)

  jax_test_util.check_grads(combined, (kernel,), order=1, modes=("rev",),
                            atol=5e-2, rtol=5e-2, eps=1e-3)
  grad = jax.grad(lambda k: jnp.sum(combined(k)**2))(kernel)
  assert np.abs(grad).max() > 1e-3   # The selection itself has a gradient.


def test_z_loss_and_switch_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 7, 5))
  np.testing.assert_allclose(
      routers.z_loss(jnp.asarray(logits, jnp.float32)),
      np.mean(np.log(np.sum(np.exp(logits), -1))**2), rtol=1e-5)

  probs = _softmax(logits)
  choices = np.stack([_top_k(p, 2) for p in probs])
  requested = rng.random(choices.shape) > 0.3
  counts = np.zeros(probs.shape)
  for g, s, k in np.ndindex(*choices.shape):
    counts[g, s, choices[g, s, k]] += requested[g, s, k]
  f = counts.mean(1) / 2
  expected = np.mean(5 * np.sum(f * probs.mean(1), -1))
  np.testing.assert_allclose(
      routers.switch_loss(jnp.asarray(probs, jnp.float32),
                          jnp.asarray(choices), jnp.asarray(requested)),
      expected, rtol=1e-5)
  # K = 1: the Switch paper's loss, which is also GShard's.
  top1 = choices[..., :1]
  np.testing.assert_allclose(
      routers.switch_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(top1),
                          jnp.ones(top1.shape, bool)),
      routers.gshard_loss(jnp.asarray(probs, jnp.float32)), rtol=1e-5)
  uniform = jnp.full((1, 8, 4), 0.25)
  balanced = jnp.arange(8).reshape(1, 8, 1) % 4
  np.testing.assert_allclose(
      routers.switch_loss(uniform, balanced, jnp.ones((1, 8, 1), bool)), 1.)


@pytest.mark.parametrize("name", ("NoisyTopExpertsPerItem", "SparseTopK"))
def test_token_choice_auxiliary_loss_is_the_weighted_sum(name):
  weights = {"importance_loss_weight": 0.3, "gshard_loss_weight": 0.2,
             "switch_loss_weight": 0.7, "z_loss_weight": 0.05}
  router = routers.create_router({"name": name, **weights}, num_experts=4,
                                 num_selected_experts=2)
  x = _inputs()
  params = {"dense": {"kernel": nn_test_util.normal(1, WIDTH, 4)}}
  _, metrics = jit(functools.partial(router.apply, train=True))(
      {"params": params}, x, rngs={"gating": jax.random.key(0)})
  expected = sum(w * metrics[name.removesuffix("_weight")]
                 for name, w in weights.items())
  if name == "NoisyTopExpertsPerItem":
    expected += metrics["load_loss"]   # load_loss_weight defaults to 1
  np.testing.assert_allclose(metrics["auxiliary_loss"], expected, rtol=1e-5)
  logits = np.asarray(x) @ np.asarray(params["dense"]["kernel"])
  np.testing.assert_allclose(metrics["z_loss"],
                             np.mean(np.log(np.exp(logits).sum(-1))**2),
                             rtol=1e-5)


def test_vmoe_capacity_options():
  # The example: S=17, E=8, K=2, cf=1.25.
  assert routers.compute_capacity(17, 8, 2, 1.25) == 6
  assert routers.compute_capacity(17, 8, 2, 1.25, multiple_of=4) == 8
  assert routers.compute_capacity(5, 8, 2, 1.25, multiple_of=4) == 4  # <= S
  experts_choice = routers.TopItemsPerExpert(
      num_experts=8, num_selected_experts=2, capacity_factor=1.25)
  assert experts_choice.capacity(17, train=True) == 6
  vmoe = experts_choice.clone(capacity_scales_with_k=False)
  assert vmoe.capacity(17, train=True) == 3          # ceil(17 * 1.25 / 8)
  assert vmoe.clone(capacity_multiple_of=4).capacity(17, train=True) == 4
  with pytest.raises(ValueError, match="capacity_multiple_of"):
    routers.SparseTopK(num_experts=4, capacity_multiple_of=0)


def test_experts_choice_train_noise_enters_the_selection(monkeypatch):
  noise = nn_test_util.normal(7, NUM_GROUPS, GROUP_SIZE, NUM_EXPERTS, scale=3.)
  seen = []

  def add_noise(self, logits, noise_std):
    seen.append(noise_std)
    return logits + noise
  monkeypatch.setattr(routers.Router, "add_noise", add_noise)
  x = _inputs()
  kernel = nn_test_util.normal(1, WIDTH, NUM_EXPERTS)
  router = routers.TopItemsPerExpert(num_experts=NUM_EXPERTS,
                                     num_selected_experts=K, noise_std=1.0,
                                     dispatcher="index")
  capacity = router.capacity(GROUP_SIZE, True)
  for train in (False, True):
    dispatcher, _ = router.apply({"params": {"dense": {"kernel": kernel}}}, x,
                                 train=train)
    for g in range(NUM_GROUPS):
      logits = np.asarray(x[g]) @ np.asarray(kernel)
      gates = _softmax(logits + (np.asarray(noise[g]) if train else 0.))
      slots = fill_experts_choice(gates, gates, capacity)
      for e, held in slots.items():
        assert list(dispatcher.routing.token_index[g, e]) == [s for s, _ in held]
        np.testing.assert_allclose(dispatcher.routing.combine_weights[g, e],
                                   [w for _, w in held], rtol=1e-5)
  assert seen == [1.0]
