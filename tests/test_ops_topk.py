"""Tests of moe.ops: values against the numpy PAV reference, derivatives,
properties, sharding and argument errors."""
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from moe import ops
from moe.ops import threshold
from moe.ops import topk
import topk_reference as ref

P_VALUES = (4 / 3, 1.5, 2.0, 3.0)
x64 = functools.partial(jax.enable_x64, True)


def _rows(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


# ---------------------------------------------------------------- values ----

@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("seed", range(3))
def test_mask_matches_pav_reference(p, seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 12))
  k = int(rng.integers(1, n))
  l = float(rng.choice([0.05, 0.3, 1.0, 3.0]))
  x = rng.normal(size=(4, n)) * rng.choice([0.5, 2.0])
  with x64():
    y = np.asarray(ops.topk_mask(jnp.asarray(x), k, regularization=l, p=p))
  expected = np.stack([ref.topk_mask(row, k, l, p) for row in x])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(y.sum(-1), k, atol=1e-9)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("seed", range(3))
def test_magnitude_matches_pav_reference(p, seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(3, 12))
  k = int(rng.integers(1, n))
  l = float(rng.choice([0.05, 0.3, 1.0]))
  x = rng.normal(size=(4, n)) * rng.choice([0.5, 2.0])
  with x64():
    out = np.asarray(ops.topk_magnitude(jnp.asarray(x), k, regularization=l,
                                        p=p))
  expected = np.stack([ref.topk_magnitude(row, k, l, p) for row in x])
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_magnitude_p2_closed_form_on_block():
  # p = 2: the straddling block gets sign(x)(1 + l)(s - v)/l
  # (docs/design.md §2).
  x = np.array([3.0, -1.0, 0.9, 0.2, -0.1])
  l = 0.5
  out = np.asarray(ops.topk_magnitude(jnp.asarray(x), 2, regularization=l, p=2.0))
  # Entries 1 and 2 pool with the value v solving
  # l * v * 1 = (1 - v) + (0.9 - v): v = 1.9 / 2.5.
  v = 1.9 / (2.0 + l)
  expected = np.sign(x) * np.array(
      [3.0, (1 + l) * (1.0 - v) / l, (1 + l) * (0.9 - v) / l, 0.0, 0.0])
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_magnitude_exact_zeros_next_to_a_flat_stretch():
  # Regression: a residual tolerance used to stop γ just below a flat stretch
  # of F, leaving 0.009 where the exact output is 0.
  x = jnp.array([3.0, 1.0, 2.16, 3.16])
  out = np.asarray(ops.topk_magnitude(x, 2, regularization=0.6, p=4 / 3))
  with x64():
    expected = ref.topk_magnitude(np.asarray(x, np.float64), 2, 0.6, 4 / 3)
  assert out[1] == 0.0 and expected[1] == 0.0
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_float32_matches_float64_on_router_shapes():
  x = _rows(0, (256, 32))
  for p in (2.0, 4 / 3):
    y32 = np.asarray(ops.topk_mask(jnp.asarray(x, jnp.float32), 2, p=p))
    with x64():
      y64 = np.asarray(ops.topk_mask(jnp.asarray(x), 2, p=p))
    np.testing.assert_allclose(y32, y64, atol=2e-5)


@pytest.mark.parametrize("p, max_passes", [(2.0, 4), (4 / 3, 3)])
def test_router_rows_take_few_solver_passes(p, max_passes):
  # The first iterate sits a few ulps below the breakpoint x_(k) - l; the
  # first closed-form step must treat x_(k) as partial there, or a third of
  # the rows need fallback steps (5 passes, 1.5x the time of 3).
  x = jnp.asarray(_rows(0, (4096, 32)), jnp.float32)
  for regularization in (0.01, 0.1):
    t, passes = threshold.solve_threshold_counting_passes(
        x, 2, regularization, p, magnitude=False)
    assert int(passes) <= max_passes, (regularization, int(passes))
    np.testing.assert_array_equal(
        t, threshold.solve_threshold(x, 2, regularization, p, False))


