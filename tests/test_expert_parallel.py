"""Expert parallelism and the dropless dispatcher (docs/design.md §5)."""
import functools
import json
import os
import subprocess
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from moe import ops
from moe.nn import moe_layer
from moe.parallel import hlo
from moe.parallel import partitioning
from moe.train import trainer
import nn_test_util
import topk_reference
import train_testing

ROUTER_NAMES = ("NoisyTopExpertsPerItem", "TopItemsPerExpert", "SparseTopK")
# Routers compiled with the einsum dispatcher only: SoftMoE has no other;
# SparseTopItemsPerExpert shares TopItemsPerExpert's index path.
EINSUM_ROUTERS = ("SparseTopItemsPerExpert", "SoftMoE")
BUFFER_DISPATCHERS = ("einsum", "index")
HERE = os.path.dirname(os.path.abspath(__file__))
jit = nn_test_util.jit


@functools.cache
def _programs(cases):
  """Runs tests/expert_parallel_programs.py on `cases`, XLA's log on."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
      [sys.executable, os.path.join(HERE, "expert_parallel_programs.py"),
       *cases], env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()
             if line.startswith("{")]
  return {record["case"]: record for record in records}


def _full_expert_gathers(record):
  gathered = {shape for shapes in record["all_gathers"] for shape in shapes}
  return gathered & set(record["expert_param_shapes"])


CONTROL = "4:einsum:SparseTopK:unpinned"
RAGGED = ("1:ragged:SparseTopK", "1:ragged:NoisyTopExpertsPerItem")


def _cases(expert):
  """Every router and buffer dispatcher, plus CONTROL or RAGGED.

  EINSUM_ROUTERS go with expert = 4; RAGGED cases run data parallel on 8
  devices; they go with expert = 8.
  """
  cases = tuple(f"{expert}:{dispatcher}:{router}"
                for dispatcher in BUFFER_DISPATCHERS
                for router in ROUTER_NAMES)
  einsum_only = tuple(f"4:einsum:{router}" for router in EINSUM_ROUTERS)
  return cases + {4: (CONTROL, *einsum_only), 8: RAGGED}.get(expert, ())


# expert = 2 adds nothing that 4 does not check and costs a minute of CI.
@pytest.mark.parametrize("expert", (4, 8))
def test_compiled_train_step_moves_tokens_not_experts(expert):
  records = _programs(_cases(expert))
  assert sorted(records) == sorted(_cases(expert))
  for case, record in records.items():
    if case == CONTROL:
      continue
    if case in RAGGED:   # Each device runs its own tokens: no exchange.
      assert record["summary"]["all-to-all"][0] == 0, case
      assert record["remat_log"] == [], (case, record["remat_log"])
      assert not record["all_gathers"], case
      continue
    # One all-to-all into the experts and one out, per MoE layer, forward
    # and backward.
    assert record["summary"]["all-to-all"][0] == 4 * record["moe_layers"], (
        case, record["summary"])
    assert not _full_expert_gathers(record), (case, record["all_gathers"])
    assert record["remat_log"] == [], (case, record["remat_log"])


def test_without_the_axes_xla_gathers_every_expert():
  """The control: the same layer without its sharding constraints."""
  record = _programs(_cases(4))[CONTROL]
  assert _full_expert_gathers(record), record


def _mesh(expert):
  return partitioning.create_mesh(expert)


def _layer(router, dispatcher, num_selected=2, pinned=True, group_size=None,
           **router_fields):
  fields = {"name": router, "capacity_factor": 1.0, **router_fields}
  if router.startswith("Sparse"):
    # Float noise of sharded reductions must not move gates across the
    # dispatch threshold; gates with p = 4/3 pile up just above 0.
    fields.setdefault("min_gate", 1e-3)
  if router in ("NoisyTopExpertsPerItem", "SparseTopK"):
    fields.setdefault("noise_std", 1.0)
  axes = {}
  if pinned:
    axes = dict(group_axes=partitioning.MOE_GROUP_AXES,
                expert_axes=partitioning.MOE_EXPERT_AXES)
  return moe_layer.MoeMlpBlock(
      num_experts=8, num_selected_experts=num_selected, mlp_dim=8,
      dispatcher=dispatcher, router=fields, group_size=group_size, **axes)


X = nn_test_util.normal(1, 16, 4, 6)
PROBE = nn_test_util.normal(2, 16, 4, 6)
PARAMS = nn_test_util.random_params(_layer("SparseTopK", "einsum"), X)


def _combos(expert):
  if expert == 1:
    return [(router, "ragged") for router in ROUTER_NAMES
            if router != "TopItemsPerExpert"]
  # SoftMoE has other parameters than PARAMS; test_nn_moe_layer shards it.
  return ([(router, kind) for router in ROUTER_NAMES
           for kind in BUFFER_DISPATCHERS] +
          [("SparseTopItemsPerExpert", "einsum")])


def _value_and_grads(combos):
  def run(params, x):
    results = {}
    for router, kind in combos:
      layer = _layer(router, kind)

      def loss(params, x, layer=layer):
        y, metrics = layer.apply({"params": params}, x, train=True,
                                 rngs={"gating": jax.random.key(3)})
        return jnp.sum(y * PROBE) + metrics["auxiliary_loss"], (y, metrics)

      grads, (y, metrics) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
          params, x)
      results[router, kind] = (y, metrics, grads)
    return results
  return run


@functools.cache
def _unsharded(combos):
  return jax.device_get(jit(_value_and_grads(combos))(PARAMS, X))


@pytest.mark.parametrize("expert", (1, 2, 4, 8))
def test_sharded_layer_equals_unsharded_forward_and_backward(expert):
  mesh = _mesh(expert)
  shardings = partitioning.param_shardings(
      PARAMS, mesh, ((r"Experts/.*", ("expert",)),))
  batch = partitioning.batch_sharding(mesh)
  step = partitioning.jit_on_mesh(
      _value_and_grads(_combos(expert)), mesh, in_shardings=(shardings, batch),
      compiler_options={"xla_backend_optimization_level": 0})
  sharded = step(jax.device_put(PARAMS, shardings), jax.device_put(X, batch))
  expected = _unsharded(tuple(_combos(expert)))
  for combo in _combos(expert):
    y = sharded[combo][0]
    assert y.sharding.is_equivalent_to(batch, y.ndim), combo
    for a, b in zip(jax.tree.leaves(sharded[combo]),
                    jax.tree.leaves(expected[combo])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=combo)
    assert expected[combo][1]["experts_per_token"] > 1, combo


# The dropless dispatcher against a brute-force per-token reference.

def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference_weights(router, num_selected, logits):
  """`[T, E]` combine weights: the gate where dispatched, else 0 (numpy)."""
  if router == "SparseTopK":
    gates = np.stack([topk_reference.topk_mask(row, num_selected, 0.5, 4 / 3)
                      for row in logits])
  else:
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
  chosen = np.argsort(-gates, axis=-1, kind="stable")[:, :num_selected]
  mask = np.zeros_like(gates, dtype=bool)
  np.put_along_axis(mask, chosen, True, axis=-1)
  return np.where(mask & (gates > 0), gates, 0.), mask & (gates > 0)


def _reference_outputs(params, x, weights):
  """y_t = sum_e w_te MLP_e(x_t), float64, expert by expert."""
  experts = {k: np.asarray(v, np.float64) for k, v in {
      "w0": params["Experts"]["Dense_0"]["kernel"],
      "b0": params["Experts"]["Dense_0"]["bias"],
      "w1": params["Experts"]["Dense_1"]["kernel"],
      "b1": params["Experts"]["Dense_1"]["bias"]}.items()}
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  y = np.zeros_like(tokens)
  for t, token in enumerate(tokens):
    for e in np.flatnonzero(weights[t]):
      hidden = _gelu(token @ experts["w0"][e] + experts["b0"][e])
      y[t] += weights[t, e] * (hidden @ experts["w1"][e] + experts["b1"][e])
  return y.reshape(x.shape)


def _brute_force_loss(router, num_selected, mask, params, x):
  """The reference in jnp with the dispatch decisions fixed, for gradients."""
  tokens = x.reshape(-1, x.shape[-1])
  logits = tokens @ params["Router"]["dense"]["kernel"]
  if router == "SparseTopK":
    gates = ops.topk_mask(logits, num_selected, regularization=0.5)
  else:
    gates = jax.nn.softmax(logits)
  experts = params["Experts"]
  hidden = jax.nn.gelu(jnp.einsum("TD,EDH->ETH", tokens,
                                  experts["Dense_0"]["kernel"]) +
                       experts["Dense_0"]["bias"][:, None])
  out = (jnp.einsum("ETH,EHD->ETD", hidden, experts["Dense_1"]["kernel"]) +
         experts["Dense_1"]["bias"][:, None])
  y = jnp.einsum("TE,ETD->TD", jnp.where(mask, gates, 0.), out)
  return jnp.sum(y.reshape(x.shape) * PROBE[:2])


RAGGED_CASES = (("NoisyTopExpertsPerItem", 1), ("NoisyTopExpertsPerItem", 2),
                ("SparseTopK", 2))


@pytest.mark.parametrize("router,num_selected", RAGGED_CASES)
def test_ragged_equals_brute_force_reference(router, num_selected):
  fields = {"noise_std": 0.0}
  if router == "SparseTopK":
    fields.update(min_gate=0.0, regularization=0.5)
  layer = _layer(router, "ragged", num_selected, pinned=False, **fields)
  x = X[:2]
  params = nn_test_util.random_params(layer, x, scale=0.8)
  logits = (np.asarray(x, np.float64).reshape(-1, 6) @
            np.asarray(params["Router"]["dense"]["kernel"], np.float64))
  weights, mask = _reference_weights(router, num_selected, logits)

  def loss(params, x):
    y, metrics = layer.apply({"params": params}, x)
    return jnp.sum(y * PROBE[:2]), (y, metrics)

  grads, (y, metrics) = jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
      params, x)
  np.testing.assert_allclose(y, _reference_outputs(params, x, weights),
                             rtol=1e-5, atol=1e-5)
  assert float(metrics["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(metrics["experts_per_token"], mask.sum(-1).mean())
  if router == "SparseTopK":   # Partial gates: supports larger than K.
    assert np.any((weights > 0) & (weights < 1))
    assert metrics["support_size"] > num_selected
  expected = jit(jax.grad(functools.partial(
      _brute_force_loss, router, num_selected, mask), argnums=(0, 1)))(
          params, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert np.abs(grads[0]["Router"]["dense"]["kernel"]).max() > 0


def test_ragged_expert_gradients_match_finite_differences():
  layer = _layer("NoisyTopExpertsPerItem", "ragged", pinned=False,
                 noise_std=0.0)
  x = X[:1]
  params = nn_test_util.random_params(layer, x, scale=0.8)

  def loss(experts):
    y, _ = layer.apply({"params": {**params, "Experts": experts}}, x)
    return jnp.sum(y * PROBE[:1])

  check_grads(jax.jit(loss), (params["Experts"],), order=1,
                modes=("rev",), atol=2e-2, rtol=2e-2)


def test_ragged_dropout_is_drawn_from_the_dropout_rng():
  layer = moe_layer.MoeMlpBlock(num_experts=8, num_selected_experts=2,
                                mlp_dim=8, dispatcher="ragged",
                                dropout_rate=0.5)
  params = nn_test_util.random_params(layer, X)
  apply = jit(functools.partial(layer.apply, train=True))

  def run(key):
    return apply({"params": params}, X, rngs={"dropout": key,
                                              "gating": jax.random.key(0)})[0]
  first, again, other = (run(jax.random.key(1)), run(jax.random.key(1)),
                         run(jax.random.key(2)))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  clean = jit(layer.apply)({"params": params}, X)[0]
  assert np.abs(first - clean).max() > 1e-3


def test_ragged_drops_nothing_where_buffers_drop():
  layer = functools.partial(_layer, "SparseTopK", pinned=False,
                            group_size=16, noise_std=0.0, capacity_factor=0.5)
  params = nn_test_util.random_params(layer("einsum"), X)
  _, buffered = jit(layer("einsum").apply)({"params": params}, X)
  _, ragged = jit(layer("ragged").apply)({"params": params}, X)
  assert buffered["dropped_fraction"] > 0.1
  assert ragged["dropped_fraction"] == 0
  # Every token's K = 2 choices are served: 2 S per group, S = 16.
  assert ragged["experts_per_token"] == 2
  assert np.sum(ragged["tokens_per_expert"]) == 2 * 16


def test_ragged_errors_name_the_limitation(tmp_path):
  with pytest.raises(ValueError, match="TopItemsPerExpert fills each "
                     "expert's C slots"):
    jax.eval_shape(_layer("TopItemsPerExpert", "ragged").init,
                   jax.random.key(0), X)
  config = train_testing.load_config(
      "digits_vmoe.py:runlocal", "--config.mesh.expert=2",
      "--config.model.encoder.moe.dispatcher=ragged")
  batch = {"image": jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32),
           "labels": jax.ShapeDtypeStruct((64, 10), jnp.float32)}
  with pytest.raises(ValueError, match=r"dispatcher='ragged' runs every "
                     r"expert on every device.*expert_axes=\('expert',\) "
                     r"\(size 2\).*or config.mesh.expert=1"):
    trainer.create_layout(config, batch)


@pytest.mark.parametrize("fields,match", [
    ({"group_axes": "data"}, "group_axes must be a tuple of distinct mesh"),
    ({"expert_axes": ("expert", "expert")}, "expert_axes must be a tuple"),
])
def test_bad_axes_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    moe_layer.MoeMlpBlock(num_experts=4, num_selected_experts=1, mlp_dim=8,
                          **fields)


def test_axes_missing_from_the_mesh_raise():
  layer = moe_layer.MoeMlpBlock(num_experts=8, num_selected_experts=1,
                                mlp_dim=8, group_axes=("data", "model"))
  init = partitioning.jit_on_mesh(layer.init, _mesh(2))
  with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not axes "
                     r"of the context mesh"):
    init(jax.random.key(0), X)


def test_top_k_by_sort_equals_lax_top_k_with_ties():
  x = jnp.asarray(np.random.default_rng(0).integers(0, 4, (50, 9)),
                  jnp.float32)
  for k in (1, 3, 9):
    for a, b in zip(ops.top_k_by_sort(x, k), jax.lax.top_k(x, k)):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype


HLO_SNIPPET = """
  %all-to-all.3 = (f32[1,2,5]{2,1,0}, f32[1,2,5]{2,1,0}) all-to-all(%a, %b)
  %all-gather-start = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%c)
  %all-gather-done = bf16[16,8]{1,0} all-gather-done(%all-gather-start)
  ROOT %all-reduce.1 = f32[] all-reduce(%d), to_apply=%add
"""


def test_hlo_collectives_parse_kinds_shapes_and_bytes():
  found = hlo.collectives(HLO_SNIPPET)
  assert [(op.kind, op.shapes, op.bytes) for op in found] == [
      ("all-to-all", ("f32[1,2,5]", "f32[1,2,5]"), 80),
      ("all-gather", ("bf16[16,8]",), 256),
      ("all-reduce", ("f32[]",), 4)]
  assert hlo.summarize(found)["all-to-all"] == (1, 80)
  assert hlo.shape_text(jnp.bfloat16, (8, 64, 128)) == "bf16[8,64,128]"
  mesh = _mesh(2)
  sharded = jax.device_put(jnp.zeros((8, 4)), partitioning.batch_sharding(mesh))
  gather = jax.jit(lambda x: x * 2,
                   out_shardings=NamedSharding(mesh, P()))
  text = gather.lower(sharded).compile().as_text()
  assert [(op.kind, op.bytes) for op in hlo.collectives(text)] == [
      ("all-gather", 128)]
