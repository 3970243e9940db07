"""Tests of moe.parallel.partitioning on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moe.train import optimizers
from moe.parallel import partitioning

EXPERT_RULES = (("Moe/Mlp/.*", ("expert",)),)


def _params():
  """Experts with a leading E=4 axis, a dense layer and a head."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)
  return {
      "Moe": {"Mlp": {"kernel": normal(4, 8, 16), "bias": normal(4, 16)}},
      "Dense_0": {"kernel": normal(8, 8), "bias": normal(8)},
      "head": {"kernel": normal(24, 4)},
  }


def _specs(tree):
  return jax.tree.map(lambda x: x.sharding.spec, tree)


@pytest.mark.parametrize("expert, data", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_mesh_shape(eight_devices, expert, data):
  mesh = partitioning.create_mesh_from_config(
      ml_collections.ConfigDict(dict(expert=expert)))
  assert mesh.axis_names == ("data", "expert")
  assert dict(mesh.shape) == {"data": data, "expert": expert}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("expert", [3, 16, 0, "2"])
def test_mesh_rejects_expert_counts_that_do_not_divide(eight_devices, expert):
  with pytest.raises(ValueError, match=r"config.mesh.expert must divide the "
                     r"number of devices \(8\); allowed values: "
                     r"\[1, 2, 4, 8\]"):
    partitioning.create_mesh(expert)


def test_mesh_config_errors():
  with pytest.raises(ValueError, match=r"config.mesh has unknown field\(s\) "
                     r"experts; allowed fields: expert, partition_rules"):
    partitioning.MeshConfig.from_config(dict(experts=2))
  with pytest.raises(ValueError, match=r"names mesh axes \['model'\]"):
    partitioning.MeshConfig.from_config(
        dict(partition_rules=(("Moe/.*", ("model",)),)))
  assert partitioning.MeshConfig.from_config(None) == partitioning.MeshConfig()


def test_partition_rules_put_experts_on_expert_axis(eight_devices):
  mesh = partitioning.create_mesh(2)
  params = _params()
  shardings = partitioning.param_shardings(
      jax.eval_shape(lambda: params), mesh, EXPERT_RULES)
  placed = jax.device_put(params, shardings)
  assert _specs(placed) == {
      "Moe": {"Mlp": {"kernel": P("expert"),
                      "bias": P("expert")}},
      "Dense_0": {"kernel": P(), "bias": P()},
      "head": {"kernel": P()},
  }
  expert_kernel = placed["Moe"]["Mlp"]["kernel"]
  shard_shapes = {s.data.shape for s in expert_kernel.addressable_shards}
  assert shard_shapes == {(2, 8, 16)}
  assert placed["head"]["kernel"].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, placed, params)


def test_first_matching_rule_wins_and_tuple_axes(eight_devices):
  mesh = partitioning.create_mesh(2)
  rules = (("Moe/Mlp/bias", (None, ("data", "expert"))),) + EXPERT_RULES
  shardings = partitioning.param_shardings(_params(), mesh, rules)
  assert shardings["Moe"]["Mlp"]["bias"].spec == P(None, ("data", "expert"))
  assert shardings["Moe"]["Mlp"]["kernel"].spec == P("expert")


def test_fsdp_shards_large_params_over_data(eight_devices):
  mesh = partitioning.create_mesh(2)
  shardings = partitioning.param_shardings(_params(), mesh, EXPERT_RULES,
                                           fsdp_min_size=64)
  # Largest free dimension divisible by data=4: 16 for the expert kernel.
  assert shardings["Moe"]["Mlp"]["kernel"].spec == P("expert", None, "data")
  assert shardings["Moe"]["Mlp"]["bias"].spec == P("expert", "data")
  assert shardings["Dense_0"]["kernel"].spec == P("data")
  assert shardings["head"]["kernel"].spec == P("data")
  assert shardings["Dense_0"]["bias"].spec == P()  # 8 elements < 64.


def test_partition_rule_errors(eight_devices):
  mesh = partitioning.create_mesh(8)
  with pytest.raises(ValueError, match=r"parameter 'Moe/Mlp/bias' of shape "
                     r"\(4, 16\) cannot be split 8 ways along its dimension "
                     r"of size 4"):
    partitioning.param_shardings(_params(), mesh, EXPERT_RULES)
  with pytest.raises(ValueError, match=r"rule 'head/.\*' gives 3 entries .* "
                     r"but parameter 'head/kernel' has shape \(24, 4\)"):
    partitioning.param_shardings(_params(), mesh,
                                 (("head/.*", (None, None, "expert")),))


