"""The one scalar per row that defines the regularised top-k operators.

Both regularised top-k operators of docs/design.md §2 reduce, row by row, to a
monotone scalar equation in one unknown `t` (r = q - 1 = 1 / (p - 1)):

* mask (`t` is the threshold τ):
      F(t) = Σ_i clip(((z_i - t) / l)_+^r, 0, 1) = k;
* magnitude (`t` is the value γ > 0 of the one isotonic block that straddles
  position k; z = |x|):
      F(t) = Σ_i min(1, ((z_i - t)_+ / l)^r / t) = k.

In both, entry i is *capped* (y_i = 1) when d_i = z_i - t >= w(t), *partial*
when 0 < d_i < w(t) and zero otherwise, with the cap width w(t) = l for the mask
and w(t) = l t^(p-1) for the magnitude. On a segment where the capped set A and
the partial set B do not change, F(t) = k reads

      Σ_{i in B} (d_i - δ)^r = c0 + c1 δ,     t -> t + δ,
      c = l^r (k - |A|),  (c0, c1) = (c, 0) for the mask, (c t, c) for magnitude,

which we solve in closed form for r = 1 (p = 2) and r = 3 (p = 4/3, a monotone
depressed cubic solved by a cancellation-free Cardano formula), and by a Newton
step for other p. The solver keeps a bracket [lo, hi] with F(lo) >= k > F(hi)
and falls back to bisection whenever the segment step leaves it, so it always
converges; once the iterate is in the root's segment the closed-form step is
exact, and the loop stops on the next pass. Every pass is O(n) and vectorised
over all rows: no sort, no n x n matrix.

One pass (`_solver_pass`, the body of a `lax.while_loop` over `_SolverState`):
`_stats` sums over A and B at t, `_residual` gives F(t) - k, `_update_bracket`
moves an end of [lo, hi] to t, `_segment_step` proposes the closed-form step,
`_settled` tests it and the bracket against the tolerance, and `_next_iterate`
picks the step, regula falsi or bisection.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Beyond this k the bracket comes from the row's range rather than from the
# k-th largest entry (which costs k - 1 knock-out passes).
_MAX_K_FOR_ORDER_STATISTIC = 8
_MAX_ITER = 100


class _Stats(NamedTuple):
  """Sums over the capped set A and the partial set B at the current iterate."""
  num_capped: jnp.ndarray
  num_partial: jnp.ndarray
  s1: jnp.ndarray  # Σ_B d
  s2: jnp.ndarray  # Σ_B d²      (r = 3 only)
  s3: jnp.ndarray  # Σ_B d³      (r = 3 only)
  s_r: jnp.ndarray  # Σ_B d^r
  s_r1: jnp.ndarray  # Σ_B d^(r-1) (Newton step only)


def exponent(p: float) -> float:
  """r = q - 1 = 1 / (p - 1), snapped to an integer when it is one up to
  rounding (1 / (4/3 - 1) is 3.0000000000000004 in floating point)."""
  r = 1.0 / (p - 1.0)
  return float(round(r)) if abs(r - round(r)) < 1e-9 else r


def cap_width(t, regularization: float, p: float, magnitude: bool):
  """Returns w(t): entries with z - t >= w(t) are capped at 1."""
  if not magnitude:
    return jnp.full_like(t, regularization)
  return regularization * jnp.power(jnp.maximum(t, 0.0), p - 1.0)


def safe_pow(d, power: float, where):
  """d**power on `where`, 0 elsewhere, with finite derivatives everywhere."""
  if power == 1.0:
    return jnp.where(where, d, 0.0)
  if power == 0.0:
    return where.astype(d.dtype)
  safe = jnp.where(where, d, 1.0)
  if float(power).is_integer() and power > 0:
    return jnp.where(where, jax.lax.integer_pow(safe, int(power)), 0.0)
  return jnp.where(where, jnp.power(safe, power), 0.0)


def _row_sums(columns):
  """Σ over the last axis of each [..., N] column, two columns per pass.

  XLA on CPU runs every reduction as its own pass over the data (sibling
  reductions are not fused), so pairs of real columns are summed as the real
  and imaginary parts of one complex column: half the passes, same floats.
  """
  total = functools.partial(jnp.sum, axis=-1, keepdims=True)
  sums = []
  for i in range(0, len(columns) - 1, 2):
    pair = total(jax.lax.complex(columns[i], columns[i + 1]))
    sums += [jnp.real(pair), jnp.imag(pair)]
  if len(columns) % 2:
    sums.append(total(columns[-1]))
  return sums


def _power_columns(d, partial, r: float):
  """The columns Σ_B sums over: d, and d², d³ (r = 3) or d^r, d^(r-1)."""
  db = jnp.where(partial, d, 0.0)
  if r == 3.0:
    sq = db * db
    return [db, sq, sq * db]
  if r == 1.0:
    return [db]
  return [db, safe_pow(d, r, partial), safe_pow(d, r - 1.0, partial)]


def _power_stats(num_capped, num_partial, sums, r: float) -> _Stats:
  """_Stats from the counts and the sums of `_power_columns`."""
  s1 = sums[0]
  s2 = s3 = jnp.zeros_like(s1)
  if r == 3.0:
    s2, s3 = sums[1], sums[2]
    s_r, s_r1 = s3, s2
  elif r == 1.0:
    s_r, s_r1 = s1, num_partial
  else:
    s_r, s_r1 = sums[1], sums[2]
  return _Stats(num_capped=num_capped, num_partial=num_partial,
                s1=s1, s2=s2, s3=s3, s_r=s_r, s_r1=s_r1)


def _stats(z, t, regularization: float, p: float, magnitude: bool) -> _Stats:
  """The sums over the capped and partial sets at the iterate t."""
  r = exponent(p)
  d = z - t
  # Entries within rounding of the cap count as partial, at most at the cap:
  # the first iterate sits on such a breakpoint (x_(k) - l, a few ulps
  # lower), and the root lies in the segment beyond it, where they are
  # partial. Their clipped d keeps F(t) exact at the breakpoint itself.
  width = cap_width(t, regularization, p, magnitude)
  capped = d >= width + 16.0 * jnp.finfo(z.dtype).eps * (jnp.abs(t) + width)
  partial = (d > 0) & ~capped
  d = jnp.minimum(d, width)
  # Both counts in one column, |capped| * (N + 1) + |partial|, while exact.
  base = z.shape[-1] + 1
  packed = base * base < 2 ** (jnp.finfo(z.dtype).nmant + 1)
  if packed:
    counts = [jnp.where(capped, float(base), partial.astype(z.dtype))]
  else:
    counts = [capped.astype(z.dtype), partial.astype(z.dtype)]
  sums = _row_sums(counts + _power_columns(d, partial, r))
  if packed:
    num_capped = jnp.floor(sums[0] / base)
    num_partial, sums = sums[0] - base * num_capped, sums[1:]
  else:
    (num_capped, num_partial), sums = sums[:2], sums[2:]
  return _power_stats(num_capped, num_partial, sums, r)


def _cubic_root(p_coef, q_coef):
  """The real root u of u³ + P u + Q = 0 for P >= 0, without cancellation.

  With w = cbrt(|Q|/2 + sqrt(Q²/4 + P³/27)) and v = P / (3 w), Cardano's root
  is -sign(Q) (w - v) = -Q / (w² + w v + v²), since w³ - v³ = |Q|.
  """
  disc = jnp.sqrt(0.25 * q_coef * q_coef + (p_coef / 3.0) ** 3)
  w = jnp.cbrt(0.5 * jnp.abs(q_coef) + disc)
  v = p_coef / (3.0 * jnp.where(w > 0, w, 1.0))
  denom = w * w + w * v + v * v
  return jnp.where(denom > 0, -q_coef / jnp.where(denom > 0, denom, 1.0), 0.0)


def _segment_step(st: _Stats, c0, c1, p: float):
  """δ solving Σ_B (d - δ)^r = c0 + c1 δ on the current segment (NaN if none)."""
  r = exponent(p)
  m = st.num_partial
  has = m > 0
  m_safe = jnp.where(has, m, 1.0)
  if r == 3.0:
    mu = st.s1 / m_safe
    var = jnp.maximum(st.s2 - mu * st.s1, 0.0)
    third = st.s3 - 3.0 * mu * st.s2 + 2.0 * mu * mu * st.s1
    u = _cubic_root((3.0 * var + c1) / m_safe, (c0 + c1 * mu - third) / m_safe)
    delta = mu + u
    # μ + u cancels when the root is close to t (the last steps): one Newton
    # step on g(δ) = Σ_B (d - δ)³ - c0 - c1 δ, expanded around δ = 0 where
    # its leading terms are exact, restores full precision.
    slope = 3.0 * st.s2 + c1
    g = st.s3 - c0 - delta * (slope - delta * (3.0 * st.s1 - m * delta))
    dg = -slope + delta * (6.0 * st.s1 - 3.0 * m * delta)
    delta = delta - g / jnp.where(dg < 0, dg, -1.0)
  else:
    slope = r * st.s_r1 + c1
    delta = (st.s_r - c0) / jnp.where(slope > 0, slope, 1.0)
    has = has & (slope > 0)
  return jnp.where(has, delta, jnp.nan)


def _max_below(z, value):
  """The largest entry of each row below `value` [..., 1] (-inf if none)."""
  return jnp.max(jnp.where(z < value, z, -jnp.inf), axis=-1, keepdims=True)


def _kth_largest_counting_repeats(z, k: int):
  """The k-th largest entry along the last axis, counting repeats: k passes
  of (max below the last value, count of it)."""
  value = jnp.max(z, axis=-1, keepdims=True)
  seen = jnp.sum((z == value).astype(z.dtype), axis=-1, keepdims=True)
  for _ in range(k - 1):
    below = _max_below(z, value)
    count = jnp.sum((z == below).astype(z.dtype), axis=-1, keepdims=True)
    value = jnp.where(seen >= k, value, below)
    seen = jnp.where(seen >= k, seen, seen + count)
  return value


def _kth_largest(z, k: int):
  """The k-th largest entry along the last axis, counting repeats.

  k - 1 passes of "max below the last value" give the k-th largest distinct
  value v (or the row min); it is the k-th largest counting repeats unless
  k or more entries exceed it, which one count tells. Only then (repeats
  among the top k of some row) does `_kth_largest_counting_repeats` run.
  Cheaper than `lax.top_k` or argmax for the small k this is used for.
  """
  value = jnp.max(z, axis=-1, keepdims=True)
  for _ in range(k - 1):
    below = _max_below(z, value)
    value = jnp.where(below > -jnp.inf, below, value)
  above = jnp.sum((z > value).astype(z.dtype), axis=-1, keepdims=True)
  return jax.lax.cond(jnp.any(above >= k),
                      lambda: _kth_largest_counting_repeats(z, k),
                      lambda: value)


def _initial_bracket(z, k: int, regularization: float, magnitude: bool):
  """(lo, hi) with F(lo) >= k > F(hi), each [..., 1]."""
  if magnitude:
    return jnp.zeros_like(z[..., :1]), jnp.max(z, axis=-1, keepdims=True)
  if k <= _MAX_K_FOR_ORDER_STATISTIC:
    kth = _kth_largest(z, k)
    # A few ulps below x_(k) - l, so that the top k really are capped there
    # after rounding (on a flat stretch of F this is already the answer).
    slack = 4.0 * jnp.finfo(z.dtype).eps * (jnp.abs(kth) + regularization)
    return kth - regularization - slack, kth
  lo = jnp.min(z, axis=-1, keepdims=True) - regularization
  return lo, jnp.max(z, axis=-1, keepdims=True)


class _Problem(NamedTuple):
  """What every solver pass reads: the rows, the constants and tolerances."""
  z: jnp.ndarray
  k: int
  regularization: float
  p: float
  magnitude: bool
  tol: jnp.ndarray  # [..., 1]: steps and brackets this short have converged
  res_tol: float  # |F(t) - k| this small is a root
  nonzero: jnp.ndarray | None  # magnitude: nonzero entries per row, [..., 1]


class _SolverState(NamedTuple):
  """The `lax.while_loop` carry: per row [..., 1], except `passes`."""
  t: jnp.ndarray  # the iterate
  lo: jnp.ndarray  # the bracket [lo, hi]: F(lo) >= k > F(hi)
  hi: jnp.ndarray
  res_lo: jnp.ndarray  # F(lo) - k and F(hi) - k, NaN until evaluated
  res_hi: jnp.ndarray
  fell_back: jnp.ndarray  # the last pass fell back: the next fallback bisects
  done: jnp.ndarray
  passes: jnp.ndarray  # int32 scalar: passes over the data so far


def _tolerances(z, k: int, lo, hi, regularization: float, magnitude: bool):
  """(tol, res_tol): the step and bracket tolerance [..., 1]; the residual's."""
  eps = jnp.finfo(z.dtype).eps
  scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  if not magnitude:
    scale = scale + regularization
  # Mask: the output moves by at most |F - k| when t moves, so stopping at the
  # rounding error of F is exact for every digit shown. Magnitude: the output
  # has a linear term (s - γ) that does not vanish with F - k on a flat
  # stretch of F, so only an exact residual (or the step/bracket tests) stops.
  res_tol = 0.0 if magnitude else (
      4.0 * eps * k * max(1, math.ceil(math.log2(z.shape[-1]))))
  return 4.0 * eps * scale, res_tol


