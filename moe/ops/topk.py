"""Differentiable and exactly sparse top-k operators (Sander et al., ICML 2023).

Notation (docs/design.md §2): x in R^N along `axis` (any leading shape),
1 <= k <= N, l = `regularization` > 0, p > 1, q = p / (p - 1),
r = q - 1 = 1 / (p - 1).

* `topk_mask(x, k)`: y = argmax_{y in [0,1]^N, Σy = k} <x, y> - (l/p) Σ y_i^p,
  that is y_i = clip(((x_i - τ)/l)_+^r, 0, 1) with one threshold τ per row.
* `topk_magnitude(x, k)`: the paper's regularised top-k in magnitude. With
  s = |x| and γ >= 0 the value of the one isotonic block that straddles
  position k (docs/design.md §2), entry i is
      sign(x_i) s_i                              if s_i >= γ + l γ^(p-1),
      sign(x_i) (((s_i - γ)/l)^r + s_i - γ)      if γ < s_i < γ + l γ^(p-1),
      0                                          if s_i <= γ;
  for p = 2 the middle piece is sign(x)(1 + l)(s - γ)/l. γ solves
  Σ_i min(1, ((s_i - γ)_+ / l)^r / γ) = k, a monotone scalar equation.

Both outputs are exactly zero outside a support and converge to the hard
operators as l -> 0. Only the scalar (τ or γ) has a custom JVP, from the
implicit function theorem: with g_i = (r/l)((z_i - t)/l)^(r-1) on the partial
set (0 elsewhere),
    dτ = Σ g dx / Σ g,                 J_mask = diag(g) - g gᵀ / Σ g,
    dγ = Σ g ds / (Σ g + k - |capped|).
The operator outputs are plain compositions of the scalar, so forward mode,
reverse mode and higher-order derivatives come out of autodiff, all O(N) per
row; no N x N matrix is ever formed.

Rows that contain NaN or ±inf give NaN in that row only. bfloat16 and float16
inputs are computed in float32 and returned in their own dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe.config import schema
from moe.ops import _checks
from moe.ops import dykstra as dykstra_lib
from moe.ops import threshold as threshold_lib

SOLVERS = ("exact", "dykstra")


def compute_dtype(dtype):
  """float32 for half-precision inputs, the input dtype otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


def along_last_axis(fn, x, axis: int):
  """Applies `fn` ([..., N] -> [..., N]) along `axis` in the compute dtype.

  Args:
    fn: function of a [..., N] array in float32 or float64.
    x: input array of any shape.
    axis: the axis of length N.

  Returns:
    fn's output moved back to `axis`, in x's dtype.
  """
  axis = _checks.check_axis(axis, x.ndim)
  moved = jnp.moveaxis(x, axis, -1).astype(compute_dtype(x.dtype))
  return jnp.moveaxis(fn(moved), -1, axis).astype(x.dtype)


def _partial_set(z, t, regularization: float, p: float, magnitude: bool,
                 where=None):
  """(z - t, the capped set, the partial set), both within `where`."""
  d = z - t
  capped = d >= threshold_lib.cap_width(t, regularization, p, magnitude)
  partial = (d > 0) & ~capped
  if where is None:
    return d, capped, partial
  return d, capped & where, partial & where


def _partial_power(d, partial, regularization: float, power: float):
  """((d / l)^power) on the partial set, 0 elsewhere."""
  return threshold_lib.safe_pow(d / regularization, power, partial)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _threshold(z, k, regularization, p, magnitude):
  return threshold_lib.solve_threshold(
      jax.lax.stop_gradient(z), k, regularization, p, magnitude)


def _implicit_tangent(z, t, dz, k, regularization, p, magnitude, where=None):
  """dt of the root t of F(t) = k when z moves by dz (implicit function)."""
  r = threshold_lib.exponent(p)
  d, capped, partial = _partial_set(z, t, regularization, p, magnitude, where)
  g = (r / regularization) * _partial_power(d, partial, regularization, r - 1.0)
  denom = jnp.sum(g, axis=-1, keepdims=True)
  if magnitude:
    num_capped = jnp.sum(capped.astype(z.dtype), axis=-1, keepdims=True)
    denom = denom + (k - num_capped)
  dt = jnp.sum(g * dz, axis=-1, keepdims=True) / jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, dt, 0.0)


@_threshold.defjvp
def _threshold_jvp(k, regularization, p, magnitude, primals, tangents):
  (z,), (dz,) = primals, tangents
  t = _threshold(z, k, regularization, p, magnitude)
  return t, _implicit_tangent(z, t, dz, k, regularization, p, magnitude)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _solved_threshold(z, tau, where, k, regularization, p):
  """τ, a root of the mask equation for z (entries in `where`) solved
  elsewhere, with the implicit-function tangent in z (τ's own tangent is
  ignored)."""
  del z, where, k, regularization, p
  return tau


