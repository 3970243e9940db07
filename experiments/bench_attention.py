"""Speed of the attention sparsities: forward + backward of one attention layer.

Command (2-core CPU, about 2 minutes; --quick about 20 seconds):

    python experiments/bench_attention.py [--quick] [--p 4/3] [--out DIR]

For each sequence length L and each `moe.nn.attention.SPARSITIES` variant
(causal, as in the decoder of sparse attention post-training): median
milliseconds over --repeats runs after compilation (`block_until_ready`) of
the jitted gradient of mean(y²) with respect to the parameters and the input
of `SelfAttention` at train time (gates sampled, rng "dropout"), and the
ratio to "dense" at the same L. The variants of one L are timed in turns
within every repeat, so that the load of a shared machine hits them alike.
Shapes: D=128, H=4, k=8 keys per query, λ=0.1, p=--p (4/3); B=8 at L in (11,
197), B=2 at L=1024 (--quick: L in (11, 197) only). The target:
sparse_topk within 2x of dense at L=197.

Writes results.json and results.md (`results_io.py`).
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe.nn import attention

import results_io

WIDTH, HEADS, KEYS_PER_QUERY = 128, 4, 8
# (L, B): a smaller batch at L=1024 keeps the script to minutes on 2 cores.
CASES = ((11, 8), (197, 8), (1024, 2))
QUICK_CASES = CASES[:2]


def _fraction(text: str) -> float:
  """'4/3' -> 1.333..., '2' -> 2.0."""
  numerator, _, denominator = text.partition("/")
  return float(numerator) / float(denominator or 1)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__, with_scale=False)
  parser.add_argument("--quick", action="store_true",
                      help="L in (11, 197) only")
  parser.add_argument("--lengths", type=int, nargs="+", default=None,
                      help="override the sequence lengths")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="override the batch size of every length")
  parser.add_argument("--sparsities", nargs="+", default=attention.SPARSITIES,
                      choices=attention.SPARSITIES)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--p", type=_fraction, default=4 / 3,
                      help="p of sparse_topk, e.g. 4/3 or 2")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if "dense" not in args.sparsities:
    parser.error("--sparsities must include 'dense' (the ratio's baseline)")
  return args


def cases(args) -> list[tuple[int, int]]:
  """(L, B) pairs to time."""
  pairs = list(QUICK_CASES if args.quick else CASES)
  if args.lengths is not None:
    batch = dict(CASES)
    pairs = [(length, batch.get(length, 8)) for length in args.lengths]
  if args.batch_size is not None:
    pairs = [(length, args.batch_size) for length, _ in pairs]
  return pairs


def step(sparsity: str, length: int, batch: int, p: float = 4 / 3):
  """(jitted forward + backward of (params, x), its arguments)."""
  module = attention.SelfAttention(
      num_heads=HEADS, sparsity=sparsity, causal=True,
      keys_per_query=KEYS_PER_QUERY, p=p)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (batch, length, WIDTH)), jnp.float32)
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]

  def loss(params, x):
    y, _ = module.apply({"params": params}, x, train=True,
                        rngs={"dropout": jax.random.key(1)})
    return jnp.mean(y ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
  """Median milliseconds of each compiled fn(), timed in turns.

  The variants of one length run one after another within every repeat, so
  that a change of machine load (this CPU is shared) affects them alike and
  the ratios stay meaningful.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compile.
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def measure(args) -> list[dict]:
  """One row per (L, sparsity): B, ms and the ratio to dense."""
  rows = []
  sparsities = ("dense",) + tuple(s for s in args.sparsities if s != "dense")
  for length, batch in cases(args):
    fns = {}
    for sparsity in sparsities:
      fn, (params, x) = step(sparsity, length, batch, args.p)
      fns[sparsity] = functools.partial(fn, params, x)
    ms = interleaved_ms(fns, args.repeats)
    for sparsity in sparsities:
      rows.append({"length": length, "batch_size": batch,
                   "sparsity": sparsity, "ms": ms[sparsity],
                   "ratio_to_dense": ms[sparsity] / ms["dense"]})
      print(f"L={length} B={batch} {sparsity}: {ms[sparsity]:.2f} ms, "
            f"{rows[-1]['ratio_to_dense']:.2f}x dense", flush=True)
  return rows


def to_markdown(results) -> str:
  config = results["config"]
  table = results_io.markdown_table(
      ["L", "B", "sparsity", "fwd+bwd ms", "vs dense"],
      [[row["length"], row["batch_size"], row["sparsity"],
        row["ms"], row["ratio_to_dense"]] for row in results["rows"]],
      float_format=".2f")
  return (f"Device: {config['device']}, jax {config['jax']}; D={WIDTH}, "
          f"H={HEADS}, k={KEYS_PER_QUERY}, p={config['p']:.4g}, causal, "
          f"train mode; median of "
          f"{config['repeats']} runs.\n\n{table}")


def main(argv=None):
  """Runs the benchmark; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  rows = measure(args)
  results = {
      "config": {"width": WIDTH, "heads": HEADS,
                 "keys_per_query": KEYS_PER_QUERY, "causal": True,
                 "p": args.p,
                 "cases": cases(args), "repeats": args.repeats,
                 "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__},
      "rows": rows,
      "runtime_seconds": time.perf_counter() - start,
  }
  return results_io.write_results(args.out, results, to_markdown(results), {})


if __name__ == "__main__":
  main()