def _segment_rhs(st: _Stats, t, problem: _Problem):
  """(c0, c1) of the segment equation Σ_B (d - δ)^r = c0 + c1 δ at t."""
  c = problem.regularization ** exponent(problem.p) * (
      problem.k - st.num_capped)
  return (c * t, c) if problem.magnitude else (c, jnp.zeros_like(c))


def _residual(st: _Stats, t, c0, problem: _Problem):
  """(res, positive): res = F(t) - k, trusted as a root test where positive."""
  scale_r = problem.regularization ** exponent(problem.p)
  if not problem.magnitude:
    return (st.s_r - c0) / scale_r, jnp.ones_like(t, dtype=bool)
  # For the magnitude F is scaled by 1/t; at t = 0 every nonzero entry is
  # capped (more than k of them on rows still running).
  positive = t > 0
  res = jnp.where(positive, (st.s_r - c0) / (scale_r * jnp.where(
      positive, t, 1.0)), problem.nonzero - problem.k)
  return res, positive


def _update_bracket(state: _SolverState, res) -> _SolverState:
  """Moves lo (where res >= 0) or hi (elsewhere) to t, with its residual."""
  at_least_k = res >= 0
  return state._replace(
      lo=jnp.where(at_least_k, state.t, state.lo),
      res_lo=jnp.where(at_least_k, res, state.res_lo),
      hi=jnp.where(at_least_k, state.hi, state.t),
      res_hi=jnp.where(at_least_k, state.res_hi, res))