def _adam_with_frozen_and_accumulation():
  return optimizers.create_optimizer(dict(
      name="adamw", learning_rate=0.05, weight_decay=0.01, grad_clip_norm=1.0,
      frozen_params=("Dense_0/bias",), accumulation_steps=2)).tx


def test_optimizer_state_follows_param_shardings(eight_devices):
  mesh = partitioning.create_mesh(2)
  params = _params()
  tx = _adam_with_frozen_and_accumulation()
  param_shardings = partitioning.param_shardings(params, mesh, EXPERT_RULES)
  abstract_state = jax.eval_shape(tx.init, params)
  state_shardings = partitioning.shardings_like_params(
      abstract_state, params, param_shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_shardings)(
      jax.device_put(params, param_shardings))
  expected = {"Moe/Mlp/kernel": P("expert"),
              "Moe/Mlp/bias": P("expert")}
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    suffix = [p for p in expected if name.endswith(
        "".join(f"['{k}']" for k in p.split("/")))]
    if suffix:
      assert leaf.sharding.spec == expected[suffix[0]], name
      seen.add(name)
    else:
      assert leaf.sharding.is_fully_replicated, name
  # mu, nu and the accumulated gradients of both expert parameters.
  assert len(seen) == 6


def _loss(params, batch):
  """A dense layer and a mixture of experts side by side, then a head."""
  x, labels = batch["x"], batch["labels"]
  experts = jnp.einsum("bd,edh->beh", x, params["Moe"]["Mlp"]["kernel"])
  experts = jax.nn.relu(experts + params["Moe"]["Mlp"]["bias"]).mean(axis=1)
  dense = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  logits = jnp.concatenate([experts, dense], -1) @ params["head"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train(mesh, num_steps=4):
  """Runs a jitted train step with in/out shardings and donated state."""
  tx = optimizers.create_optimizer(dict(
      name="adamw", learning_rate=0.05, weight_decay=0.01, grad_clip_norm=1.0,
      frozen_params=("Dense_0/bias",))).tx
  params = _params()
  param_shardings = partitioning.param_shardings(params, mesh, EXPERT_RULES)
  state = {"params": params, "opt": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state_shardings = partitioning.shardings_like_params(
      state, params, param_shardings, mesh)
  state = jax.jit(
      lambda p: {"params": p, "opt": tx.init(p), "step": jnp.int32(0)},
      out_shardings=state_shardings)(params)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(_loss)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt": opt, "step": state["step"] + 1}, loss

  step = jax.jit(train_step,
                 in_shardings=(state_shardings,
                               partitioning.batch_sharding(mesh)),
                 out_shardings=(state_shardings, partitioning.replicated(mesh)),
                 donate_argnums=0)
  rng = np.random.default_rng(1)
  batch = {"x": rng.normal(size=(16, 8)).astype(np.float32),
           "labels": rng.integers(0, 4, size=16).astype(np.int32)}
  losses = []
  for _ in range(num_steps):
    state, loss = step(state, partitioning.shard_batch(batch, mesh))
    losses.append(float(loss))
  return state, losses


def test_sharded_train_step_matches_single_device(eight_devices):
  sharded_state, sharded_losses = _train(partitioning.create_mesh(2))
  single_state, single_losses = _train(
      partitioning.create_mesh(1, devices=eight_devices[:1]))
  expert_kernel = sharded_state["params"]["Moe"]["Mlp"]["kernel"]
  assert expert_kernel.sharding.spec == P("expert")
  assert len(expert_kernel.sharding.device_set) == 8
  assert int(sharded_state["step"]) == 4
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               sharded_state, single_state)
  assert sharded_losses[-1] < sharded_losses[0]


def test_shard_batch_splits_leading_axis_over_all_devices(eight_devices):
  mesh = partitioning.create_mesh(4)
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  placed = partitioning.shard_batch(batch, mesh)["image"]
  assert placed.sharding.spec == P(("data", "expert"))
  assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(placed, batch["image"])
  with pytest.raises(ValueError, match=r"batch entry 'image' of shape \(12, 3\)"
                     r": the per-process batch size must be a multiple of the "
                     r"8 devices"):
    partitioning.shard_batch({"image": np.zeros((12, 3))}, mesh)


def test_abstract_arrays_carry_shardings(eight_devices):
  mesh = partitioning.create_mesh(2)
  shardings = partitioning.param_shardings(_params(), mesh, EXPERT_RULES)
  abstract = partitioning.abstract_arrays(_params(), shardings)
  kernel = abstract["Moe"]["Mlp"]["kernel"]
  assert isinstance(kernel, jax.ShapeDtypeStruct)
  assert kernel.shape == (4, 8, 16) and kernel.sharding.spec == P("expert")
