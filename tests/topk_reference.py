"""Independent numpy references for the top-k operators (float64).

These follow the *isotonic* formulations of docs/design.md §2 literally: sort,
pool adjacent violators over blocks, solve each block's value by bisection.
They share no code or formula with moe.ops (which uses one threshold per
row), so agreement is evidence that both are right.
"""
import numpy as np


def _sign_power(u, power):
  return np.sign(u) * np.abs(u) ** power


def _bisect_increasing(fn, lo, hi, iters=200):
  """Root of a non-decreasing scalar function on [lo, hi]."""
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if fn(mid) < 0:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def pav_decreasing(block_derivative, n, lo, hi):
  """PAV for min_{v_1 >= ... >= v_n} Σ_i φ_i(v_i), φ_i convex.

  Args:
    block_derivative: (indices, γ) -> Σ_{i in indices} φ_i'(γ), non-decreasing
      in γ.
    n: number of coordinates.
    lo, hi: a range that contains every block's optimum.

  Returns:
    v: [n] the isotonic solution.
  """
  blocks = []  # (start, stop, value)
  for i in range(n):
    start, stop = i, i + 1
    value = _bisect_increasing(
        lambda g, a=start, b=stop: block_derivative(np.arange(a, b), g), lo, hi)
    while blocks and blocks[-1][2] < value:  # v_prev >= v_cur is violated.
      start = blocks.pop()[0]
      value = _bisect_increasing(
          lambda g, a=start, b=stop: block_derivative(np.arange(a, b), g),
          lo, hi)
    blocks.append((start, stop, value))
  v = np.empty(n)
  for start, stop, value in blocks:
    v[start:stop] = value
  return v


def topk_mask(x, k, l, p):
  """Soft top-k mask of a 1-D array via the permutahedron's isotonic dual.

  y = ∇Ω*(x - v∘σ⁻¹) with Ω = (l/p)|·|^p, v = argmin_{v decreasing}
  Σ Ω*(x_σ(i) - v_i) + w_i v_i, w = (1,..,1,0,..,0) with k ones.
  """
  x = np.asarray(x, np.float64)
  n, q = x.size, p / (p - 1.0)
  order = np.argsort(-x, kind="stable")
  xs = x[order]
  w = (np.arange(n) < k).astype(np.float64)
  grad_conj = lambda u: _sign_power(u / l, q - 1.0)
  # d/dγ [Ω*(x - γ) + w γ] = -∇Ω*(x - γ) + w.
  deriv = lambda idx, g: np.sum(w[idx] - grad_conj(xs[idx] - g))
  span = np.abs(xs).max() + l + 1.0
  v = pav_decreasing(deriv, n, -2 * span, 2 * span)
  y = np.empty(n)
  y[order] = grad_conj(xs - v)
  return y


def topk_magnitude(x, k, l, p):
  """Soft top-k in magnitude of a 1-D array (docs/design.md §2, literally).

  v = argmin_{v decreasing} Σ (1/q)|s_i - v_i|^q + (l^(q-1)/2) w_i v_i² on
  s = |x| sorted descending; output sign(x) (((s - v)/l)^(q-1) + (s - v)).
  """
  x = np.asarray(x, np.float64)
  n, q = x.size, p / (p - 1.0)
  s = np.abs(x)
  order = np.argsort(-s, kind="stable")
  ss = s[order]
  w = (np.arange(n) < k).astype(np.float64)
  deriv = lambda idx, g: np.sum(
      -_sign_power(ss[idx] - g, q - 1.0) + l ** (q - 1.0) * w[idx] * g)
  v = pav_decreasing(deriv, n, -1.0, ss.max() + 1.0)
  out = np.empty(n)
  out[order] = _sign_power((ss - v) / l, q - 1.0) + (ss - v)
  return np.sign(x) * out


def isotonic_decreasing(y, w):
  """Weighted L2 isotonic regression (non-increasing) of a 1-D array."""
  y, w = np.asarray(y, np.float64), np.asarray(w, np.float64)
  deriv = lambda idx, g: np.sum(w[idx] * (g - y[idx]))
  return pav_decreasing(deriv, y.size, y.min() - 1.0, y.max() + 1.0)
