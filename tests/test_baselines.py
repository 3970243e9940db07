"""Tests for the baseline soft top-k operators in `moe.ops.baselines`."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.ops import baselines

# Jitted operators, shared by the tests so that each shape compiles once.
softmax_topk = jax.jit(baselines.softmax_topk,
                       static_argnames=("k", "axis", "renormalize"))
gumbel_topk = jax.jit(baselines.gumbel_topk,
                      static_argnames=("k", "temperature", "axis", "hard"))
entropic_topk = jax.jit(baselines.entropic_topk,
                        static_argnames=("k", "regularization", "num_iter",
                                         "axis"))
perturbed_topk = jax.jit(baselines.perturbed_topk,
                         static_argnames=("k", "num_samples", "sigma", "axis"))

# RBG keys compile far faster than the default threefry keys on CPU, which
# keeps the suite fast; `test_keyed_ops_accept_default_keys` covers threefry.
KEY = jax.random.key(0, impl="rbg")


def _random_scores(shape, seed=0) -> np.ndarray:
  """Float32 standard normal scores of `shape`, distinct with probability 1."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _numpy_topk_mask(x: np.ndarray, k: int) -> np.ndarray:
  """k-hot mask of the k largest entries of each last-axis row of `x`.

  Ties are broken by lower index (stable sort on the negated scores).
  """
  order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
  mask = np.zeros(x.shape, np.float64)
  np.put_along_axis(mask, order, 1.0, axis=-1)
  return mask


def _numpy_softmax(x: np.ndarray) -> np.ndarray:
  """Softmax of each last-axis row of `x`, in float64."""
  x = np.asarray(x, np.float64)
  shifted = np.exp(x - x.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


# softmax_topk


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_matches_numpy_reference(renormalize):
  x = _random_scores((4, 7))
  probs = _numpy_softmax(x)
  expected = probs * _numpy_topk_mask(x, 3)
  if renormalize:
    expected = expected / expected.sum(axis=-1, keepdims=True)
  out = softmax_topk(x, k=3, renormalize=renormalize)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.count_nonzero(np.asarray(out), axis=-1) == 3)


def test_softmax_topk_breaks_ties_by_lower_index():
  x = np.array([[0.0, 2.0, 1.0, 2.0, 2.0]], np.float32)
  out = np.asarray(softmax_topk(x, k=2))
  np.testing.assert_array_equal(out != 0, [[False, True, False, True, False]])


def test_softmax_topk_renormalized_gradient_ignores_dropped_logits():
  x = _random_scores((7,), seed=1)
  weights = np.arange(7, dtype=np.float32)
  kept = _numpy_topk_mask(x, 3).astype(bool)

  @functools.partial(jax.jit, static_argnums=1)
  @jax.grad
  def grad_fn(x, renormalize):
    return jnp.sum(weights * baselines.softmax_topk(x, 3,
                                                    renormalize=renormalize))

  grad_renorm = np.asarray(grad_fn(x, True))
  grad_plain = np.asarray(grad_fn(x, False))
  # Renormalised: softmax over the kept logits only.
  np.testing.assert_array_equal(grad_renorm[~kept], 0.0)
  assert np.all(grad_renorm[kept] != 0.0)
  # Not renormalised: dropped logits still move the softmax normaliser.
  assert np.all(grad_plain[~kept] != 0.0)


# gumbel_topk


def _numpy_relaxed_topk(logits: np.ndarray, k: int,
                        temperature: float) -> np.ndarray:
  """Xie & Ermon (2019) relaxed k-hot vector, written out in float64."""
  weights = np.asarray(logits, np.float64)
  onehot_approx = np.zeros_like(weights)
  khot = np.zeros_like(weights)
  for _ in range(k):
    weights = weights + np.log(np.maximum(1.0 - onehot_approx,
                                          np.finfo(np.float32).tiny))
    onehot_approx = _numpy_softmax(weights / temperature)
    khot += onehot_approx
  return khot


