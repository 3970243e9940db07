"""Argument validation shared by every top-k operator.

Each check raises a `ValueError` whose message names the argument and the
allowed values, so that a bad call fails at trace time with a clear message.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp


def check_floating(x, name: str = "x") -> jnp.ndarray:
  """Returns `x` as an array, or raises if its dtype is not floating point."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating dtype (float32, bfloat16, float16 or "
        f"float64), got dtype {x.dtype}.")
  if x.ndim == 0:
    raise ValueError(f"{name} must have at least one axis, got a scalar.")
  return x


def check_axis(axis, ndim: int) -> int:
  """Returns `axis` normalised to 0..ndim-1, or raises."""
  if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
    raise ValueError(f"axis must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"axis must be in [{-ndim}, {ndim - 1}] for an input with {ndim} "
        f"axes, got {axis}.")
  return int(axis) % ndim


def check_nonempty(x, axis: int, name: str = "x") -> None:
  """Raises if `x` has no elements along `axis` (already normalised)."""
  if x.shape[axis] == 0:
    raise ValueError(f"{name} has no elements along axis {axis} (shape "
                     f"{tuple(x.shape)}); it needs at least one.")


def check_k(k, n: int) -> int:
  """Returns `k` as a Python int in 1..n, or raises."""
  if not isinstance(k, numbers.Integral) or isinstance(k, bool):
    raise ValueError(f"k must be a Python int in 1..{n} (static), got {k!r}.")
  if not 1 <= k <= n:
    raise ValueError(f"k must be in 1..{n} (the size of the axis), got {k}.")
  return int(k)


def check_positive(value, name: str) -> float:
  """Returns `value` as a float > 0, or raises."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f"{name} must be a Python float > 0, got {value!r}.")
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}.")
  return float(value)


def check_p(p) -> float:
  """Returns the regularisation exponent `p` as a float > 1, or raises."""
  if not isinstance(p, numbers.Real) or isinstance(p, bool):
    raise ValueError(f"p must be a Python float > 1, got {p!r}.")
  if not p > 1 or p == float("inf"):
    raise ValueError(f"p must be a finite float > 1 (e.g. 4/3, 1.5, 2), got {p}.")
  return float(p)


def check_positive_int(value, name: str) -> int:
  """Returns `value` as a Python int >= 1, or raises."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a Python int >= 1, got {value!r}.")
  return int(value)


def check_selection(x, k, axis) -> tuple:
  """Validates (x, k, axis) of a top-k along `axis`.

  Returns:
    (x as an array, k as an int in 1..N, axis normalised to 0..ndim-1).
  """
  x = check_floating(x)
  axis = check_axis(axis, x.ndim)
  check_nonempty(x, axis)
  return x, check_k(k, x.shape[axis]), axis