def _settled(bracket: _SolverState, cand, tol):
  """(inside, settled): cand in the bracket; the step or bracket within tol."""
  inside = (cand >= bracket.lo) & (cand <= bracket.hi)
  converged = inside & (jnp.abs(cand - bracket.t) <= tol)
  return inside, converged | (bracket.hi - bracket.lo <= tol)


def _next_iterate(bracket: _SolverState, cand):
  """(next, stepped): the segment step cand where it lands strictly inside.

  A step must land strictly inside the bracket: a step back onto an end that
  was already evaluated means the segment was the wrong one. Then fall back to
  regula falsi on the bracket (the root often sits next to a breakpoint), and
  to bisection every other time so the bracket halves.
  """
  lo, hi = bracket.lo, bracket.hi
  interior = lambda v: (v > lo) & (v < hi)
  secant = lo + (hi - lo) * bracket.res_lo / (bracket.res_lo - bracket.res_hi)
  use_secant = ~bracket.fell_back & interior(secant)
  fallback = jnp.where(use_secant, secant, 0.5 * (lo + hi))
  stepped = interior(cand)
  return jnp.where(stepped, cand, fallback), stepped


def _solver_pass(problem: _Problem, state: _SolverState) -> _SolverState:
  """One pass over the data: the residual, the bracket and the next iterate."""
  st = _stats(problem.z, state.t, problem.regularization, problem.p,
              problem.magnitude)
  c0, c1 = _segment_rhs(st, state.t, problem)
  res, positive = _residual(st, state.t, c0, problem)
  bracket = _update_bracket(state, res)
  cand = state.t + _segment_step(st, c0, c1, problem.p)
  inside, settled = _settled(bracket, cand, problem.tol)
  nxt, stepped = _next_iterate(bracket, cand)
  nxt = jnp.where(settled, jnp.where(inside, cand, state.t), nxt)
  # F(t) = k to the rounding error of the sum F itself: t is a root for every
  # digit the output can show.
  exact = (jnp.abs(res) <= problem.res_tol) & positive
  done = state.done | settled | exact
  return bracket._replace(
      t=jnp.where(state.done | exact, state.t, nxt),
      lo=jnp.where(done, state.lo, bracket.lo),
      hi=jnp.where(done, state.hi, bracket.hi),
      fell_back=~stepped & ~state.fell_back,
      done=done, passes=state.passes + 1)