def test_gumbel_topk_without_noise_is_hard_topk_mask():
  x = _random_scores((3, 6))
  out = gumbel_topk(x, k=2, key=None)
  np.testing.assert_array_equal(out, _numpy_topk_mask(x, 2))


def test_gumbel_topk_hard_is_exact_khot_of_perturbed_logits():
  x = _random_scores((5, 6))
  gumbel = np.asarray(jax.random.gumbel(KEY, x.shape, jnp.float32))
  out = np.asarray(gumbel_topk(x, k=3, key=KEY))
  np.testing.assert_array_equal(out, _numpy_topk_mask(x + gumbel, 3))
  assert not np.array_equal(out, _numpy_topk_mask(x, 3))


def test_gumbel_topk_relaxed_matches_numpy_reference():
  x = _random_scores((5, 6))
  gumbel = np.asarray(jax.random.gumbel(KEY, x.shape, jnp.float32))
  out = gumbel_topk(x, k=3, key=KEY, temperature=2.0, hard=False)
  expected = _numpy_relaxed_topk(x + gumbel, 3, 2.0)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(out, axis=-1), 3.0, rtol=1e-5)


def test_gumbel_topk_relaxed_with_k_one_is_tempered_softmax():
  x = _random_scores((3, 6))
  out = gumbel_topk(x, k=1, key=None, temperature=0.5, hard=False)
  np.testing.assert_allclose(out, _numpy_softmax(x / 0.5), rtol=1e-5)


def test_gumbel_topk_straight_through_gradient_is_relaxed_gradient():
  x = _random_scores((3, 6))
  weights = _random_scores((3, 6), seed=2)

  def loss(x, hard):
    return jnp.sum(weights * baselines.gumbel_topk(x, 2, key=KEY, hard=hard))

  @jax.jit
  def hard_and_soft_grads(x):
    return jax.grad(loss)(x, True), jax.grad(loss)(x, False)

  grad_hard, grad_soft = map(np.asarray, hard_and_soft_grads(x))
  assert np.all(np.isfinite(grad_hard))
  assert np.abs(grad_hard).max() > 1e-3
  np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-6, atol=1e-7)


# entropic_topk


def _numpy_sinkhorn_topk(x: np.ndarray, k: int, regularization: float,
                         num_iter: int) -> np.ndarray:
  """Plain (kernel-domain) float64 Sinkhorn soft top-k of one row of `x`.

  Same problem as `entropic_topk`: scores rescaled to [0, 1] by min/max,
  anchors {0, 1}, marginals 1/n and ((n - k)/n, k/n), v = 1 at the start,
  `num_iter` (u, v) updates then a final u update; returns n * P[:, 1].
  """
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  unit = (x - x.min()) / (x.max() - x.min())
  cost = (unit[:, None] - np.array([0.0, 1.0])) ** 2
  kernel = np.exp(-cost / regularization)
  source = np.full(n, 1.0 / n)
  target = np.array([(n - k) / n, k / n])
  v = np.ones(2)
  for _ in range(num_iter):
    u = source / (kernel @ v)
    v = target / (kernel.T @ u)
  u = source / (kernel @ v)
  plan = u[:, None] * kernel * v[None, :]
  return n * plan[:, 1]


def test_entropic_topk_matches_numpy_sinkhorn_float32():
  x = _random_scores((3, 8))
  out = entropic_topk(x, k=3, regularization=0.1, num_iter=20)
  expected = np.stack([_numpy_sinkhorn_topk(row, 3, 0.1, 20) for row in x])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_entropic_topk_matches_numpy_sinkhorn_float64():
  x = _random_scores((2, 8)).astype(np.float64)
  with jax.enable_x64(True):
    out = entropic_topk(jnp.asarray(x), k=3, regularization=0.05,
                        num_iter=30)
    assert out.dtype == jnp.float64
  expected = np.stack([_numpy_sinkhorn_topk(row, 3, 0.05, 30) for row in x])
  np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_entropic_topk_sums_to_k_in_unit_interval():
  x = _random_scores((2, 3, 5), seed=8)
  out = np.asarray(entropic_topk(x, k=2))
  np.testing.assert_allclose(out.sum(axis=-1), 2.0, atol=1e-4)
  assert np.all((out >= 0.0) & (out <= 1.0))
  # Soft: strictly between the hard values somewhere in every row.
  assert np.all(np.any((out > 1e-3) & (out < 1 - 1e-3), axis=-1))


