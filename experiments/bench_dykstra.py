"""The paper's solver comparison: exact threshold solver vs Dykstra (p = 2).

Command (2-core CPU; --scale small about 1 minute, --scale full about
30 minutes):

    python experiments/bench_dykstra.py [--scale small|full] [--out DIR]

For `topk_mask` and `topk_magnitude` with p = 2, k = max(1, n // 10) and
x ~ N(0, 1) (float32), compares `solver="exact"` (our threshold root-find,
exact to float tolerance) with `solver="dykstra"` (the paper's Dykstra
projections for the isotonic problem) at 10, 50, 100 and 500 iterations:

* time: median milliseconds of the jitted forward over --repeats (>= 10) runs
  after compilation (`block_until_ready`); a call slower than --max-seconds
  is timed once (timed_runs = 1, `*` in the table), one slower than 4x that
  is not timed (`-`);
* error: max |dykstra(x) - exact(x)| over all entries.

Shapes: one row x[n] ("unbatched") for every n in --sizes and --batch-size
rows x[B, n] ("batched") for every n in --batched-sizes.

* small: n in (32, 1e3, 1e4) unbatched, 32 rows of n in (32, 1e3) batched;
* full: n in (32, 1e3, 1e4, 1e5, 1e6) unbatched, 256 rows of n in
  (32, 1e3, 1e4) batched.

Writes results.json, results.md and time_vs_n.png / error_vs_n.png (log-log,
one line per solver and iteration count; panels: operator x layout).
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
import timing

OPERATORS = {"topk_mask": ops.topk_mask, "topk_magnitude": ops.topk_magnitude}
LAYOUTS = ("unbatched", "batched")
PRESETS = {
    "small": {"sizes": (32, 10**3, 10**4), "batched_sizes": (32, 10**3),
              "batch_size": 32},
    "full": {"sizes": (32, 10**3, 10**4, 10**5, 10**6),
             "batched_sizes": (32, 10**3, 10**4), "batch_size": 256},
}
ITERATIONS = (10, 50, 100, 500)
# Errors at or below this are drawn at it on the log axis (float32 rounding).
ERROR_FLOOR = 1e-8


def solvers(operator: str, k: int, regularization: float,
            iterations) -> dict[str, tuple]:
  """label -> (num_iter or None for exact, jitted forward of x)."""
  base = functools.partial(OPERATORS[operator], k=k,
                           regularization=regularization, p=2.0)
  fns = {"exact": (None, base)}
  fns |= {f"dykstra {it}": (it, functools.partial(
      base, solver="dykstra", num_iter=it)) for it in iterations}
  return {label: (it, jax.jit(fn)) for label, (it, fn) in fns.items()}


def measure_case(operator: str, layout: str, shape, args) -> list[dict]:
  """Times every solver on one input and measures its error vs exact.

  Args:
    operator: "topk_mask" or "topk_magnitude".
    layout: "unbatched" or "batched".
    shape: (n,) or (B, n).
    args: parsed flags (regularization, iterations, repeats, max_seconds).

  Returns:
    One result dict per solver.
  """
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  n = shape[-1]
  k = max(1, n // 10)
  fns = solvers(operator, k, args.regularization, args.iterations)
  exact = fns["exact"][1](x)
  rows = []
  for label, (num_iter, fn) in fns.items():
    error = float(jnp.max(jnp.abs(fn(x) - exact)))
    ms, marker = timing.time_ms(fn, x, args.repeats, args.max_seconds)
    rows.append({
        "operator": operator, "layout": layout,
        "rows": int(np.prod(shape[:-1])), "n": n, "k": k, "solver": label,
        "num_iter": num_iter, "time_ms": ms,
        "timed_runs": {"": args.repeats, "*": 1, "-": 0}[marker],
        "max_abs_error": error})
    print(f"{operator} {layout} {shape} {label}: "
          f"{'-' if ms is None else f'{ms:.3f}'} ms{marker}, "
          f"error {error:.2e}", flush=True)
  return rows


def cases(args):
  """(layout, shape) for every benchmarked input."""
  return ([("unbatched", (n,)) for n in args.sizes] +
          [("batched", (args.batch_size, n)) for n in args.batched_sizes])


def _time_cell(row) -> str:
  if row["time_ms"] is None:
    return "-"
  return f"{row['time_ms']:.3g}" + ("*" if row["timed_runs"] == 1 else "")


def solver_labels(config) -> list[str]:
  """["exact", "dykstra <iterations>", ...] in the benchmark's order."""
  return ["exact"] + [f"dykstra {it}" for it in config["iterations"]]