def test_magnitude_large_n_support_is_a_top_set():
  x = jnp.asarray(_rows(1, (100_000,)), jnp.float32)
  k = 10_000
  s = np.abs(np.asarray(x))
  for l, max_support in ((0.1, 1.3 * k), (1e-3, 1.01 * k)):
    out = np.asarray(ops.topk_magnitude(x, k, regularization=l, p=4 / 3))
    support = out != 0
    assert k <= support.sum() <= max_support
    # The support is exactly the entries of largest magnitude.
    assert s[support].min() > s[~support].max()
    # Entries far above the block come back unchanged, signs included.
    top = s >= np.sort(s)[-k // 2]
    np.testing.assert_array_equal(out[top], np.asarray(x)[top])
    assert np.all(np.abs(out) <= s + 1e-6)


@pytest.mark.parametrize("shape,axis", [((5,), 0), ((2, 3, 7), 1),
                                        ((4, 6), -1), ((3, 2, 5), 0)])
def test_any_axis_equals_moving_the_axis(shape, axis):
  x = jnp.asarray(_rows(2, shape), jnp.float32)
  k = 2
  for op in (ops.topk_mask, ops.topk_magnitude):
    got = op(x, k, axis=axis)
    moved = jnp.moveaxis(op(jnp.moveaxis(x, axis, -1), k), -1, axis)
    np.testing.assert_allclose(got, moved, atol=1e-6)
    assert got.shape == shape


def test_dtypes():
  x = _rows(3, (8, 16))
  y16 = ops.topk_mask(jnp.asarray(x, jnp.bfloat16), 3)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32).sum(-1), 3, atol=0.05)
  assert ops.topk_magnitude(jnp.asarray(x, jnp.float16), 3).dtype == jnp.float16
  with x64():
    assert ops.topk_mask(jnp.asarray(x), 3).dtype == jnp.float64


def test_nan_row_stays_in_its_row():
  x = np.asarray(_rows(4, (3, 6)), np.float32)
  x[1, 2] = np.nan
  x[2, 0] = np.inf
  for op in (ops.topk_mask, ops.topk_magnitude):
    y = np.asarray(op(jnp.asarray(x), 2))
    assert np.all(np.isnan(y[1])) and np.all(np.isnan(y[2]))
    assert np.all(np.isfinite(y[0]))


# ------------------------------------------------------------ derivatives ---

@pytest.mark.parametrize("p", P_VALUES)
def test_check_grads_mask(p):
  x = jnp.asarray(_rows(5, (3, 7)))
  with x64():
    x = jnp.asarray(_rows(5, (3, 7)))
    fn = lambda z: ops.topk_mask(z, 3, regularization=0.7, p=p)
    check_grads(fn, (x,), order=1, modes=("fwd", "rev"), eps=1e-6)
    if p < 2:  # C¹ for p < 2: second order too (HVPs through the JVP).
      check_grads(fn, (x,), order=2, modes=("fwd", "rev"), eps=1e-5)


@pytest.mark.parametrize("p", P_VALUES)
def test_check_grads_magnitude(p):
  with x64():
    x = jnp.asarray(_rows(6, (3, 7)))
    fn = lambda z: ops.topk_magnitude(z, 3, regularization=0.5, p=p)
    check_grads(fn, (x,), order=1, modes=("fwd", "rev"), eps=1e-6)


def test_jacobian_identity_against_finite_differences():
  # J = diag(g) - g gᵀ / Σ g with g_i = (r/l)((x_i - τ)/l)^(r-1) on the
  # partial set (docs/design.md §2), checked against central differences.
  with x64():
    x = jnp.asarray(_rows(7, (9,)))
    l, p, k = 0.8, 4 / 3, 3
    r = 1.0 / (p - 1.0)
    fn = lambda z: ops.topk_mask(z, k, regularization=l, p=p)
    y = np.asarray(fn(x))
    partial = (y > 0) & (y < 1)
    assert partial.sum() >= 2
    g = np.where(partial, (r / l) * np.where(partial, y, 1) ** ((r - 1) / r), 0)
    identity = np.diag(g) - np.outer(g, g) / g.sum()
    eps = 1e-6
    fd = np.stack([(np.asarray(fn(x.at[j].add(eps))) -
                    np.asarray(fn(x.at[j].add(-eps)))) / (2 * eps)
                   for j in range(x.size)], axis=1)
    np.testing.assert_allclose(identity, fd, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jacrev(fn)(x)), identity,
                               atol=1e-10)
    np.testing.assert_allclose(np.asarray(jax.jacfwd(fn)(x)), identity,
                               atol=1e-10)


