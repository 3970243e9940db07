"""Tests of moe.ops.isotonic_regression against the numpy PAV reference."""
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from moe import ops
import topk_reference as ref


@pytest.mark.parametrize("weighted", [False, True])
def test_pav_matches_reference(weighted):
  rng = np.random.default_rng(0)
  y = rng.normal(size=(5, 9)) + np.linspace(1, -1, 9)
  w = rng.uniform(0.2, 3.0, size=y.shape) if weighted else np.ones_like(y)
  with jax.enable_x64(True):
    v = np.asarray(ops.isotonic_regression(
        jnp.asarray(y), jnp.asarray(w) if weighted else None))
  expected = np.stack([ref.isotonic_decreasing(a, b) for a, b in zip(y, w)])
  np.testing.assert_allclose(v, expected, atol=1e-8)
  assert np.all(np.diff(v, axis=-1) <= 1e-12)


def test_increasing_and_axis():
  y = jnp.asarray(np.random.default_rng(1).normal(size=(7, 3)), jnp.float32)
  v = ops.isotonic_regression(y, increasing=True, axis=0)
  assert np.all(np.diff(np.asarray(v), axis=0) >= -1e-6)
  np.testing.assert_allclose(
      v, -ops.isotonic_regression(-y.T).T, atol=1e-6)
  # Block means preserve the total (unweighted least squares).
  np.testing.assert_allclose(v.sum(0), y.sum(0), atol=1e-5)


def test_dykstra_error_shrinks_with_iterations():
  y = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16)))
  with jax.enable_x64(True):
    y = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16)))
    exact = ops.isotonic_regression(y)
    errors = [float(jnp.max(jnp.abs(ops.isotonic_regression(
        y, solver="dykstra", num_iter=it) - exact))) for it in (2, 20, 2000)]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_gradients():
  with jax.enable_x64(True):
    y = jnp.asarray(np.random.default_rng(3).normal(size=(8,)))
    w = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, size=(8,)))
    check_grads(lambda a, b: ops.isotonic_regression(a, b), (y, w), order=1,
                modes=("fwd", "rev"), eps=1e-6)
    # Within a pooled block the derivative is the weighted block mean.
    y2 = jnp.array([0.0, 1.0, 2.0])  # Pools into one block.
    jac = jax.jacobian(lambda a: ops.isotonic_regression(a, w[:3]))(y2)
    np.testing.assert_allclose(jac, jnp.tile(w[:3] / w[:3].sum(), (3, 1)),
                               atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="sort"), "solver must be one of 'pav', 'dykstra'"),
    (dict(num_iter=0), "num_iter must be a Python int >= 1"),
    (dict(axis=2), "axis must be in"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ops.isotonic_regression(jnp.ones((2, 3)), **kwargs)
  with pytest.raises(ValueError, match="y must have a floating dtype"):
    ops.isotonic_regression(jnp.arange(3))


def test_empty_input_and_bad_weights_are_clear_errors():
  with pytest.raises(ValueError, match=r"y has no elements along axis 0 "
                     r"\(shape \(0,\)\); it needs at least one"):
    ops.isotonic_regression(jnp.zeros((0,)))
  y = jnp.array([3.0, 1.0, 2.0])
  for weights, shown in ((jnp.array([1.0, -1.0, 1.0]), "-1.0"),
                         (jnp.zeros(3), "0.0"),
                         (jnp.array([1.0, jnp.nan, 1.0]), "1.0 and NaN")):
    with pytest.raises(ValueError, match=rf"weights must all be > 0 .*got "
                       rf"min {shown}"):
      ops.isotonic_regression(y, weights)
  # Under jit the values are not known: no check, no error at trace time.
  jax.jit(ops.isotonic_regression)(y, jnp.ones(3))
