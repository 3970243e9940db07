"""Tests of moe.nn.attention: the four edge sparsities of SelfAttention."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from moe import ops
from moe.nn import attention
import nn_test_util as util
import topk_reference as ref

B, L, D, H = 2, 6, 8, 2
x64 = functools.partial(jax.enable_x64, True)


def _module(**fields):
  return attention.SelfAttention(num_heads=H, **fields)


def _params(module, x=None, scale=0.5):
  x = util.normal(0, B, L, D) if x is None else x
  return util.random_params(module, x, scale=scale)


def _weights(module, params, x, **kwargs):
  """(y, metrics, attention weights [B, H, L, L]) as numpy."""
  (y, metrics), state = module.apply({"params": params}, x,
                                     mutable=["intermediates"], **kwargs)
  w = state["intermediates"]["attention_weights"][0]
  return y, metrics, np.asarray(w)


def _numpy_scores(params, x):
  """s = q k^T / sqrt(D/H) `[B, H, L, L]` from the module's parameters."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64)
  proj = {name: np.einsum("bld,dhe->blhe", x, p[name]["kernel"])
          + p[name]["bias"] for name in ("query", "key", "value")}
  s = np.einsum("bqhe,bkhe->bhqk", proj["query"], proj["key"])
  return s / np.sqrt(D // H), proj["value"]


def _numpy_dense(params, x, causal):
  s, v = _numpy_scores(params, x)
  if causal:
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhe->bqhe", w, v)
  p = jax.tree.map(np.asarray, params)
  return np.einsum("bqhe,hed->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_dense_equals_flax_multi_head_attention():
  x = util.normal(1, B, L, D)
  module = _module()
  params = _params(module)
  flax_y = nn.MultiHeadDotProductAttention(num_heads=H).apply(
      {"params": params}, x, x)
  y, metrics = module.apply({"params": params}, x)
  np.testing.assert_allclose(y, flax_y, atol=1e-6)
  np.testing.assert_allclose(y, _numpy_dense(params, x, False), atol=1e-5)
  np.testing.assert_array_equal(metrics["edge_fraction"], np.ones(H))
  assert float(metrics["allowed_edges"]) == L * L


def test_parameters_are_those_of_flax_and_gates_only_when_gated():
  x = util.normal(1, B, L, D)
  flax_shapes = jax.eval_shape(nn.MultiHeadDotProductAttention(
      num_heads=H).init, jax.random.key(0), x, x)["params"]
  for sparsity in attention.SPARSITIES:
    shapes = jax.eval_shape(_module(sparsity=sparsity).init,
                            jax.random.key(0), x)["params"]
    extra = set(shapes) - set(flax_shapes)
    assert extra == ({"gate_scale", "gate_bias"} if sparsity == "gated"
                     else set()), sparsity
    assert jax.tree.map(lambda a: a.shape, {k: shapes[k] for k in flax_shapes}
                        ) == jax.tree.map(lambda a: a.shape, flax_shapes)


def test_causal_dense_matches_numpy():
  x = util.normal(2, B, L, D)
  module = _module(causal=True)
  params = _params(module)
  y, metrics, w = _weights(module, params, x)
  np.testing.assert_allclose(y, _numpy_dense(params, x, True), atol=1e-5)
  assert not np.any(np.triu(w, 1))
  assert float(metrics["allowed_edges"]) == L * (L + 1) / 2


def _check_support(w, k, causal, exact_size):
  allowed = np.tril(np.ones((L, L), bool)) if causal else np.ones((L, L), bool)
  assert np.all(w[..., ~allowed] == 0.0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  size = (w != 0).sum(-1)
  bound = np.minimum(k, allowed.sum(-1))
  if exact_size:
    np.testing.assert_array_equal(size, np.broadcast_to(bound, size.shape))
  else:
    assert np.all(size >= bound)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparsity", ["sparse_topk", "hard_topk"])
def test_topk_weights_are_exactly_sparse_and_sum_to_one(sparsity, causal):
  k = 2
  x = util.normal(3, B, L, D)
  module = _module(sparsity=sparsity, causal=causal, keys_per_query=k)
  params = _params(module, scale=1.0)
  _, metrics, w = _weights(module, params, x)
  # The soft mask sums to k over a support of at least k keys (its partial
  # entries); the hard mask keeps exactly min(k, allowed) keys.
  _check_support(w, k, causal, exact_size=sparsity == "hard_topk")
  active = (w != 0).sum((-2, -1)).mean(0)
  np.testing.assert_allclose(metrics["expected_edges"], active)
  np.testing.assert_allclose(metrics["edge_fraction"],
                             active / float(metrics["allowed_edges"]))


def test_sparse_topk_with_small_regularization_keeps_k_keys():
  x = util.normal(4, B, L, D)
  module = _module(sparsity="sparse_topk", causal=True, keys_per_query=3,
                   regularization=1e-4)
  _, _, w = _weights(module, _params(module, scale=1.0), x)
  _check_support(w, 3, True, exact_size=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparsity", ["sparse_topk", "hard_topk"])
def test_topk_with_k_at_least_the_allowed_keys_is_dense(sparsity, causal):
  x = util.normal(5, B, L, D)
  dense = _module(causal=causal)
  params = _params(dense)
  expected = dense.apply({"params": params}, x)[0]
  for k in (L, L + 3):
    y = _module(sparsity=sparsity, causal=causal, keys_per_query=k).apply(
        {"params": params}, x)[0]
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_sparse_topk_causal_rows_with_few_keys_match_dense():
  x = util.normal(6, B, L, D)
  k = 3
  params = _params(_module())
  _, _, w_dense = _weights(_module(causal=True), params, x)
  _, _, w = _weights(_module(sparsity="sparse_topk", causal=True,
                             keys_per_query=k), params, x)
  np.testing.assert_allclose(w[:, :, :k], w_dense[:, :, :k], atol=1e-6)


def test_sparse_topk_causal_query_blocks_match_per_row_solves():
  length, k = 13, 2
  assert len(attention.query_blocks(length, True, k)) == 4
  s = np.asarray(util.normal(14, 3, length, length))
  mask = np.asarray(attention.sparse_topk_support(jnp.asarray(s), k, 0.3,
                                                  4 / 3, True))
  for b in range(s.shape[0]):
    for i in range(length):
      expected = np.ones(i + 1) if i + 1 <= k else ref.topk_mask(
          s[b, i, :i + 1], k, 0.3, 4 / 3)
      np.testing.assert_allclose(mask[b, i, :i + 1], expected, atol=1e-5)
      assert np.all(mask[b, i, i + 1:] == 0)


def test_sparse_topk_causal_query_blocks_gradient_is_the_per_row_one():
  # Thresholds solved per query block, the mask differentiated on full rows:
  # the same vector-Jacobian product as `topk_mask` of each row's allowed
  # keys, nothing to the disallowed ones; and check_grads.
  length, k, l = 13, 2, 0.3
  with x64():
    s = jnp.asarray(util.normal(15, 2, length, length), jnp.float64)
    cotangent = np.asarray(util.normal(16, 2, length, length))
    support = lambda s: attention.sparse_topk_support(s, k, l, 4 / 3, True)
    grad = np.asarray(jax.grad(lambda s: jnp.sum(
        support(s) * cotangent))(s))
    for b in range(s.shape[0]):
      for i in range(length):
        expected = np.zeros(i + 1) if i + 1 <= k else jax.grad(
            lambda row: jnp.sum(ops.topk_mask(row, k, regularization=l,
                                              p=4 / 3)
                                * cotangent[b, i, :i + 1]))(s[b, i, :i + 1])
        np.testing.assert_allclose(grad[b, i, :i + 1], expected, atol=1e-9)
        assert np.all(grad[b, i, i + 1:] == 0)
    check_grads(support, (s,), order=1, modes=("fwd", "rev"), eps=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_topk_gradients_check_grads(causal):
  with x64():
    x = jnp.asarray(util.normal(7, 1, 5, 4), jnp.float64)
    module = attention.SelfAttention(num_heads=2, sparsity="sparse_topk",
                                     causal=causal, keys_per_query=2,
                                     regularization=0.5, dtype=jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                          util.random_params(module, x, scale=1.0))
    fn = lambda p, x: module.apply({"params": p}, x)[0]
    check_grads(fn, (params, x), order=1, modes=("fwd", "rev"), atol=1e-5,
                rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(fn(p, x) ** 2))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_hard_topk_gradient_is_the_dense_one():
  x = util.normal(8, B, L, D)
  params = _params(_module())
  loss = lambda module: jax.grad(lambda p: jnp.sum(module.apply(
      {"params": p}, x)[0] * x))(params)
  hard, dense = loss(_module(sparsity="hard_topk", keys_per_query=2)), loss(
      _module())
  # Straight-through: the backward pass is that of the dense weights, except
  # for the value and output projections, which see the hard weights.
  np.testing.assert_allclose(hard["query"]["kernel"], dense["query"]["kernel"],
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(hard["key"]["kernel"]))


def _gated(**fields):
  return _module(sparsity="gated", causal=True, **fields)


def _gated_params(module, scale=1.0, bias=0.3):
  params = _params(module)
  return {**params, "gate_scale": jnp.full((H,), scale),
          "gate_bias": jnp.asarray([bias, -bias])}


def _numpy_gate_prob(params, x):
  s, _ = _numpy_scores(params, x)
  g = (np.asarray(params["gate_scale"])[:, None, None] * s
       + np.asarray(params["gate_bias"])[:, None, None])
  return 1.0 / (1.0 + np.exp(-g))


def test_gated_expected_edges_equal_numpy():
  x = util.normal(9, B, L, D)
  module = _gated()
  params = _gated_params(module)
  _, metrics = module.apply({"params": params}, x)
  prob = _numpy_gate_prob(params, x)
  causal = np.tril(np.ones((L, L), bool))
  expected = np.where(causal, prob, 0.0).sum((-2, -1)).mean(0)
  np.testing.assert_allclose(metrics["expected_edges"], expected, rtol=1e-5)
  _, train_metrics = module.apply({"params": params}, x, train=True,
                                  rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(train_metrics["expected_edges"], expected,
                             rtol=1e-5)


@pytest.mark.parametrize("estimator", ["straight_through", "relaxed"])
def test_gradient_reaches_the_gate_parameters(estimator):
  x = util.normal(10, B, L, D)
  module = _gated(gate_estimator=estimator)
  params = _gated_params(module)

  def loss(p):
    y, metrics = module.apply({"params": p}, x, train=True,
                              rngs={"dropout": jax.random.key(1)})
    return jnp.sum(y * x) + jnp.sum(metrics["expected_edges"])
  grads = jax.grad(loss)(params)
  for name in ("gate_scale", "gate_bias"):
    assert np.all(np.isfinite(grads[name])) and np.all(grads[name] != 0)


def test_sampled_gates_are_binary_with_frequency_sigmoid():
  x = util.normal(11, 1, L, D)
  module = _module(sparsity="gated")
  params = _gated_params(module, scale=0.5, bias=0.5)
  prob = jax.nn.sigmoid(jnp.asarray(_numpy_gate_prob(params, x)))
  logits = jnp.log(prob) - jnp.log1p(-prob)
  draws = 2000
  gates = jax.vmap(lambda key: attention.sample_gates(
      logits, key, "straight_through", 0.5))(
          jax.random.split(jax.random.key(2), draws))
  assert set(np.unique(gates)) <= {0.0, 1.0}
  # Binomial standard error is at most 0.5 / sqrt(2000) ~ 0.011.
  np.testing.assert_allclose(gates.mean(0), prob, atol=0.06)


def test_gated_train_weights_follow_the_gates_and_eval_is_deterministic():
  x = util.normal(12, B, L, D)
  module = _gated()
  params = _gated_params(module, scale=1.0, bias=0.0)
  _, _, w = _weights(module, params, x, train=True,
                     rngs={"dropout": jax.random.key(3)})
  sums = w.sum(-1)
  assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
  assert not np.any(np.triu(w, 1))
  y0, m0, w0 = _weights(module, params, x)
  y1, _, w1 = _weights(module, params, x)
  np.testing.assert_array_equal(w0, w1)
  np.testing.assert_array_equal(y0, y1)
  open_gates = _numpy_gate_prob(params, x) > 0.5
  causal = np.tril(np.ones((L, L), bool))
  np.testing.assert_array_equal(w0 != 0, open_gates & causal)
  np.testing.assert_allclose(
      m0["edge_fraction"],
      (open_gates & causal).sum((-2, -1)).mean(0) / causal.sum())


def test_gated_rows_with_all_gates_closed_are_zero_not_nan():
  x = util.normal(13, B, L, D)
  module = _gated()
  params = {**_params(module), "gate_scale": jnp.zeros(H),
            "gate_bias": jnp.full((H,), -5.0)}
  y, metrics, w = _weights(module, params, x)
  assert np.all(w == 0) and np.all(np.isfinite(y))
  np.testing.assert_allclose(y, np.broadcast_to(params["out"]["bias"],
                                                y.shape), atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(module.apply(
      {"params": p}, x, train=True, rngs={"dropout": jax.random.key(4)})[0]))(
          params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(metrics["edge_fraction"], np.zeros(H))


@pytest.mark.parametrize("field, value, message", [
    ("sparsity", "topk", "sparsity must be one of 'dense', 'gated'"),
    ("keys_per_query", 0, "keys_per_query must be an int >= 1"),
    ("regularization", 0.0, "regularization must be a finite number > 0"),
    ("p", 1.0, "p must be a finite number > 1"),
    ("gate_estimator", "gumbel",
     "gate_estimator must be one of 'straight_through', 'relaxed'"),
    ("gate_temperature", -1.0, "gate_temperature must be a finite number > 0"),
    ("dropout_rate", 1.0, r"dropout_rate must be in \[0, 1\)"),
])
def test_bad_config_values_raise(field, value, message):
  with pytest.raises(ValueError, match=message):
    _module(**{field: value})


def test_width_not_divisible_by_heads_raises():
  with pytest.raises(ValueError, match="num_heads=3"):
    attention.SelfAttention(num_heads=3).init(jax.random.key(0),
                                              jnp.ones((1, 2, 8)))


@functools.lru_cache(maxsize=None)
def _jitted_support(length, k):
  """The causal sparse_topk weights of `[2, L, L]` logits, compiled once."""
  allowed = attention.allowed_edges(length, True)

  def weights(s):
    mask = attention.sparse_topk_support(s, k, 0.1, 4 / 3, True)
    return mask, attention.renormalised_softmax(s, mask, allowed)
  return jax.jit(weights)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), log_scale=st.floats(-3.0, 3.0))
def test_sparse_topk_weights_property(seed, log_scale):
  # Logits from 1e-3 (all ties within λ) to 1e3 (far apart) on 4 causal
  # query blocks: the mask sums to min(k, allowed), the weights to 1.
  length, k = 13, 3
  s = util.normal(seed, 2, length, length, scale=10.0 ** log_scale)
  mask, w = map(np.asarray, _jitted_support(length, k)(s))
  causal = np.tril(np.ones((length, length), bool))
  expected = np.minimum(k, np.arange(1, length + 1))
  np.testing.assert_allclose(mask.sum(-1), np.broadcast_to(
      expected, mask.shape[:-1]), atol=1e-4)
  assert np.all(mask[:, ~causal] == 0) and np.all(w[:, ~causal] == 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def _vit(attention_config):
  from moe.nn import vit  # pylint: disable=g-import-not-at-top
  encoder = {} if attention_config is None else {"attention": attention_config}
  return vit.create_model({"variant": "mu/4", "num_classes": 3,
                           "encoder": encoder})


def test_vit_attention_config_keeps_parameters_and_outputs():
  images = util.normal(15, 2, 8, 8, 3)
  base = _vit(None)
  params = util.random_params(base, images)
  logits, metrics = base.apply({"params": params}, images)
  dense = _vit({"sparsity": "dense"})
  shapes = jax.eval_shape(dense.init, jax.random.key(0), images)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  dense_logits, dense_metrics = dense.apply({"params": params}, images)
  np.testing.assert_allclose(dense_logits, logits, atol=1e-6)
  assert set(dense_metrics) - set(metrics) == {
      f"encoderblock_0/attention/{name}"
      for name in ("edge_fraction", "expected_edges", "allowed_edges")}
  gated = _vit({"sparsity": "gated", "causal": True})
  gated_params = util.random_params(gated, images)
  block = gated_params["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]
  assert {"gate_scale", "gate_bias"} <= set(block)
  _, gated_metrics = gated.apply({"params": gated_params}, images, train=True,
                                 rngs={"dropout": jax.random.key(5)})
  tokens = 1 + (8 // 4) ** 2
  assert float(gated_metrics["encoderblock_0/attention/allowed_edges"]) == (
      tokens * (tokens + 1) / 2)
  assert gated_metrics["encoderblock_0/attention/expected_edges"].shape == (2,)


def test_vit_attention_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match="config.model.encoder.attention"):
    _vit({"sparsty": "gated"})