@pytest.mark.parametrize("op,p,l", [(ops.topk_mask, 3.0, 2.0),
                                    (ops.topk_mask, 1.25, 2.0),
                                    (ops.topk_magnitude, 1.25, 0.3),
                                    (ops.topk_magnitude, 4 / 3, 0.3),
                                    (ops.topk_magnitude, 3.0, 0.3)])
def test_finite_correct_derivatives_where_reference_code_gives_nan(op, p, l):
  # The published code returns NaN gradients for the magnitude with p < 2 and
  # the mask with p > 2; ours are finite and match finite differences.
  with x64():
    x = jnp.asarray(_rows(8, (12,)))
    loss = lambda z: jnp.sum(op(z, 4, regularization=l, p=p) * jnp.arange(12.0))
    grad = np.asarray(jax.grad(loss)(x))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    eps = 1e-6
    fd = np.array([(loss(x.at[j].add(eps)) - loss(x.at[j].add(-eps))) / (2 * eps)
                   for j in range(12)])
    np.testing.assert_allclose(grad, fd, atol=1e-5)


def test_transformations_compose():
  x = jnp.asarray(_rows(9, (4, 6)), jnp.float32)
  fn = lambda z: ops.topk_mask(z, 2, p=4 / 3)
  np.testing.assert_allclose(jax.vmap(fn)(x), fn(x), atol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(x), fn(x), atol=1e-6)
  primal, tangent = jax.jvp(fn, (x,), (jnp.ones_like(x),))
  np.testing.assert_allclose(tangent, 0.0, atol=1e-5)  # Shift invariance.
  _, vjp = jax.vjp(fn, x)
  np.testing.assert_allclose(vjp(jnp.ones_like(primal))[0], 0.0, atol=1e-5)
  loss = lambda z: jnp.sum(fn(z) * jnp.arange(6.0))
  hvp = jax.jvp(jax.grad(loss), (x,), (jnp.ones_like(x),))[1]
  assert hvp.shape == x.shape and bool(jnp.all(jnp.isfinite(hvp)))


def test_hard_operators():
  x = jnp.array([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, -1.0, 2.0, 2.0, 1.0]])
  mask = ops.hard_topk_mask(x, 2)
  np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
  grad = jax.grad(lambda z: jnp.sum(ops.hard_topk_mask(z, 2) * z ** 2))(x)
  np.testing.assert_array_equal(grad, 2 * x * mask)  # Only through z², not the mask.
  mag = ops.hard_topk_magnitude(jnp.array([0.1, -4.0, 2.0, -2.0]), 2)
  np.testing.assert_array_equal(mag, [0.0, -4.0, 2.0, 0.0])


def _mask_at_solved_threshold(z, where, k, l, p):
  """topk_mask_at_threshold with τ solved over the entries in `where`
  (the others moved below every selected one), as the attention does."""
  low = jnp.min(z, axis=-1, keepdims=True) - 2 * l
  tau = threshold.solve_threshold(jnp.where(where, z, low), k, l, p, False)
  return topk.topk_mask_at_threshold(z, tau, k, regularization=l, p=p,
                                     where=where)


@pytest.mark.parametrize("p", (4 / 3, 2.0))
def test_mask_at_threshold_is_topk_mask_of_the_entries_in_where(p):
  with x64():
    x = _rows(11, (4, 9))
    where = np.random.default_rng(12).random((4, 9)) < 0.7
    where[:, :4] = True  # at least k + 1 entries per row
    x[~where] += 5.0  # the largest entries, which must not count
    k, l = 3, 0.4
    y = np.asarray(_mask_at_solved_threshold(jnp.asarray(x), where, k, l, p))
    for row, keep in zip(range(4), where):
      np.testing.assert_allclose(y[row, keep], ref.topk_mask(x[row, keep], k,
                                                             l, p), atol=1e-9)
      assert np.all(y[row, ~keep] == 0)
    # Gradients: the implicit τ over the entries in `where` only; none to
    # the others, and the operator's own derivative on full rows.
    fn = lambda z: _mask_at_solved_threshold(z, where, k, l, p)
    check_grads(fn, (jnp.asarray(x),), order=1, modes=("fwd", "rev"),
                eps=1e-6)
    cotangent = jnp.asarray(_rows(13, (4, 9)))
    grad = jax.grad(lambda z: jnp.sum(fn(z) * cotangent))(jnp.asarray(x))
    assert np.all(np.asarray(grad)[~where] == 0)
    full = jnp.ones_like(jnp.asarray(where))
    np.testing.assert_allclose(
        jax.grad(lambda z: jnp.sum(_mask_at_solved_threshold(
            z, full, k, l, p) * cotangent))(jnp.asarray(x)),
        jax.grad(lambda z: jnp.sum(ops.topk_mask(
            z, k, regularization=l, p=p) * cotangent))(jnp.asarray(x)),
        atol=1e-9)