@_solved_threshold.defjvp
def _solved_threshold_jvp(k, regularization, p, primals, tangents):
  (z, tau, where), (dz, _, _) = primals, tangents
  return tau, _implicit_tangent(z, tau, dz, k, regularization, p, False,
                                where)


def _mask_at(z, tau, regularization, p, where=None):
  """clip(((z - τ) / l)_+^r, 0, 1) within `where` (0 elsewhere), NaN on rows
  where τ is NaN."""
  r = threshold_lib.exponent(p)
  d, capped, partial = _partial_set(z, tau, regularization, p, False, where)
  y = jnp.where(capped, 1.0, _partial_power(d, partial, regularization, r))
  return jnp.where(jnp.isnan(tau), jnp.nan, y)


def _mask_last_axis(z, k, regularization, p):
  if k == z.shape[-1]:
    return jnp.ones_like(z)
  return _mask_at(z, _threshold(z, k, regularization, p, False),
                  regularization, p)


def topk_mask_at_threshold(z, tau, k, *, regularization=0.1, p=4 / 3,
                           where=None):
  """`topk_mask` along the last axis with its threshold τ solved elsewhere.

  For callers that solve τ on less data than the rows they mask, e.g. a
  causal attention solving each query over the keys it can see
  (`moe.nn.attention`): the mask of z at τ, differentiable in z as
  `topk_mask` is (τ's tangent comes from the implicit function theorem on
  the entries of z in `where`; `tau` itself carries no gradient).

  Args:
    z: [..., N] float32 or float64 rows.
    tau: [..., 1] a root of Σ_{i in where} clip(((z_i - τ)/l)_+^r, 0, 1) = k
      for each row (`moe.ops.threshold.solve_threshold` of those entries, or
      of a part of them outside which every entry is below τ); NaN rows
      give NaN.
    k: the k τ was solved for, 1 <= k < N.
    regularization: l > 0, as for τ.
    p: p > 1, as for τ.
    where: boolean, broadcastable to z: the entries that take part (None:
      all); the others are 0 in the mask and get no gradient, whatever
      their value.

  Returns:
    [..., N] the mask, in [0, 1], exactly 0 where z <= τ or outside `where`.

  Raises:
    ValueError: tau's shape is not z's with a last axis of 1.
  """
  if tau.shape != z.shape[:-1] + (1,):
    raise ValueError(f"tau must have shape {z.shape[:-1] + (1,)} (z's rows), "
                     f"got {tau.shape}")
  where = jnp.ones((), bool) if where is None else jnp.asarray(where, bool)
  tau = _solved_threshold(z, jax.lax.stop_gradient(tau), where, k,
                          regularization, p)
  return _mask_at(z, tau, regularization, p, where)


def _magnitude_last_axis(z, k, regularization, p):
  s = jnp.abs(z)
  gamma = _threshold(s, k, regularization, p, True)
  r = threshold_lib.exponent(p)
  d, capped, partial = _partial_set(s, gamma, regularization, p, True)
  block = _partial_power(d, partial, regularization, r) + jnp.where(partial, d, 0.0)
  value = jnp.where(capped, s, block)
  return jnp.where(jnp.isnan(gamma), jnp.nan, jnp.sign(z) * value)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _soft_topk(x, k, regularization, p, axis, solver, num_iter, magnitude):
  """Both soft operators behind one jit, so eager calls reuse compilations."""
  if solver == "dykstra":
    impl = (dykstra_lib.topk_magnitude_dykstra if magnitude
            else dykstra_lib.topk_mask_dykstra)
    fn = lambda z: impl(z, k, regularization, num_iter)
  else:
    impl = _magnitude_last_axis if magnitude else _mask_last_axis
    fn = lambda z: impl(z, k, regularization, p)
  return along_last_axis(fn, x, axis)


def _check_common(x, k, axis, regularization, p, solver, num_iter):
  x, k, axis = _checks.check_selection(x, k, axis)
  regularization = _checks.check_positive(regularization, "regularization")
  p = _checks.check_p(p)
  schema.check_choice(solver, "solver", SOLVERS)
  if solver == "dykstra" and p != 2.0:
    raise ValueError(f"solver='dykstra' supports p=2 only, got p={p}; use "
                     "solver='exact' for other p.")
  _checks.check_positive_int(num_iter, "num_iter")
  return x, k, axis, regularization, p


