"""Wall-clock timing of jitted functions, shared by the benchmarks."""
from __future__ import annotations

import statistics
import time

import jax


def time_ms(fn, x, repeats: int, max_seconds: float):
  """Median milliseconds of fn(x) after compilation, with a time budget.

  Args:
    fn: a (jitted) function of one array.
    x: its input.
    repeats: timed runs (>= 10 for a reported median).
    max_seconds: a run slower than this is timed once; one slower than 4x
      this is not timed at all.

  Returns:
    (ms, marker): the median over `repeats` runs and "", or one run and "*",
    or (None, "-") when skipped.
  """
  jax.block_until_ready(fn(x))  # Compile.
  start = time.perf_counter()
  jax.block_until_ready(fn(x))
  once = time.perf_counter() - start
  if once > 4 * max_seconds:
    return None, "-"
  if once > max_seconds:
    return 1e3 * once, "*"
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), ""