def test_mask_at_threshold_rejects_a_tau_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"tau must have shape \(2, 1\)"):
    topk.topk_mask_at_threshold(jnp.ones((2, 5)), jnp.ones((2,)), 2)


@pytest.mark.parametrize("ties", [False, True])
def test_kth_largest_counts_repeats(ties):
  # The bracket's order statistic: distinct values take the fast path,
  # repeats among the top k the counting one; both are np.sort's.
  rng = np.random.default_rng(21)
  for n in (2, 5, 13):
    z = (rng.integers(-2, 3, size=(6, n)) if ties
         else rng.normal(size=(6, n))).astype(np.float32)
    for k in range(1, n):
      np.testing.assert_array_equal(
          np.asarray(threshold._kth_largest(jnp.asarray(z), k))[:, 0],
          np.sort(z, axis=-1)[:, ::-1][:, k - 1])


# ------------------------------------------------------------- properties ---

_vectors = st.sampled_from([3, 8]).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=n,
             max_size=n),
    st.integers(1, n),
    st.sampled_from([0.05, 0.3, 1.0]),
    st.sampled_from(P_VALUES)))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(_vectors)
def test_mask_properties(case):
  values, k, l, p = case
  with x64():
    x = jnp.asarray(values, jnp.float64)
    y = np.asarray(ops.topk_mask(x, k, regularization=l, p=p))
    assert abs(y.sum() - k) < 1e-9
    assert np.all((y >= 0) & (y <= 1))
    xs = np.sort(np.asarray(values))[::-1]
    # τ >= x_(k) - l: everything at or below that is exactly zero.
    assert np.all(y[np.asarray(values) <= xs[k - 1] - l] == 0)
    perm = np.random.default_rng(0).permutation(len(values))
    y_perm = np.asarray(ops.topk_mask(x[perm], k, regularization=l, p=p))
    np.testing.assert_allclose(y_perm, y[perm], atol=1e-9)
    i = int(np.argmin(values))
    y_up = np.asarray(ops.topk_mask(x.at[i].add(0.5), k, regularization=l, p=p))
    assert y_up[i] >= y[i] - 1e-12  # Monotone in each coordinate.


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(st.integers(0, 10_000), st.sampled_from([2, 5, 8]),
                  st.sampled_from(P_VALUES))
def test_hard_limit(seed, n, p):
  rng = np.random.default_rng(seed)
  # Values and magnitudes at least 0.04 apart, of both signs.
  x = (rng.permutation(n) - n / 2 + 0.3) * 0.1
  k = int(rng.integers(1, n))
  with x64():
    x = jnp.asarray(x)
    y = ops.topk_mask(x, k, regularization=1e-4, p=p)
    np.testing.assert_array_equal(np.asarray(y), ops.hard_topk_mask(x, k))
    m = ops.topk_magnitude(x, k, regularization=1e-4, p=p)
    np.testing.assert_allclose(np.asarray(m), ops.hard_topk_magnitude(x, k),
                               atol=1e-3)


def test_p43_has_continuous_derivative_and_p2_does_not():
  # Along x(s) = (3, 1, -1 + s, s) (the paper's Figure 1) the derivative of
  # y_2 + y_3 jumps for p = 2 and is continuous for p = 4/3.
  def jumps(p):
    def curve(s):
      x = jnp.stack([3.0, 1.0, -1.0 + s, s])
      y = ops.topk_mask(x, 2, regularization=0.6, p=p)
      return y[1] + y[2]
    s = jnp.linspace(0.0, 5.0, 2001)
    d = np.asarray(jax.vmap(jax.grad(curve))(s))
    return np.max(np.abs(np.diff(d)))
  with x64():
    assert jumps(2.0) > 0.5
    assert jumps(4 / 3) < 0.05


