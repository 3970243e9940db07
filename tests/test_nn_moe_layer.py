"""Tests of moe.nn.moe_layer (and the MoE path of the encoder block)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.nn import moe_layer
from moe.nn import transformer
import nn_test_util

ROUTER_NAMES = ("NoisyTopExpertsPerItem", "TopItemsPerExpert", "SparseTopK",
                "SparseTopItemsPerExpert")
KEY = jax.random.key(0)
jit = nn_test_util.jit
_normal = nn_test_util.normal


def _layer(router_name, **kwargs):
  kwargs = {"num_experts": 4, "num_selected_experts": 2, "mlp_dim": 8,
            "router": {"name": router_name, "capacity_factor": 1.0}, **kwargs}
  return moe_layer.MoeMlpBlock(**kwargs)


def _random_params(module, *inputs, scale=0.5):
  return nn_test_util.random_params(module, *inputs, key=KEY, scale=scale)


def test_parameter_names_and_shapes():
  layer = _layer("SparseTopK", mlp_dim=16)
  x = jnp.zeros((2, 5, 6))
  params = jax.eval_shape(layer.init, KEY, x)["params"]
  shapes = {"/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert shapes == {
      "Router/dense/kernel": (6, 4),
      "Experts/Dense_0/kernel": (4, 6, 16),
      "Experts/Dense_0/bias": (4, 16),
      "Experts/Dense_1/kernel": (4, 16, 6),
      "Experts/Dense_1/bias": (4, 6),
  }


@functools.cache
def _both_dispatchers():
  """Forward and backward of every router with each dispatcher, jit once."""
  x = _normal(1, 2, 8, 6)
  probe = _normal(2, 2, 8, 6)
  params = {name: _random_params(_layer(name), x) for name in ROUTER_NAMES}

  def run(params, x):
    results = {}
    for name in ROUTER_NAMES:
      for kind in ("einsum", "index"):
        router = {"name": name, "capacity_factor": 0.5}   # C = 2: drops
        if name != "TopItemsPerExpert":
          router["noise_std"] = 1.0
        layer = _layer(name, dispatcher=kind, router=router)

        def loss(params, x, layer=layer):
          y, metrics = layer.apply({"params": params}, x, train=True,
                                   rngs={"gating": jax.random.key(3)})
          return jnp.sum(y * probe) + metrics["auxiliary_loss"], (y, metrics)

        grads, (y, metrics) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            params[name], x)
        results[name, kind] = (y, metrics, grads)
    return results

  return jax.device_get(jit(run)(params, x))


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_einsum_and_index_dispatch_agree_forward_and_backward(name):
  results = _both_dispatchers()
  einsum, index = results[name, "einsum"], results[name, "index"]
  assert einsum[1]["dropped_fraction"] > 0   # the drop path is exercised
  for a, b in zip(jax.tree.leaves(einsum), jax.tree.leaves(index)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  grads = jax.tree.leaves(einsum[2])
  assert all(np.abs(g).max() > 0 for g in grads)


@functools.cache
def _dropping_blocks():
  """An encoder block whose MoE keeps tokens 0 and 1 and drops the others.

  The router kernel is zero, so every expert gets the same gate: each token's
  first choice is expert 0 (ties go to the lower index) and, with K = 1,
  E = 4 and S = 8, C = 2; experts-choice routing takes tokens 0 and 1 in
  every expert for the same reason.
  """
  x = _normal(1, 1, 8, 8)
  blocks = {}
  for name in ROUTER_NAMES:
    block = transformer.EncoderBlock(
        mlp_dim=16, num_heads=2,
        moe={"num_experts": 4, "num_selected_experts": 1,
             "router": {"name": name, "capacity_factor": 1.0}})
    params = _random_params(block, x, scale=0.3)
    params["LayerNorm_0"]["scale"] = jnp.ones(8)
    params["LayerNorm_2"]["scale"] = jnp.ones(8)
    params["MoeBlock_3"]["Router"]["dense"]["kernel"] = jnp.zeros((8, 4))
    blocks[name] = (block, params)

  def run(x):
    results = {}
    for name, (block, params) in blocks.items():
      silent = jax.tree.map(lambda a: a, params)
      silent["MoeBlock_3"]["Experts"]["Dense_1"] = jax.tree.map(
          jnp.zeros_like, params["MoeBlock_3"]["Experts"]["Dense_1"])
      moe = moe_layer.MoeMlpBlock(
          num_experts=4, num_selected_experts=1, mlp_dim=16,
          router={"name": name, "capacity_factor": 1.0})
      results[name] = (
          block.apply({"params": params}, x),
          block.apply({"params": silent}, x)[0],
          moe.apply({"params": params["MoeBlock_3"]}, x))
    return results

  return jax.device_get(jit(run)(x))


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_dropped_tokens_get_zero_output_and_pass_through_the_residual(name):
  (output, metrics), residual_only, (moe_output, moe_metrics) = (
      _dropping_blocks()[name])
  dropped = np.arange(8) >= 2
  np.testing.assert_allclose(metrics["dropped_fraction"], 0.75)
  np.testing.assert_allclose(moe_metrics["dropped_fraction"], 0.75)
  assert np.all(moe_output[0, dropped] == 0)
  assert np.all(np.abs(moe_output[0, ~dropped]).max(-1) > 0)
  # The block's output for a dropped token is its attention residual alone.
  np.testing.assert_array_equal(output[0, dropped], residual_only[0, dropped])
  assert np.all(np.abs(output[0, ~dropped] - residual_only[0, ~dropped])
                .max(-1) > 1e-4)


def test_bfloat16_compute():
  x = _normal(1, 2, 8, 6)
  layer = _layer("NoisyTopExpertsPerItem", router={
      "name": "NoisyTopExpertsPerItem", "capacity_factor": 2.0})
  params = _random_params(layer, x)
  bf16 = layer.clone(dtype="bfloat16")
  apply = lambda layer: lambda p, x: layer.apply({"params": p}, x)[0]
  y32, y16 = jit(lambda p, x: (apply(layer)(p, x), apply(bf16)(p, x)))(
      params, x)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=5e-2, atol=5e-2)
  assert not np.array_equal(y16, y32)
  jaxpr = str(jax.make_jaxpr(apply(bf16))(params, x))
  assert "bf16[4,16,8]" in jaxpr       # expert hidden activations [E, G*C, H]


def test_group_size():
  x = _normal(1, 4, 6, 6)
  layer = _layer("TopItemsPerExpert")
  params = _random_params(layer, x)
  per_example, explicit, pairs = jit(lambda p, x: [
      layer.clone(group_size=size).apply({"params": p}, x)[0]
      for size in (None, 6, 12)])(params, x)
  np.testing.assert_array_equal(per_example, explicit)
  assert not np.allclose(per_example, pairs)   # groups of 2 examples differ
  with pytest.raises(ValueError, match="group_size"):
    jax.eval_shape(layer.clone(group_size=5).init, KEY, x)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_selected_experts": 5}, "num_selected_experts"),
    ({"router": {"name": "TopK"}}, "router.name"),
    ({"router": {"name": "SparseTopK", "p": 1.5, "regularisation": 1.}},
     r"config.model.encoder.moe.router has unknown field\(s\) regularisation"),
    ({"dispatcher": "scatter"}, "dispatcher"),
    ({"dtype": "int8"}, "dtype"),
    ({"group_size": 0}, "group_size"),
])
def test_bad_config_raises_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    layer = _layer("SparseTopK", **kwargs)
    jax.eval_shape(layer.init, KEY, jnp.zeros((2, 4, 6)))


@pytest.mark.parametrize("name", ("SparseTopK", "SoftMoE"))
def test_sharded_layer_matches_unsharded(name, eight_devices):
  mesh = jax.sharding.Mesh(np.array(eight_devices).reshape(2, 4),
                           ("data", "expert"))
  named = lambda *spec: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec))
  x = _normal(1, 8, 8, 6)
  # min_gate: float noise from sharded reductions must not move gates across
  # the dispatch threshold; gates with p = 4/3 pile up just above 0.
  router = {"name": name, "capacity_factor": 1.0, "min_gate": 1e-3}
  layer = _layer(name, router=router,
                 dispatcher="einsum" if name == "SoftMoE" else "index")
  params = _random_params(layer, x)

  def loss(params, x):
    y, metrics = layer.apply({"params": params}, x)
    return jnp.sum(y**2) + metrics["auxiliary_loss"], y

  step = jax.value_and_grad(loss, has_aux=True)
  expected = jit(step)(params, x)
  shardings = {
      "Router": jax.tree.map(lambda _: named(), params["Router"]),
      "Experts": jax.tree.map(lambda _: named("expert"), params["Experts"])}
  sharded_step = jit(step, in_shardings=(shardings, named(("data", "expert"))))
  params = jax.device_put(params, shardings)
  x = jax.device_put(x, named(("data", "expert")))
  # Each device holds one expert: Dense_0/kernel is [E / 4, D, H] there.
  assert "f32[1,6,8]" in sharded_step.lower(params, x).compile().as_text()
  sharded = sharded_step(params, x)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