def test_entropic_topk_approaches_hard_mask_as_regularization_shrinks():
  x = np.random.default_rng(3).permutation(8).astype(np.float32)[None]
  hard = _numpy_topk_mask(x, 3)
  errors = [
      np.abs(np.asarray(entropic_topk(x, k=3, regularization=eps,
                                      num_iter=3000)) - hard).max()
      for eps in (0.1, 0.01)
  ]
  assert errors[0] > 0.1
  assert errors[1] < 5e-3


def test_entropic_topk_gradient_is_finite_and_preserves_sum():
  x = _random_scores((2, 8))
  weights = _random_scores((2, 8), seed=4)
  grad_fn = jax.jit(jax.grad(
      lambda x, w: jnp.sum(w * baselines.entropic_topk(x, 3))))
  grad = np.asarray(grad_fn(x, weights))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3
  # The sum along the axis is k for every x, so its gradient vanishes.
  grad_of_sum = np.asarray(grad_fn(x, np.ones_like(weights)))
  np.testing.assert_allclose(grad_of_sum, 0.0, atol=1e-3)


# perturbed_topk


def _numpy_perturbed(x: np.ndarray, noise: np.ndarray, k: int, sigma: float,
                     cotangent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Monte-Carlo forward and Berthet et al. (2020) VJP with given noise.

  Args:
    x: [..., n] scores.
    noise: [S, ..., n] Gaussian samples.
    k: the number of ones per hard mask.
    sigma: the noise scale.
    cotangent: [..., n] output cotangent g.

  Returns:
    The mean hard mask [..., n] and mean_s <g, mask_s> Z_s / sigma [..., n].
  """
  masks = _numpy_topk_mask(x + sigma * noise.astype(np.float64), k)
  inner = np.sum(cotangent * masks, axis=-1, keepdims=True)
  return masks.mean(axis=0), (inner * noise).mean(axis=0) / sigma


def test_perturbed_topk_forward_and_vjp_match_numpy_estimator():
  x = _random_scores((3, 6))
  cotangent = _random_scores((3, 6), seed=5)
  noise = np.asarray(jax.random.normal(KEY, (32, 3, 6), jnp.float32))

  @jax.jit
  def forward_and_vjp(x, cotangent):
    out, vjp_fn = jax.vjp(
        lambda x: baselines.perturbed_topk(x, 2, key=KEY, num_samples=32,
                                           sigma=0.5), x)
    return out, vjp_fn(cotangent)[0]

  out, grad = forward_and_vjp(x, cotangent)
  expected_out, expected_grad = _numpy_perturbed(x, noise, 2, 0.5, cotangent)
  np.testing.assert_allclose(out, expected_out, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_perturbed_topk_sums_to_k_in_unit_interval():
  x = _random_scores((2, 3, 5), seed=8)
  out = np.asarray(perturbed_topk(x, k=2, key=KEY, num_samples=8))
  np.testing.assert_allclose(out.sum(axis=-1), 2.0, atol=1e-6)
  assert np.all((out >= 0.0) & (out <= 1.0))
  np.testing.assert_allclose(out * 8, np.round(out * 8), atol=1e-5)
  assert np.any((out > 0.0) & (out < 1.0))


def test_perturbed_topk_gradient_loosely_matches_smoothed_expectation():
  # n = 2, k = 1: E[hardtopk(x + sigma Z)]_0 = Phi((x0 - x1) / (sigma sqrt 2)),
  # so its derivative has a closed form to compare the Monte-Carlo estimate to.
  sigma, num_samples = 0.5, 20000
  x = np.array([0.2, -0.1], np.float32)

  def smoothed_first(x0, x1):
    return 0.5 * (1.0 + math.erf((x0 - x1) / (sigma * math.sqrt(2.0)) /
                                 math.sqrt(2.0)))

  step = 1e-4
  fd_grad = (smoothed_first(x[0] + step, x[1]) -
             smoothed_first(x[0] - step, x[1])) / (2 * step)
  grad_fn = jax.jit(jax.grad(lambda x: baselines.perturbed_topk(
      x, 1, key=KEY, num_samples=num_samples, sigma=sigma)[0]))
  grad = np.asarray(grad_fn(x))
  # Monte-Carlo relative standard error is about 2%; allow 10%.
  np.testing.assert_allclose(grad, [fd_grad, -fd_grad], rtol=0.1)
  out = perturbed_topk(x, k=1, key=KEY, num_samples=num_samples, sigma=sigma)
  np.testing.assert_allclose(out[0], smoothed_first(x[0], x[1]), atol=0.02)


def test_perturbed_topk_jvp_is_transpose_of_vjp():
  x = _random_scores((2, 5))
  tangent = _random_scores((2, 5), seed=6)
  cotangent = _random_scores((2, 5), seed=7)

  def op(x):
    return baselines.perturbed_topk(x, 2, key=KEY, num_samples=16)

  @jax.jit
  def jvp_and_vjp(x, tangent, cotangent):
    _, jvp_out = jax.jvp(op, (x,), (tangent,))
    (vjp_out,) = jax.vjp(op, x)[1](cotangent)
    return jvp_out, vjp_out

  jvp_out, vjp_out = jvp_and_vjp(x, tangent, cotangent)
  np.testing.assert_allclose(np.sum(cotangent * jvp_out),
                             np.sum(vjp_out * tangent), rtol=1e-4)


def test_keyed_ops_accept_default_keys():
  x = _random_scores((2, 5))

  @jax.jit
  def both_ops(x, key):
    return (baselines.gumbel_topk(x, 2, key=key),
            baselines.perturbed_topk(x, 2, key=key, num_samples=4))

  gumbel_out, perturbed_out = both_ops(x, jax.random.key(1))
  np.testing.assert_array_equal(np.sum(gumbel_out, axis=-1), 2.0)
  np.testing.assert_allclose(np.sum(perturbed_out, axis=-1), 2.0, atol=1e-6)


# Shared conventions: leading shape, axis, vmap, dtype.

_DETERMINISTIC_OPS = {
    "softmax_topk": functools.partial(softmax_topk, renormalize=True),
    "gumbel_topk_no_key": functools.partial(gumbel_topk, key=None,
                                            hard=False),
    "entropic_topk": entropic_topk,
}

_KEYED_OPS = {
    "gumbel_topk": functools.partial(gumbel_topk, key=KEY),
    "perturbed_topk": functools.partial(perturbed_topk, key=KEY,
                                        num_samples=8),
}

_ALL_OPS = {**_DETERMINISTIC_OPS, **_KEYED_OPS}


@pytest.mark.parametrize("name", sorted(_ALL_OPS))
def test_axis_is_the_last_axis_moved(name):
  op = _ALL_OPS[name]
  x = _random_scores((2, 5, 3))
  out = np.asarray(op(x, k=2, axis=1))
  x_last = np.moveaxis(x, 1, -1)
  expected = np.moveaxis(np.asarray(op(x_last, k=2)), -1, 1)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  # The renormalised softmax gates sum to 1; the others sum to k.
  expected_sum = 1.0 if name == "softmax_topk" else 2.0
  np.testing.assert_allclose(out.sum(axis=1), expected_sum, atol=1e-3)


@pytest.mark.parametrize("name", sorted(_DETERMINISTIC_OPS))
def test_vmap_matches_batched_call(name):
  op = _DETERMINISTIC_OPS[name]
  x = _random_scores((2, 3, 5))
  batched = op(x, k=2)
  mapped = jax.vmap(lambda row: op(row, k=2))(x)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


_LOW_PRECISION_CASES = [(name, jnp.bfloat16) for name in sorted(_ALL_OPS)]
_LOW_PRECISION_CASES.append(("softmax_topk", jnp.float16))


@pytest.mark.parametrize("name, dtype", _LOW_PRECISION_CASES)
def test_low_precision_input_keeps_dtype(name, dtype):
  op = _ALL_OPS[name]
  x_low = jnp.asarray(_random_scores((2, 3, 5))).astype(dtype)
  out = op(x_low, k=2)
  assert out.dtype == dtype
  # Computed in float32, so only the final rounding differs.
  expected = op(x_low.astype(jnp.float32), k=2)
  np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2,
                             atol=1e-2)


def test_float64_stays_float64_with_x64():
  # entropic_topk in float64 is covered by its float64 Sinkhorn test.
  names = ("softmax_topk", "gumbel_topk", "perturbed_topk")

  @jax.jit
  def some_ops(x):
    return {name: _ALL_OPS[name](x, k=2) for name in names}

  with jax.enable_x64(True):
    outs = some_ops(jnp.asarray(_random_scores((2, 5)), jnp.float64))
  assert {name: out.dtype for name, out in outs.items()} == {
      name: jnp.float64 for name in names}


# Argument validation.

_X = np.zeros((2, 4), np.float32)

_BAD_CALLS = [
    ("softmax_topk", dict(x=np.zeros((2, 4), np.int32), k=1), "^x must"),
    ("softmax_topk", dict(x=np.float32(1.0), k=1), "^x must"),
    ("softmax_topk", dict(x=_X, k=0), "^k must"),
    ("softmax_topk", dict(x=_X, k=5), "^k must"),
    ("softmax_topk", dict(x=_X, k=2.0), "^k must"),
    ("softmax_topk", dict(x=_X, k=True), "^k must"),
    ("softmax_topk", dict(x=_X, k=1, axis=2), "^axis must"),
    ("softmax_topk", dict(x=_X, k=1, axis=0.0), "^axis must"),
    ("softmax_topk", dict(x=_X, k=1, renormalize="yes"), "^renormalize must"),
    ("gumbel_topk", dict(x=_X, k=0, key=None), "^k must"),
    ("gumbel_topk", dict(x=_X, k=1, key=None, temperature=0.0),
     "^temperature must"),
    ("gumbel_topk", dict(x=_X, k=1, key=None, temperature=-1.0),
     "^temperature must"),
    ("gumbel_topk", dict(x=_X, k=1, key=None, hard=1), "^hard must"),
    ("entropic_topk", dict(x=_X, k=5), "^k must"),
    ("entropic_topk", dict(x=_X, k=1, regularization=0.0),
     "^regularization must"),
    ("entropic_topk", dict(x=_X, k=1, num_iter=0), "^num_iter must"),
    ("entropic_topk", dict(x=_X, k=1, num_iter=2.5), "^num_iter must"),
    ("perturbed_topk", dict(x=_X, k=1, key=None), "^key must"),
    ("perturbed_topk", dict(x=_X, k=1, key=KEY, sigma=0.0), "^sigma must"),
    ("perturbed_topk", dict(x=_X, k=1, key=KEY, num_samples=0),
     "^num_samples must"),
    ("perturbed_topk", dict(x=_X.astype(np.int32), k=1, key=KEY), "^x must"),
]


@pytest.mark.parametrize("name, kwargs, match", _BAD_CALLS)
def test_bad_arguments_raise_value_error_naming_them(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    getattr(baselines, name)(**kwargs)
