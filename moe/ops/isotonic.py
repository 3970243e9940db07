"""Weighted isotonic regression in pure JAX: exact PAV and Dykstra's projection.

    v = argmin_{v_1 >= v_2 >= ... >= v_N} ½ Σ_i w_i (v_i - y_i)²   (decreasing)

(or v_1 <= ... <= v_N with `increasing=True`), along the last axis of any
leading shape.

* `solver="pav"`: pool adjacent violators, exact; a sequential O(N) scan per
  row (vectorised over rows), fine for moderate N.
* `solver="dykstra"`: the paper's TPU-friendly solver: Dykstra's alternating
  projections onto the "even" pairs {v_1 >= v_2, v_3 >= v_4, ...} and the
  "odd" pairs {v_2 >= v_3, ...}; each projection is a closed-form weighted
  average of pairs, so one iteration is two vectorised passes. Approximate:
  the error shrinks as `num_iter` grows.

The solution is piecewise a weighted block mean, v_B = Σ_B w y / Σ_B w, so its
derivative (custom JVP, implicit differentiation) is again a block mean,
dv_B = Σ_B (w dy + dw (y - v)) / Σ_B w, O(N) with blocks read off the solution
as runs of equal values (to a tolerance for Dykstra's approximate solution).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe.config import schema
from moe.ops import _checks

ISOTONIC_SOLVERS = ("pav", "dykstra")


def _pav_increasing_row(y, w):
  """Exact non-decreasing weighted isotonic regression of one row [N]."""
  n = y.shape[0]

  def merge_while_violating(state):
    def violates(s):
      sum_wy, sum_w, _, top = s
      prev, cur = top - 1, top
      return (top >= 1) & (sum_wy[prev] * sum_w[cur] > sum_wy[cur] * sum_w[prev])

    def merge(s):
      sum_wy, sum_w, start, top = s
      sum_wy = sum_wy.at[top - 1].add(sum_wy[top])
      sum_w = sum_w.at[top - 1].add(sum_w[top])
      return sum_wy, sum_w, start, top - 1

    return jax.lax.while_loop(violates, merge, state)

  def push(i, state):
    sum_wy, sum_w, start, top = state
    top = top + 1
    state = (sum_wy.at[top].set(w[i] * y[i]), sum_w.at[top].set(w[i]),
             start.at[top].set(i), top)
    return merge_while_violating(state)

  init = (jnp.zeros_like(y), jnp.zeros_like(w), jnp.zeros(n, jnp.int32),
          jnp.int32(-1))
  sum_wy, sum_w, start, top = jax.lax.fori_loop(0, n, push, init)
  is_start = jnp.zeros(n, jnp.int32).at[
      jnp.where(jnp.arange(n) <= top, start, n)].set(1, mode="drop")
  block = jnp.cumsum(is_start) - 1
  return (sum_wy / jnp.where(sum_w > 0, sum_w, 1.0))[block]


def _pav_decreasing(y, w):
  flat_y, flat_w = y.reshape(-1, y.shape[-1]), w.reshape(-1, w.shape[-1])
  v = jax.vmap(_pav_increasing_row)(-flat_y, flat_w)
  return -v.reshape(y.shape)


def _project_pairs(v, w, offset: int):
  """Projects onto {v_j >= v_j+1 for j = offset, offset + 2, ...} (W-norm)."""
  body_v, body_w = v[..., offset:], w[..., offset:]
  m = body_v.shape[-1]
  if m < 2:
    return v
  if m % 2:  # Pad with a copy of the last entry: that pair never violates.
    body_v = jnp.concatenate([body_v, body_v[..., -1:]], axis=-1)
    body_w = jnp.concatenate([body_w, body_w[..., -1:]], axis=-1)
  pv = body_v.reshape(*body_v.shape[:-1], -1, 2)
  pw = body_w.reshape(*body_w.shape[:-1], -1, 2)
  mean = jnp.sum(pv * pw, axis=-1, keepdims=True) / jnp.sum(pw, axis=-1,
                                                             keepdims=True)
  violated = pv[..., :1] < pv[..., 1:]
  pv = jnp.where(violated, mean, pv).reshape(*v.shape[:-1], -1)[..., :m]
  return jnp.concatenate([v[..., :offset], pv], axis=-1) if offset else pv


def _dykstra_decreasing(y, w, num_iter: int):
  def step(_, state):
    x, p, q = state
    u = _project_pairs(x + p, w, 0)
    p = x + p - u
    x_new = _project_pairs(u + q, w, 1)
    q = u + q - x_new
    return x_new, p, q

  zeros = jnp.zeros_like(y)
  x, _, _ = jax.lax.fori_loop(0, num_iter, step, (y, zeros, zeros))
  return x


def _block_ids(v, tol):
  """Ids of runs of (nearly) equal consecutive values along the last axis."""
  new_block = jnp.abs(jnp.diff(v, axis=-1)) > tol
  first = jnp.zeros_like(new_block[..., :1])
  return jnp.cumsum(jnp.concatenate([first, new_block], axis=-1), axis=-1)


def _block_sum(values, ids):
  """Σ over the run containing each entry, broadcast back to its entries."""
  n = values.shape[-1]
  seg = lambda a, i: jax.ops.segment_sum(a, i, num_segments=n)[i]
  flat = jax.vmap(seg)(values.reshape(-1, n), ids.reshape(-1, n))
  return flat.reshape(values.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _isotonic_decreasing(y, w, solver, num_iter):
  y, w = jax.lax.stop_gradient(y), jax.lax.stop_gradient(w)
  if solver == "pav":
    return _pav_decreasing(y, w)
  return _dykstra_decreasing(y, w, num_iter)


@_isotonic_decreasing.defjvp
def _isotonic_decreasing_jvp(solver, num_iter, primals, tangents):
  (y, w), (dy, dw) = primals, tangents
  v = _isotonic_decreasing(y, w, solver, num_iter)
  if solver == "pav":
    tol = 0.0
  else:
    scale = jnp.max(jnp.abs(y), axis=-1, keepdims=True)
    tol = 1e-5 * scale
  ids = _block_ids(jax.lax.stop_gradient(v), tol)
  numer = _block_sum(w * dy + dw * (y - v), ids)
  return v, numer / _block_sum(w, ids)


def _check_positive_weights(w) -> None:
  """Raises if concrete weights are not all > 0 (NaN included)."""
  try:
    values = np.asarray(w)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  if values.size and not np.all(values > 0):
    raise ValueError(f"weights must all be > 0 (each block's fit is its "
                     f"weighted mean), got min {float(np.nanmin(values))!r}"
                     f"{' and NaN' if np.isnan(values).any() else ''}.")


def isotonic_regression(y, weights=None, *, increasing=False, solver="pav",
                        num_iter=1000, axis=-1):
  """Weighted isotonic regression along `axis`.

  Args:
    y: [..., N] floating targets.
    weights: positive weights broadcastable to y, or None for ones.
    increasing: fit a non-decreasing sequence instead of a non-increasing one.
    solver: "pav" (exact) or "dykstra" (approximate, fully vectorised).
    num_iter: Dykstra iterations (solver="dykstra" only).
    axis: the axis along which the sequence is monotone.

  Returns:
    v: same shape and dtype as y, the monotone fit; differentiable in y and
    weights (O(N) JVP).

  Raises:
    ValueError: non-floating y, y empty along `axis`, unknown solver,
      num_iter < 1, bad axis, weights not > 0 (checked when they are
      concrete values, not under `jit`).
  """
  y = _checks.check_floating(y, "y")
  schema.check_choice(solver, "solver", ISOTONIC_SOLVERS)
  num_iter = _checks.check_positive_int(num_iter, "num_iter")
  axis = _checks.check_axis(axis, y.ndim)
  _checks.check_nonempty(y, axis, "y")
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  if weights is None:
    w = jnp.ones_like(y, dtype=dtype)
  else:
    w = _checks.check_floating(weights, "weights").astype(dtype)
    _check_positive_weights(w)
    w = jnp.broadcast_to(w, y.shape)
  yt = jnp.moveaxis(y.astype(dtype), axis, -1)
  wt = jnp.moveaxis(w, axis, -1)
  sign = -1.0 if increasing else 1.0
  v = sign * _isotonic_decreasing(sign * yt, wt, solver, num_iter)
  return jnp.moveaxis(v, -1, axis).astype(y.dtype)