# ------------------------------------------------------- dykstra, sharding ---

def test_dykstra_converges_to_exact():
  with x64():
    x = jnp.asarray(_rows(10, (6, 20)))
    for op in (ops.topk_mask, ops.topk_magnitude):
      exact = op(x, 5, regularization=0.5, p=2.0)
      errors = [float(jnp.max(jnp.abs(op(x, 5, regularization=0.5, p=2.0,
                                           solver="dykstra", num_iter=it) - exact)))
                for it in (5, 50, 2000)]
      assert errors[0] > errors[1] > errors[2]
      assert errors[2] < 1e-4


def test_dykstra_gradient_matches_exact():
  with x64():
    x = jnp.asarray(_rows(11, (10,)))
    w = jnp.arange(10.0)
    for op in (ops.topk_mask, ops.topk_magnitude):
      g = lambda solver: jax.grad(lambda z: jnp.sum(w * op(
          z, 3, regularization=0.5, p=2.0, solver=solver, num_iter=3000)))(x)
      np.testing.assert_allclose(g("dykstra"), g("exact"), atol=1e-6)


def test_sharded_equals_unsharded(eight_devices):
  mesh = Mesh(np.asarray(eight_devices), ("data",))
  sharding = NamedSharding(mesh, P("data", None))
  x = jnp.asarray(_rows(12, (64, 32)), jnp.float32)
  xs = jax.device_put(x, sharding)
  for op in (ops.topk_mask, ops.topk_magnitude):
    fn = jax.jit(lambda z: (op(z, 2, p=4 / 3), jax.grad(
        lambda u: jnp.sum(op(u, 2, p=4 / 3) ** 2))(z)), out_shardings=sharding)
    (y_s, g_s), (y, g) = fn(xs), jax.jit(lambda z: fn(z))(x)
    assert y_s.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_array_equal(np.asarray(y_s), np.asarray(y))
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), atol=1e-7)


# ----------------------------------------------------------------- errors ---

@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be in 1..5"),
    (dict(k=6), "k must be in 1..5"),
    (dict(k=2.0), "k must be a Python int"),
    (dict(regularization=0.0), "regularization must be > 0"),
    (dict(regularization=-1.0), "regularization must be > 0"),
    (dict(p=1.0), "p must be a finite float > 1"),
    (dict(p=0.5), "p must be a finite float > 1"),
    (dict(solver="pav"), "solver must be one of 'exact', 'dykstra'"),
    (dict(solver="dykstra", p=4 / 3), "solver='dykstra' supports p=2 only"),
    (dict(axis=3), "axis must be in"),
    (dict(num_iter=0), "num_iter must be a Python int >= 1"),
])
def test_bad_arguments(kwargs, match):
  x = jnp.ones((2, 5))
  args = dict(k=2) | kwargs
  k = args.pop("k")
  for op in (ops.topk_mask, ops.topk_magnitude):
    with pytest.raises(ValueError, match=match):
      op(x, k, **args)


def test_bad_x():
  with pytest.raises(ValueError, match="x must have a floating dtype"):
    ops.topk_mask(jnp.arange(5), 2)
  with pytest.raises(ValueError, match="x must have a floating dtype"):
    ops.hard_topk_mask(jnp.arange(5), 2)
  with pytest.raises(ValueError, match="k must be in 1..5"):
    ops.hard_topk_magnitude(jnp.ones(5), 7)


def test_hard_topk_of_a_row_with_nan_is_nan_in_that_row_only():
  x = jnp.array([[1.0, jnp.nan, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
  for op in (ops.hard_topk_mask, ops.hard_topk_magnitude):
    out = op(x, 2)
    assert bool(jnp.isnan(out[0]).all()), op
    assert not bool(jnp.isnan(out[1]).any()), op
  np.testing.assert_array_equal(ops.hard_topk_mask(x, 2)[1], [0, 1, 1, 0])


@pytest.mark.parametrize("op", [ops.topk_mask, ops.topk_magnitude,
                                ops.hard_topk_mask])
def test_an_empty_axis_is_a_clear_error(op):
  with pytest.raises(ValueError, match=r"x has no elements along axis 1 "
                     r"\(shape \(3, 0\)\); it needs at least one"):
    op(jnp.zeros((3, 0)), 1)
