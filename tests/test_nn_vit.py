"""Tests of moe.nn.vit (ViT / V-MoE), moe.nn.transformer and moe.nn.models."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe.nn import models
from moe.nn import transformer
from moe.nn import vit
import nn_test_util

KEY = jax.random.key(0)
jit = nn_test_util.jit
_normal = nn_test_util.normal


def _random_params(module, *inputs, scale=0.3):
  return nn_test_util.random_params(module, *inputs, key=KEY, scale=scale)


def _num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _paths(tree):
  return {"/".join(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _vmoe_config(**moe):
  """A tiny V-MoE config: 16x16 images, 4x4 patches, 17 tokens per image."""
  moe = {"layers": "every_2", "num_experts": 4, "num_selected_experts": 2,
         "group_size": 17, "router": {"name": "SparseTopK",
                                      "capacity_factor": 1.0}, **moe}
  return {"name": "vit", "variant": "tiny/4", "num_classes": 10,
          "encoder": {"moe": moe}}


# Parameter counts of the public ViTs at 224 px with 1000 classes.
@pytest.mark.parametrize("variant, expected", [
    ("Ti/16", 5_717_416),
    ("S/16", 22_050_664),
    ("B/16", 86_567_656),
    ("B/32", 88_224_232),
    ("L/16", 304_326_632),
])
def test_variants_shapes_and_parameter_counts(variant, expected):
  model = vit.create_model({"variant": variant, "num_classes": 1000})
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, KEY, images)
  assert _num_params(variables) == expected
  logits, metrics = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert metrics["auxiliary_loss"].shape == ()


def test_any_patch_size_and_explicit_fields_override_the_variant():
  model = vit.create_model({"variant": "S/14", "num_classes": 5,
                            "encoder": {"num_layers": 2}})
  assert model.patch_size == (14, 14) and model.hidden_size == 384
  assert model.encoder == {"num_layers": 2, "mlp_dim": 1536, "num_heads": 6}
  images = jax.ShapeDtypeStruct((1, 28, 42, 3), jnp.float32)
  params = jax.eval_shape(model.init, KEY, images)["params"]
  # 2 x 3 patches plus the class token.
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, 7, 384)


def test_checkpoint_compatible_parameter_names():
  config = _vmoe_config()
  config["representation_size"] = 8
  model = models.build_model(ml_collections.ConfigDict(config))
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 16, 16, 3)))["params"]
  paths = _paths(params)
  block0, block1 = "Transformer/encoderblock_0", "Transformer/encoderblock_1"
  expected = {
      "embedding/kernel": (4, 4, 3, 32), "embedding/bias": (32,),
      "cls": (1, 1, 32),
      "Transformer/posembed_input/pos_embedding": (1, 17, 32),
      "Transformer/encoder_norm/scale": (32,),
      f"{block0}/LayerNorm_0/scale": (32,),
      f"{block0}/MultiHeadDotProductAttention_1/query/kernel": (32, 2, 16),
      f"{block0}/MultiHeadDotProductAttention_1/out/kernel": (2, 16, 32),
      f"{block0}/LayerNorm_2/bias": (32,),
      f"{block0}/MlpBlock_3/Dense_0/kernel": (32, 64),
      f"{block0}/MlpBlock_3/Dense_1/bias": (32,),
      f"{block1}/MoeBlock_3/Router/dense/kernel": (32, 4),
      f"{block1}/MoeBlock_3/Experts/Dense_0/kernel": (4, 32, 64),
      f"{block1}/MoeBlock_3/Experts/Dense_0/bias": (4, 64),
      f"{block1}/MoeBlock_3/Experts/Dense_1/kernel": (4, 64, 32),
      f"{block1}/MoeBlock_3/Experts/Dense_1/bias": (4, 32),
      "pre_logits/kernel": (32, 8),
      "head/kernel": (8, 10), "head/bias": (10,),
  }
  assert expected.items() <= paths.items()
  assert not any(f"{block0}/MoeBlock" in p or f"{block1}/MlpBlock" in p
                 for p in paths)
  # The MoE block adds E - 1 copies of the MLP and the router.
  dense = models.build_model({**config, "encoder": {}})
  dense_params = jax.eval_shape(dense.init, KEY, jnp.zeros((1, 16, 16, 3)))
  mlp = 32 * 64 + 64 + 64 * 32 + 32
  assert _num_params(params) == _num_params(dense_params) + 3 * mlp + 32 * 4


def test_moe_layer_presets():
  assert transformer.moe_layer_indices("every_2", 12) == (1, 3, 5, 7, 9, 11)
  assert transformer.moe_layer_indices("last_2", 12) == (10, 11)
  assert transformer.moe_layer_indices("every_1", 3) == (0, 1, 2)
  assert transformer.moe_layer_indices([3, 1, 3], 4) == (1, 3)


@functools.cache
def _tiny_models():
  """Runs a dense ViT (class token) and a V-MoE (GAP, MoE in both blocks)."""
  images = _normal(1, 2, 16, 16, 3)
  dense = vit.create_model(variant="tiny/4", num_classes=10, encoder={
      "dropout_rate": 0.1, "stochastic_depth": 0.5})
  config = _vmoe_config(layers=(0, 1), group_size=None)
  config["classifier"] = "gap"
  vmoe = vit.create_model(config)
  params = {"dense": _random_params(dense, images),
            "vmoe": _random_params(vmoe, images)}

  def run(params, images, seed):
    rngs = {"dropout": jax.random.key(seed), "gating": jax.random.key(seed)}
    return {
        "dense_eval": dense.apply({"params": params["dense"]}, images),
        "dense_train": dense.apply({"params": params["dense"]}, images,
                                   train=True, rngs=rngs),
        "vmoe": vmoe.apply({"params": params["vmoe"]}, images, train=True,
                           rngs=rngs)}

  run = jit(run)
  return run(params, images, 1), run(params, images, 2)


def test_forward_outputs_metrics_and_train_randomness():
  first, second = _tiny_models()
  logits, metrics = first["vmoe"]
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  layer_losses = [metrics[f"encoderblock_{i}/auxiliary_loss"] for i in (0, 1)]
  np.testing.assert_allclose(metrics["auxiliary_loss"], sum(layer_losses),
                             rtol=1e-6)
  for i in (0, 1):
    assert metrics[f"encoderblock_{i}/tokens_per_expert"].shape == (4,)
    assert 0 < metrics[f"encoderblock_{i}/support_size"] <= 4

  dense_logits, dense_metrics = first["dense_eval"]
  assert dense_logits.shape == (2, 10)
  assert dense_metrics == {"auxiliary_loss": 0.}
  # Eval is deterministic; dropout and stochastic depth depend on the rng.
  np.testing.assert_array_equal(dense_logits, second["dense_eval"][0])
  assert not np.allclose(first["dense_train"][0], second["dense_train"][0])
  assert not np.allclose(first["dense_train"][0], dense_logits)


def test_sharded_vmoe_matches_unsharded(eight_devices):
  mesh = jax.sharding.Mesh(np.array(eight_devices).reshape(2, 4),
                           ("data", "expert"))
  named = lambda *spec: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec))
  # min_gate: float noise from sharded reductions must not move gates across
  # the dispatch threshold; gates with p = 4/3 pile up just above 0.
  model = models.build_model(_vmoe_config(router={
      "name": "SparseTopK", "capacity_factor": 1.0, "min_gate": 1e-3}))
  images = _normal(1, 8, 16, 16, 3)
  labels = jnp.arange(8) % 10
  params = _random_params(model, images)

  def step(params, images):
    def loss(params):
      logits, metrics = model.apply({"params": params}, images, train=True,
                                    rngs={"gating": jax.random.key(2)})
      log_probs = jax.nn.log_softmax(logits)
      nll = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))
      return nll + 0.01 * metrics["auxiliary_loss"], metrics
    return jax.value_and_grad(loss, has_aux=True)(params)

  expected = jit(step)(params, images)
  # Expert parameters on the expert axis, everything else replicated; the
  # batch over all devices.
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, _: named("expert") if any(
          getattr(k, "key", None) == "Experts" for k in path) else named(),
      params)
  sharded = jit(step, in_shardings=(shardings, named(("data", "expert"))))(
      jax.device_put(params, shardings),
      jax.device_put(images, named(("data", "expert"))))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  experts = sharded[1]["Transformer"]["encoderblock_1"]["MoeBlock_3"]["Experts"]
  assert np.abs(experts["Dense_0"]["kernel"]).max() > 0


@pytest.mark.parametrize("config, field", [
    ({"variant": "XL/16"}, "variant"),
    ({"variant": "S16"}, "variant"),
    ({"classifier": "pool"}, "classifier"),
    ({"patch_size": 3}, "patch_size"),
    ({"widht": 3}, r"config.model has unknown field\(s\) widht"),
    ({"encoder": {"num_layer": 3}},
     r"config.model.encoder has unknown field\(s\) num_layer"),
    ({"encoder": {"moe": {"layers": (0, 2)}}}, "moe.layers"),
    ({"encoder": {"moe": {"layers": "every_3"}}}, "moe.layers"),
    ({"encoder": {"moe": {"layers": "first_2"}}}, "moe.layers"),
    ({"encoder": {"moe": {"group_size": 16}}}, "group_size"),
    ({"encoder": {"moe": {"num_selected_experts": 5}}}, "num_selected_experts"),
    ({"encoder": {"moe": {"router": {"name": "Switch"}}}}, "router.name"),
    ({"encoder": {"moe": {"expert_dim": 3}}},
     r"config.model.encoder.moe has unknown field\(s\) expert_dim"),
])
def test_bad_config_raises_naming_the_field(config, field):
  base = _vmoe_config()
  moe = {**base["encoder"]["moe"], **config.get("encoder", {}).get("moe", {})}
  encoder = {**base["encoder"], **config.get("encoder", {}), "moe": moe}
  config = {**base, **config, "encoder": encoder}
  with pytest.raises(ValueError, match=field):
    model = models.build_model(config)
    jax.eval_shape(model.init, KEY, jnp.zeros((2, 16, 16, 3)))


def test_unknown_model_name():
  with pytest.raises(ValueError, match="model.name"):
    models.build_model({"name": "resnet"})