def _by_shape(rows) -> dict:
  """(operator, shape name, k) -> {solver label: row}."""
  groups = {}
  for row in rows:
    shape = (f"x[{row['n']}]" if row["layout"] == "unbatched"
             else f"x[{row['rows']}, {row['n']}]")
    key = (row["operator"], shape, row["k"])
    groups.setdefault(key, {})[row["solver"]] = row
  return groups


def to_markdown(results) -> str:
  """One table row per (operator, shape): time and error of every solver."""
  cfg = results["config"]
  dykstra = solver_labels(cfg)[1:]
  header = ["operator", "shape", "k", "exact ms"]
  header += [f"{label} {what}" for label in dykstra
             for what in ("ms", "max err")]
  table = []
  for (operator, shape, k), by_solver in _by_shape(results["rows"]).items():
    cells = [operator, shape, k, _time_cell(by_solver["exact"])]
    for label in dykstra:
      cells += [_time_cell(by_solver[label]),
                f"{by_solver[label]['max_abs_error']:.1e}"]
    table.append(cells)
  return "\n\n".join([
      f"Device: {cfg['device']}, jax {cfg['jax']}; p = 2, λ = "
      f"{cfg['regularization']}, k = max(1, n // 10), x ~ N(0, 1) float32. "
      f"Median ms of the jitted forward over {cfg['repeats']} runs after "
      "compilation (`*`: timed once, `-`: not timed); max err = "
      "max |dykstra - exact|.",
      results_io.markdown_table(header, table),
  ])


def _series(rows, operator, layout, solver, key):
  chosen = [r for r in rows if (r["operator"], r["layout"], r["solver"]) ==
            (operator, layout, solver) and r[key] is not None]
  return [r["n"] for r in chosen], [r[key] for r in chosen]


def _plot_panel(ax, rows, operator, layout, key, labels):
  """One line per solver; False when the panel has no data."""
  plotted = False
  for label in labels:
    n, values = _series(rows, operator, layout, label, key)
    if not n:
      continue
    if key == "max_abs_error":
      values = np.maximum(values, ERROR_FLOOR)
    style = dict(color="black", linewidth=2) if label == "exact" else {}
    ax.plot(n, values, marker="o", label=label, **style)
    plotted = True
  return plotted


def figure(results, key: str, ylabel: str):
  """Log-log `key` vs n; rows: operators, columns: layouts."""
  cfg = results["config"]
  labels = solver_labels(cfg)
  fig, axes = results_io.new_figure(len(OPERATORS), len(LAYOUTS))
  for i, operator in enumerate(OPERATORS):
    for j, layout in enumerate(LAYOUTS):
      ax = axes[i, j]
      rows_note = f" ({cfg['batch_size']} rows)" if layout == "batched" else ""
      ax.set_title(f"{operator}, {layout}{rows_note}")
      if not _plot_panel(ax, results["rows"], operator, layout, key, labels):
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        continue
      ax.set(xscale="log", yscale="log", xlabel="n", ylabel=ylabel)
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize="small")
  return fig


def parse_args(argv=None):
  """Flags; sizes not given on the command line come from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__)
  parser.add_argument("--sizes", type=int, nargs="+", default=None,
                      help="n of the unbatched rows (default: from --scale)")
  parser.add_argument("--batched-sizes", type=int, nargs="*", default=None,
                      help="n of the batched inputs (default: from --scale)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="rows of the batched inputs (default: from --scale)")
  parser.add_argument("--iterations", type=int, nargs="+",
                      default=list(ITERATIONS))
  parser.add_argument("--regularization", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--max-seconds", type=float, default=None,
                      help="time budget per call (default: 2 small, 60 full)")
  args = parser.parse_args(argv)
  for name, value in PRESETS[args.scale].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.max_seconds is None:
    args.max_seconds = 2.0 if args.scale == "small" else 60.0
  if args.repeats < 10:
    raise ValueError(f"--repeats must be >= 10, got {args.repeats}")
  return args


def main(argv=None):
  """Runs the benchmark; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  rows = [row for operator in OPERATORS for layout, shape in cases(args)
          for row in measure_case(operator, layout, shape, args)]
  results = {
      "config": {"scale": args.scale, "p": 2.0,
                 "regularization": args.regularization,
                 "k": "max(1, n // 10)", "iterations": list(args.iterations),
                 "sizes": list(args.sizes),
                 "batched_sizes": list(args.batched_sizes),
                 "batch_size": args.batch_size, "repeats": args.repeats,
                 "max_seconds": args.max_seconds,
                 "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__},
      "rows": rows,
      "runtime_seconds": time.perf_counter() - start,
  }
  figures = {"time_vs_n.png": figure(results, "time_ms", "forward ms"),
             "error_vs_n.png": figure(results, "max_abs_error",
                                      "max |dykstra - exact|")}
  return results_io.write_results(args.out, results, to_markdown(results),
                                  figures)


if __name__ == "__main__":
  main()
