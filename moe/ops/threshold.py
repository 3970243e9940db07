"""The one scalar per row that defines the regularised top-k operators.

Both regularised top-k operators of DESIGN.md §2 reduce, row by row, to a
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


def _safe_pow(d, power: float, where):
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


def _stats(z, t, k, regularization: float, p: float, magnitude: bool):
  del k
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
  db = jnp.where(partial, d, 0.0)
  # Both counts in one column, |capped| * (N + 1) + |partial|, while exact.
  base = z.shape[-1] + 1
  packed = base * base < 2 ** (jnp.finfo(z.dtype).nmant + 1)
  if packed:
    counts = [jnp.where(capped, float(base), partial.astype(z.dtype))]
  else:
    counts = [capped.astype(z.dtype), partial.astype(z.dtype)]
  if r == 3.0:
    sq = db * db
    powers = [db, sq, sq * db]
  elif r == 1.0:
    powers = [db]
  else:
    powers = [db, _safe_pow(d, r, partial), _safe_pow(d, r - 1.0, partial)]
  sums = _row_sums(counts + powers)
  if packed:
    num_capped = jnp.floor(sums[0] / base)
    num_partial, sums = sums[0] - base * num_capped, sums[1:]
  else:
    (num_capped, num_partial), sums = sums[:2], sums[2:]
  s1 = sums[0]
  zero = jnp.zeros_like(t)
  if r == 3.0:
    s2, s3 = sums[1], sums[2]
    s_r, s_r1 = s3, s2
  elif r == 1.0:
    s2 = s3 = zero
    s_r, s_r1 = s1, num_partial
  else:
    s2 = s3 = zero
    s_r, s_r1 = sums[1], sums[2]
  return _Stats(num_capped=num_capped, num_partial=num_partial,
                s1=s1, s2=s2, s3=s3, s_r=s_r, s_r1=s_r1)


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


def _kth_largest(z, k: int):
  """The k-th largest entry along the last axis, counting repeats.

  k passes of (max below the last value, count of it): cheaper than
  `lax.top_k` or argmax for the small k this is used for.
  """
  value = jnp.max(z, axis=-1, keepdims=True)
  seen = jnp.sum((z == value).astype(z.dtype), axis=-1, keepdims=True)
  for _ in range(k - 1):
    below = jnp.max(jnp.where(z < value, z, -jnp.inf), axis=-1, keepdims=True)
    count = jnp.sum((z == below).astype(z.dtype), axis=-1, keepdims=True)
    value = jnp.where(seen >= k, value, below)
    seen = jnp.where(seen >= k, seen, seen + count)
  return value


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
  r = exponent(p)
  lo, hi = _initial_bracket(z, k, regularization, magnitude)
  finite = jnp.all(jnp.isfinite(z), axis=-1, keepdims=True)
  eps = jnp.finfo(z.dtype).eps
  scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  if not magnitude:
    scale = scale + regularization
  tol = 4.0 * eps * scale
  if magnitude:
    # With at most k nonzero magnitudes the solution is γ = 0 (keep them all).
    nonzero = jnp.sum((z > 0).astype(z.dtype), axis=-1, keepdims=True)
    trivial = nonzero <= k
  else:
    trivial = jnp.zeros_like(finite)
  done = ~finite | trivial
  t = jnp.where(trivial, 0.0, lo)

  unknown = jnp.full_like(t, jnp.nan)
  # Mask: the output moves by at most |F - k| when t moves, so stopping at the
  # rounding error of F is exact for every digit shown. Magnitude: the output
  # has a linear term (s - γ) that does not vanish with F - k on a flat
  # stretch of F, so only an exact residual (or the step/bracket tests) stops.
  res_tol = 0.0 if magnitude else (
      4.0 * eps * k * max(1, math.ceil(math.log2(z.shape[-1]))))
  scale_r = regularization ** r

  def cond(state):
    done, it = state[4], state[-1]
    return (it < _MAX_ITER) & ~jnp.all(done)

  def body(state):
    t, lo, hi, (res_lo, res_hi, fell_back), done, it = state
    st = _stats(z, t, k, regularization, p, magnitude)
    c = scale_r * (k - st.num_capped)
    c0, c1 = (c * t, c) if magnitude else (c, jnp.zeros_like(c))
    # res = F(t) - k. For the magnitude F is scaled by 1/t; at t = 0 every
    # nonzero entry is capped (more than k of them on rows still running).
    if magnitude:
      positive = t > 0
      res = jnp.where(positive, (st.s_r - c0) / (scale_r * jnp.where(
          positive, t, 1.0)), nonzero - k)
    else:
      positive = jnp.ones_like(done)
      res = (st.s_r - c0) / scale_r
    at_least_k = res >= 0
    lo_new, res_lo = jnp.where(at_least_k, t, lo), jnp.where(at_least_k, res, res_lo)
    hi_new, res_hi = jnp.where(at_least_k, hi, t), jnp.where(at_least_k, res_hi, res)
    cand = t + _segment_step(st, c0, c1, p)
    inside = (cand >= lo_new) & (cand <= hi_new)
    # A step must land strictly inside the bracket: a step back onto an end
    # that was already evaluated means the segment was the wrong one. Then
    # fall back to regula falsi on the bracket (the root often sits next to a
    # breakpoint), and to bisection every other time so the bracket halves.
    interior = lambda v: (v > lo_new) & (v < hi_new)
    secant = lo_new + (hi_new - lo_new) * res_lo / (res_lo - res_hi)
    use_secant = ~fell_back & interior(secant)
    fallback = jnp.where(use_secant, secant, 0.5 * (lo_new + hi_new))
    converged = inside & (jnp.abs(cand - t) <= tol)
    bracket_done = hi_new - lo_new <= tol
    nxt = jnp.where(interior(cand), cand, fallback)
    nxt = jnp.where(converged | bracket_done, jnp.where(inside, cand, t), nxt)
    # F(t) = k to the rounding error of the sum F itself: t is a root for
    # every digit the output can show.
    exact = (jnp.abs(res) <= res_tol) & positive
    t = jnp.where(done | exact, t, nxt)
    fell_back = ~interior(cand) & ~fell_back
    done = done | converged | bracket_done | exact
    return (t, jnp.where(done, lo, lo_new), jnp.where(done, hi, hi_new),
            (res_lo, res_hi, fell_back), done, it + 1)

  init = (t, lo, hi, (unknown, unknown, jnp.zeros_like(done)), done,
          jnp.int32(0))
  final = jax.lax.while_loop(cond, body, init)
  return jnp.where(finite, final[0], jnp.nan), final[-1]