def topk_mask(x, k, *, regularization=0.1, p=4 / 3, axis=-1, solver="exact",
              num_iter=100):
  """Soft top-k mask: differentiable, exactly sparse, sums to k.

  Args:
    x: [..., N, ...] floating array; the top-k runs along `axis`.
    k: Python int in 1..N (static).
    regularization: l > 0; smaller is closer to the hard mask.
    p: exponent of the p-norm regulariser, p > 1. p = 2 is piecewise linear;
      p = 4/3 is continuously differentiable.
    axis: the axis to select along.
    solver: "exact" (threshold root-find, exact to float tolerance for every
      p) or "dykstra" (the paper's Dykstra projection, p = 2 only).
    num_iter: Dykstra iterations (solver="dykstra" only).

  Returns:
    y: same shape and dtype as x, values in [0, 1], Σ_axis y = k, exactly 0
    outside the support.

  Raises:
    ValueError: k outside 1..N, regularization <= 0, p <= 1, non-floating x,
      unknown solver, or dykstra with p != 2.
  """
  x, k, axis, regularization, p = _check_common(
      x, k, axis, regularization, p, solver, num_iter)
  return _soft_topk(x, k, regularization, p, axis, solver, num_iter, False)


def topk_magnitude(x, k, *, regularization=0.1, p=4 / 3, axis=-1,
                   solver="exact", num_iter=100):
  """Soft top-k in magnitude: keeps (softly) the k entries of largest |x|.

  Args:
    x: [..., N, ...] floating array; the top-k runs along `axis`.
    k: Python int in 1..N (static).
    regularization: l > 0; smaller is closer to the hard operator.
    p: exponent of the p-norm regulariser, p > 1.
    axis: the axis to select along.
    solver: "exact" or "dykstra" (p = 2 only).
    num_iter: Dykstra iterations (solver="dykstra" only).

  Returns:
    Same shape and dtype as x: x on the entries of clearly largest magnitude,
    0 on the small ones (exactly), a smooth shrinkage in between (see the
    module docstring).

  Raises:
    ValueError: as `topk_mask`.
  """
  x, k, axis, regularization, p = _check_common(
      x, k, axis, regularization, p, solver, num_iter)
  return _soft_topk(x, k, regularization, p, axis, solver, num_iter, True)


def scatter_last_axis(values, indices, n: int):
  """[..., n] zeros with `values` [..., k] placed at `indices` [..., k]."""
  zeros = jnp.zeros((*values.shape[:-1], n), values.dtype)
  return jnp.put_along_axis(zeros, indices, values, axis=-1, inplace=False)


def top_k_by_sort(x, k: int):
  """`jax.lax.top_k` written as a stable sort: same values, indices and ties.

  XLA's SPMD partitioner all-gathers the operand of `lax.top_k` (its TopK
  op) even when only batch dimensions are sharded, while a sort along the
  last axis stays sharded on the others; routers use this on sharded
  tokens (`tests/test_expert_parallel.py` checks the compiled program).

  Args:
    x: `[..., N]` array.
    k: static int in 1..N.

  Returns:
    `(values, indices)`, each `[..., k]`: the k largest entries along the
    last axis in decreasing order, ties to the lower index; gradients flow
    to the selected entries.
  """
  indices = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
  return jnp.take_along_axis(x, indices, axis=-1), indices.astype(jnp.int32)


def hard_mask_last_axis(z, k: int):
  """[..., N] k-hot mask of the k largest entries (ties to the lower index);
  NaN in a row that holds a NaN (its order is undefined)."""
  _, indices = jax.lax.top_k(z, k)  # Ties: the lower index comes first.
  ones = jnp.ones(indices.shape, z.dtype)
  mask = scatter_last_axis(ones, indices, z.shape[-1])
  mask = jnp.where(jnp.isnan(z).any(axis=-1, keepdims=True),
                   jnp.asarray(jnp.nan, z.dtype), mask)
  return jax.lax.stop_gradient(mask)


def hard_topk_mask(x, k, *, axis=-1):
  """Hard top-k mask: exactly k ones per row, ties to the lower index.

  Args:
    x: [..., N, ...] floating array.
    k: Python int in 1..N.
    axis: the axis to select along.

  Returns:
    Same shape and dtype as x, with exactly k ones along `axis` (NaN along a
    row that holds a NaN; ±inf are ordered as numbers); zero gradient.
  """
  x, k, axis = _checks.check_selection(x, k, axis)
  return along_last_axis(lambda z: hard_mask_last_axis(z, k), x, axis)


def hard_topk_magnitude(x, k, *, axis=-1):
  """Hard top-k in magnitude: x on its k entries of largest |x|, 0 elsewhere.

  Args and errors as `hard_topk_mask`.

  Returns:
    x times the hard mask of |x| (exactly k kept entries per row, ties to the
    lower index). Its derivative is the mask itself (the mask is constant).
  """
  x, k, axis = _checks.check_selection(x, k, axis)
  return along_last_axis(lambda z: z * hard_mask_last_axis(jnp.abs(z), k), x,
                         axis)