def _running(state: _SolverState):
  return (state.passes < _MAX_ITER) & ~jnp.all(state.done)


def solve_threshold(z, k: int, regularization: float, p: float,
                    magnitude: bool):
  """Solves F(t) = k row by row; `solve_threshold_counting_passes` says how."""
  return solve_threshold_counting_passes(z, k, regularization, p,
                                         magnitude)[0]


def solve_threshold_counting_passes(z, k: int, regularization: float,
                                    p: float, magnitude: bool):
  """Solves F(t) = k row by row (see the module docstring).

  Args:
    z: [..., N] float32 or float64 values (for `magnitude`, z = |x| >= 0).
    k: number of entries to select, 1 <= k < N.
    regularization: l > 0.
    p: regularisation exponent, p > 1.
    magnitude: solve the top-k-in-magnitude equation instead of the mask one.

  Returns:
    (t, passes): t [..., 1], the threshold τ (mask) or block value γ
    (magnitude), NaN on rows with a non-finite entry; passes, the number of
    solver passes over the data (after the bracket), the same for all rows.
    Not differentiable by itself: `topk.py` wraps it in a custom JVP.
  """
  lo, hi = _initial_bracket(z, k, regularization, magnitude)
  finite = jnp.all(jnp.isfinite(z), axis=-1, keepdims=True)
  tol, res_tol = _tolerances(z, k, lo, hi, regularization, magnitude)
  if magnitude:
    # With at most k nonzero magnitudes the solution is γ = 0 (keep them all).
    nonzero = jnp.sum((z > 0).astype(z.dtype), axis=-1, keepdims=True)
    trivial = nonzero <= k
  else:
    nonzero, trivial = None, jnp.zeros_like(finite)
  t = jnp.where(trivial, 0.0, lo)
  unknown = jnp.full_like(t, jnp.nan)
  init = _SolverState(t=t, lo=lo, hi=hi, res_lo=unknown, res_hi=unknown,
                      fell_back=jnp.zeros_like(finite), done=~finite | trivial,
                      passes=jnp.int32(0))
  problem = _Problem(z=z, k=k, regularization=regularization, p=p,
                     magnitude=magnitude, tol=tol, res_tol=res_tol,
                     nonzero=nonzero)
  final = jax.lax.while_loop(
      _running, functools.partial(_solver_pass, problem), init)
  return jnp.where(finite, final.t, jnp.nan), final.passes
