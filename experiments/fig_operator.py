"""Figure 1 of the paper: the soft top-k operators along a 1-D path of inputs.

Command (2-core CPU, about 6 seconds):

    python experiments/fig_operator.py [--regularization 0.6] [--num-points 501]
        [--out out/fig_operator]

For k = 2 and x(s) = (3, 1, -1 + s, s), s in [0, 5], the curves are
c(s) = op(x(s))_2 + op(x(s))_3 (the paper's 1-based entries 2 and 3, i.e. the
entries 1 and -1 + s) for the hard operator and the soft ones with p = 2 and
p = 4/3:

* panel (a): op = topk_mask (the paper's Figure 1);
* panel (b): op = topk_magnitude;
* panel (c): dc/ds of panel (b), by forward-mode autodiff (`jax.jvp` along
  dx/ds = (0, 0, 1, 1)).

Expected result (λ = 0.6): the mask curves are exactly 1 on [0, 0.4] and
[4.6, 5] and exactly 0 on [1.6, 3.4] for both p (there the gap between the
2nd and 3rd largest entries is >= λ, whatever p); p = 2 is piecewise linear
(its derivative jumps), p = 4/3 bends smoothly. results.json holds the curves
on a coarse grid, the s-intervals where each curve is exactly 0 and exactly
saturated, and the largest jump of the derivative between neighbouring grid
points (and on a 10x finer grid: a jump of the derivative itself stays, a
continuous derivative's shrinks about 10x).
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe import ops

import results_io

K = 2
S_RANGE = (0.0, 5.0)
PAIR = (1, 2)  # 0-based positions of the paper's entries 2 and 3.
METHODS = {"hard": None, "p=2": 2.0, "p=4/3": 4 / 3}
SOFT = ("p=2", "p=4/3")
KINDS = {"mask": (ops.hard_topk_mask, ops.topk_mask),
         "magnitude": (ops.hard_topk_magnitude, ops.topk_magnitude)}
COARSE_STEP = 0.5
REFINE = 10


def inputs(s):
  """x(s) = (3, 1, -1 + s, s) for every s: [S] -> [S, 4] float32."""
  s = jnp.asarray(s, jnp.float32)
  return jnp.stack([jnp.full_like(s, 3.0), jnp.ones_like(s), s - 1.0, s], -1)


def operator(kind: str, method: str, regularization: float):
  """The function x [S, 4] -> op(x) [S, 4] for a kind and a method.

  Args:
    kind: "mask" or "magnitude".
    method: "hard", "p=2" or "p=4/3".
    regularization: λ of the soft operators.

  Returns:
    The operator along the last axis with k = 2.
  """
  hard, soft = KINDS[kind]
  if METHODS[method] is None:
    return functools.partial(hard, k=K)
  return functools.partial(soft, k=K, regularization=regularization,
                           p=METHODS[method])


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _pair_and_derivative(kind: str, method: str, s, regularization: float):
  x = inputs(s)
  dx_ds = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]), x.shape)
  y, dy = jax.jvp(operator(kind, method, regularization), (x,), (dx_ds,))
  pair = list(PAIR)
  return x[:, pair], y[:, pair], dy[:, pair]


def pair_and_derivative(kind: str, method: str, s, regularization: float):
  """The two curve entries and their s-derivatives (one compiled call).

  Args:
    kind: "mask" or "magnitude".
    method: "hard", "p=2" or "p=4/3".
    s: [S] values of s.
    regularization: λ of the soft operators.

  Returns:
    (x_pair, y_pair, dy_pair), each [S, 2] numpy: the inputs x(s)_2, x(s)_3,
    the operator's entries 2 and 3, and their derivatives d/ds.
  """
  arrays = _pair_and_derivative(kind, method, jnp.asarray(s, jnp.float32),
                                float(regularization))
  return tuple(np.asarray(a) for a in arrays)


def runs(s, flags) -> list[list[float]]:
  """[first s, last s] of every run of consecutive True flags."""
  flags = np.concatenate([[False], np.asarray(flags, bool), [False]])
  edges = np.flatnonzero(np.diff(flags.astype(np.int8)))
  return [[float(s[a]), float(s[b - 1])] for a, b in zip(edges[::2],
                                                         edges[1::2])]


def exact_intervals(kind: str, s, x_pair, y_pair):
  """Where the curve is exactly 0 and where it is exactly saturated.

  Exactly 0: both entries are 0.0. Exactly saturated: each entry is exactly
  0 or exactly its hard value (1 for the mask, x_i for the magnitude) and
  they are not both 0, i.e. the operator acts as a hard selection there.

  Args:
    kind: "mask" or "magnitude".
    s: [S] grid of s, increasing.
    x_pair: [S, 2] the inputs x(s)_2, x(s)_3.
    y_pair: [S, 2] the operator's entries 2 and 3.

  Returns:
    {"zero": [[s_start, s_end], ...], "saturated": [...]}, on the grid.
  """
  full = x_pair if kind == "magnitude" else np.ones_like(x_pair)
  zero = y_pair == 0.0
  hard_like = np.all(zero | (y_pair == full), axis=-1)
  both_zero = np.all(zero, axis=-1)
  return {"zero": runs(s, both_zero),
          "saturated": runs(s, hard_like & ~both_zero)}


def max_jump(s, derivative) -> dict[str, float]:
  """Largest |dc/ds(s_{i+1}) - dc/ds(s_i)| and the midpoint where it occurs."""
  jumps = np.abs(np.diff(derivative))
  i = int(np.argmax(jumps))
  return {"max_jump": float(jumps[i]), "at_s": float(0.5 * (s[i] + s[i + 1]))}


def derivative_jumps(curve, fine_curve) -> dict[str, float]:
  """max_jump of dc/ds on the plotting grid and on the 10x finer one.

  Args:
    curve: (s, c, dc/ds) on the plotting grid.
    fine_curve: the same on the 10x finer grid.

  Returns:
    {"max_jump", "at_s", "max_jump_10x_finer", "at_s_10x_finer"}.
  """
  finer = max_jump(fine_curve[0], fine_curve[2])
  return max_jump(curve[0], curve[2]) | {
      "max_jump_10x_finer": finer["max_jump"], "at_s_10x_finer": finer["at_s"]}


def grids(num_points: int) -> dict[str, np.ndarray]:
  """The s values: plotting grid, coarse table grid, 10x finer grid."""
  return {
      "plot": np.linspace(*S_RANGE, num_points),
      "coarse": np.arange(S_RANGE[0], S_RANGE[1] + COARSE_STEP / 2,
                          COARSE_STEP),
      "fine": np.linspace(*S_RANGE, REFINE * (num_points - 1) + 1),
  }


def evaluate(kind: str, method: str, s_grids, regularization: float):
  """grid name -> (s, x_pair, y_pair, dy_pair), from one call on all grids."""
  bounds = np.cumsum([0] + [len(s) for s in s_grids.values()])
  arrays = pair_and_derivative(kind, method,
                               np.concatenate(list(s_grids.values())),
                               regularization)
  return {name: (s, *(a[lo:hi] for a in arrays))
          for (name, s), lo, hi in zip(s_grids.items(), bounds[:-1],
                                       bounds[1:])}


def _curve(values):
  """(s, x_pair, y_pair, dy_pair) -> (s, c, dc/ds)."""
  s, _, y_pair, dy_pair = values
  return s, y_pair.sum(-1), dy_pair.sum(-1)


def measure(num_points: int, regularization: float):
  """All curves, intervals and derivative jumps (the content of results.json).

  Args:
    num_points: grid points on [0, 5].
    regularization: λ of the soft operators.

  Returns:
    (results, curves): results is the dict written to results.json; curves
    maps (kind, method) -> (s, c, dc/ds) on the plotting grid.
  """
  s_grids = grids(num_points)
  curves, intervals, jumps = {}, {}, {}
  coarse_grid = {"s": s_grids["coarse"], "magnitude_derivative": {}}
  for kind in KINDS:
    coarse_grid[kind], intervals[kind], jumps[kind] = {}, {}, {}
    for method in METHODS:
      values = evaluate(kind, method, s_grids, regularization)
      s, x, y, _ = values["plot"]
      curves[kind, method] = _curve(values["plot"])
      intervals[kind][method] = exact_intervals(kind, s, x, y)
      _, coarse, coarse_derivative = _curve(values["coarse"])
      coarse_grid[kind][method] = coarse
      if kind == "magnitude":
        coarse_grid["magnitude_derivative"][method] = coarse_derivative
      if method in SOFT:
        jumps[kind][method] = derivative_jumps(curves[kind, method],
                                               _curve(values["fine"]))
  results = {
      "config": {"k": K, "regularization": regularization,
                 "num_points": num_points, "s_range": list(S_RANGE),
                 "x(s)": "(3, 1, -1 + s, s)",
                 "curve": "op(x(s))_2 + op(x(s))_3 (1-based entries)",
                 "dtype": "float32"},
      "coarse_grid": coarse_grid,
      "intervals": intervals,
      "derivative_jumps": jumps,
  }
  return results, curves


def _format_intervals(intervals) -> str:
  return " ∪ ".join(f"[{a:.2f}, {b:.2f}]" for a, b in intervals) or "none"


def _curve_table(grid) -> str:
  columns = [(kind, method) for kind in ("mask", "magnitude",
                                         "magnitude_derivative")
             for method in METHODS]
  header = ["s"] + [f"{kind.replace('magnitude_derivative', 'd/ds magnitude')}"
                    f" {method}" for kind, method in columns]
  rows = [[s] + [grid[kind][method][i] for kind, method in columns]
          for i, s in enumerate(grid["s"])]
  return results_io.markdown_table(header, rows, ".3f")


def _interval_table(intervals) -> str:
  rows = [[kind, method, _format_intervals(found["zero"]),
           _format_intervals(found["saturated"])]
          for kind, by_method in intervals.items()
          for method, found in by_method.items()]
  return results_io.markdown_table(
      ["operator", "method", "exactly 0 on", "exactly saturated on"], rows)


def _jump_table(jumps) -> str:
  rows = [[kind, method, jump["max_jump"], jump["at_s"],
           jump["max_jump_10x_finer"]]
          for kind, by_method in jumps.items()
          for method, jump in by_method.items()]
  return results_io.markdown_table(
      ["operator", "method", "max jump", "at s", "max jump, 10x finer grid"],
      rows, ".3g")


def to_markdown(results) -> str:
  """results.md: coarse curves, exact intervals, derivative jumps."""
  cfg = results["config"]
  return "\n\n".join([
      f"k = {cfg['k']}, λ = {cfg['regularization']}, x(s) = {cfg['x(s)']}, "
      f"curve c(s) = {cfg['curve']}, {cfg['num_points']} grid points.",
      _curve_table(results["coarse_grid"]),
      "Where c(s) is exactly 0 / exactly saturated (grid points):",
      _interval_table(results["intervals"]),
      "Largest jump of dc/ds between neighbouring grid points:",
      _jump_table(results["derivative_jumps"]),
  ])


def figure(curves, regularization: float):
  """Panels (a) mask, (b) magnitude, (c) d/ds of (b)."""
  fig, axes = results_io.new_figure(1, 3)
  styles = {"hard": dict(color="black", linestyle="--", linewidth=1.2),
            "p=2": dict(color="tab:blue", linewidth=1.8),
            "p=4/3": dict(color="tab:orange", linewidth=1.8)}
  panels = (("(a) topk_mask", "mask", 1),
            ("(b) topk_magnitude", "magnitude", 1),
            ("(c) d/ds of (b)", "magnitude", 2))
  for ax, (title, kind, column) in zip(axes[0], panels):
    for method, style in styles.items():
      ax.plot(curves[kind, method][0], curves[kind, method][column],
              label="hard" if method == "hard" else f"soft {method}", **style)
    ax.set_title(title)
    ax.set_xlabel("s")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("op(x(s))$_2$ + op(x(s))$_3$")
  axes[0, 0].legend()
  fig.suptitle(f"x(s) = (3, 1, -1+s, s), k = {K}, λ = {regularization}")
  return fig


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--regularization", type=float, default=0.6)
  parser.add_argument("--num-points", type=int, default=501)
  results_io.add_output_flags(parser, __file__, with_scale=False)
  args = parser.parse_args(argv)
  if args.num_points < 3:
    raise ValueError(f"--num-points must be >= 3, got {args.num_points}")
  start = time.perf_counter()
  results, curves = measure(args.num_points, args.regularization)
  results["runtime_seconds"] = time.perf_counter() - start
  return results_io.write_results(
      args.out, results, to_markdown(results),
      {"fig_operator.png": figure(curves, args.regularization)})


if __name__ == "__main__":
  main()
