"""The paper's Dykstra route to the p = 2 top-k operators (last axis).

Both operators become an isotonic regression of the sorted input (Sander et
al. 2023, §4), solved by `isotonic_regression(solver="dykstra")`. With
w = (1, ..., 1, 0, ..., 0) (k ones) and σ the permutation that sorts
descending:

* mask: y = z - v∘σ⁻¹, z = x / l, v = isotonic_decreasing(z_σ - w): the
  Euclidean projection of x / l onto the permutahedron of w;
* magnitude: s = |x|_σ, v = isotonic_decreasing(s / (1 + l w), weights
  1 + l w), output sign(x) (1 + l)(s - v)/l in the original order.

Derivatives come from the isotonic regression's implicit JVP and the sort's
permutation (a gather): O(N) per row, no N x N matrix.
"""
from __future__ import annotations

import jax.numpy as jnp

from moe.ops import isotonic


def _sorted_with_inverse(z):
  """z sorted descending along the last axis, and the inverse permutation."""
  order = jnp.argsort(-z, axis=-1, stable=True)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(z, order, axis=-1), inverse


def _selection_weights(z, k: int):
  return (jnp.arange(z.shape[-1]) < k).astype(z.dtype)


def topk_mask_dykstra(x, k: int, regularization: float, num_iter: int):
  """Soft top-k mask (p = 2) of [..., N] x via Dykstra; see module docstring."""
  z_sorted, inverse = _sorted_with_inverse(x / regularization)
  v = isotonic.isotonic_regression(
      z_sorted - _selection_weights(x, k), solver="dykstra", num_iter=num_iter)
  y_sorted = z_sorted - v
  return jnp.take_along_axis(y_sorted, inverse, axis=-1)


def topk_magnitude_dykstra(x, k: int, regularization: float, num_iter: int):
  """Soft top-k in magnitude (p = 2) of [..., N] x via Dykstra."""
  s_sorted, inverse = _sorted_with_inverse(jnp.abs(x))
  weights = 1.0 + regularization * _selection_weights(x, k)
  v = isotonic.isotonic_regression(
      s_sorted / weights, weights, solver="dykstra", num_iter=num_iter)
  out_sorted = (1.0 + regularization) * (s_sorted - v) / regularization
  return jnp.sign(x) * jnp.take_along_axis(out_sorted, inverse, axis=-1)
