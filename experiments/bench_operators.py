"""Speed and memory of the top-k operators: a markdown table.

Command (2-core CPU, ~10 minutes for everything; --quick in ~1 minute):

    python experiments/bench_operators.py [--quick] [--out results.md]

For each shape and operator: median milliseconds over >= 10 runs after
compilation (`block_until_ready`), forward and forward+backward (gradient of
<w, op(x)> for a fixed random w). Shapes: the router x[T, 32], k = 2, and the
pruning vector x[n], k = n / 10. Operators: exact p = 2 and p = 4/3 (the
threshold solver), Dykstra (p = 2, 100 iterations), hard top-k and the
baselines. A call slower than --max-seconds is timed once and marked `*`;
one slower still than 4x that is skipped (`-`). Baselines whose memory grows
as k * n or iterations * n are not run beyond 2e7 elements of work. Peak memory is XLA's own
accounting of the compiled forward+backward (arguments + outputs + temporaries).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from moe import ops
from moe.ops import baselines

from timing import time_ms


# Memory the baselines need grows with k * n (Gumbel: k successive softmaxes)
# or iterations/samples * n (entropic, perturbed); above this many elements of
# work they are left out of the table (listed as "not run").
_MAX_WORK = 2 * 10**7
_WORK = {"gumbel_topk": lambda n, k: k * n,
         "entropic_topk (100 it)": lambda n, k: 100 * n,
         "perturbed_topk (100 s)": lambda n, k: 100 * n}


def _feasible(name: str, n: int, k: int) -> bool:
  return _WORK.get(name, lambda n, k: 0)(n, k) <= _MAX_WORK


def _operators(k: int):
  """name -> function of x (forward only)."""
  key = jax.random.key(0)
  return {
      "exact p=2": lambda x: ops.topk_mask(x, k, p=2.0),
      "exact p=4/3": lambda x: ops.topk_mask(x, k, p=4 / 3),
      "dykstra p=2 (100 it)": lambda x: ops.topk_mask(
          x, k, p=2.0, solver="dykstra", num_iter=100),
      "hard_topk_mask": lambda x: ops.hard_topk_mask(x, k),
      "lax.top_k (values)": lambda x: jax.lax.top_k(x, k)[0],
      "softmax_topk": lambda x: baselines.softmax_topk(x, k),
      "gumbel_topk": lambda x: baselines.gumbel_topk(x, k, key=key),
      "entropic_topk (100 it)": lambda x: baselines.entropic_topk(x, k),
      "perturbed_topk (100 s)": lambda x: baselines.perturbed_topk(
          x, k, key=key),
  }


def _magnitude_operators(k: int):
  return {
      "magnitude exact p=2": lambda x: ops.topk_magnitude(x, k, p=2.0),
      "magnitude exact p=4/3": lambda x: ops.topk_magnitude(x, k, p=4 / 3),
      "magnitude dykstra p=2 (100 it)": lambda x: ops.topk_magnitude(
          x, k, p=2.0, solver="dykstra", num_iter=100),
      "hard_topk_magnitude": lambda x: ops.hard_topk_magnitude(x, k),
  }


def _with_backward(fn, x):
  """x -> gradient of <w, fn(x)> for a fixed random w of fn's output shape."""
  out = jax.eval_shape(fn, x)
  w = jax.random.normal(jax.random.key(2), out.shape, out.dtype)
  return jax.grad(lambda z: jnp.vdot(w, fn(z)))


def peak_bytes(fn, x) -> int:
  stats = jax.jit(fn).lower(x).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes +
          stats.temp_size_in_bytes)


def _cell(value, marker):
  return marker if value is None else f"{value:.2f}{marker}"


def run(quick: bool, repeats: int, max_seconds: float):
  rows = []
  key = jax.random.key(1)
  router_sizes = (1024, 16384) if quick else (1024, 16384, 65536)
  prune_sizes = (10**4, 10**5) if quick else (10**4, 10**5, 10**6, 10**7)
  cases = [(f"x[{t}, 32], k=2", (t, 32), 2, _operators(2))
           for t in router_sizes]
  cases += [(f"x[{n:.0e}], k={n // 10:.0e}", (n,), n // 10,
             _operators(n // 10) | _magnitude_operators(n // 10))
            for n in prune_sizes]
  for shape_name, shape, k, operators in cases:
    x = jax.random.normal(key, shape, jnp.float32)
    for name, fn in operators.items():
      if not _feasible(name, x.size, k):
        rows.append((shape_name, name, "not run", "not run"))
        continue
      fwd = jax.jit(fn)
      bwd = jax.jit(_with_backward(fn, x))
      f_ms, f_mark = time_ms(fwd, x, repeats, max_seconds)
      b_ms, b_mark = time_ms(bwd, x, repeats, max_seconds)
      rows.append((shape_name, name, _cell(f_ms, f_mark), _cell(b_ms, b_mark)))
      print(f"| {' | '.join(rows[-1])} |", flush=True)
  memory = []
  n = prune_sizes[-1]
  x = jnp.zeros((n,), jnp.float32)
  for name, fn in _magnitude_operators(n // 10).items():
    if "dykstra" in name:
      continue
    memory.append((name, peak_bytes(_with_backward(fn, x), x) / 2**20))
  return rows, memory, n


def to_markdown(rows, memory, n) -> str:
  lines = [f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}.",
           "",
           "| shape | operator | forward ms | forward+backward ms |",
           "|---|---|---:|---:|"]
  lines += [f"| {' | '.join(r)} |" for r in rows]
  lines += ["", f"Peak memory, forward+backward at n = {n:.0e} (float32 input "
            f"= {4 * n / 2**20:.0f} MiB):", "", "| operator | MiB |", "|---|---:|"]
  lines += [f"| {name} | {mib:.0f} |" for name, mib in memory]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="small shapes only (about a minute)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--max-seconds", type=float, default=2.0)
  parser.add_argument("--out", default=None, help="also write the table here")
  args = parser.parse_args()
  if args.repeats < 10:
    raise ValueError(f"--repeats must be >= 10, got {args.repeats}")
  rows, memory, n = run(args.quick, args.repeats, args.max_seconds)
  table = to_markdown(rows, memory, n)
  print()
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
