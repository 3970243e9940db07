"""A tour of the sparse top-k operators in one minute on a laptop CPU.

Command:

    python experiments/demo_operators.py

Expected output (seconds, deterministic): the soft top-2 mask of the paper's
Figure-1 input x(s) = (3, 1, -1 + s, s) for a few s, exact zeros included, the
top-k in magnitude of a small vector, a V-MoE-style router gate on random
logits with its support size, and the gradient that reaches the router logits
(zero for the hard top-k, nonzero for the sparse soft top-k).
"""
import jax
import jax.numpy as jnp
import numpy as np

from moe import ops


def _fmt(values) -> str:
  return "[" + ", ".join(f"{v:6.3f}" for v in np.asarray(values) + 0.0) + "]"


def main():
  print("topk_mask(x(s), k=2, regularization=0.6) for x(s) = (3, 1, -1+s, s)")
  print(f"{'s':>5} | {'hard':^34} | {'p=2':^34} | {'p=4/3':^34}")
  for s in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
    x = jnp.array([3.0, 1.0, -1.0 + s, s])
    cells = [ops.hard_topk_mask(x, 2)] + [
        ops.topk_mask(x, 2, regularization=0.6, p=p) for p in (2.0, 4 / 3)]
    print(f"{s:5.1f} | " + " | ".join(_fmt(c) for c in cells))

  x = jnp.array([2.0, -1.5, 1.3, 1.2, -0.2, 0.1])
  print("\ntopk_magnitude(x, k=3, regularization=0.5)")
  print(f"  x              {_fmt(x)}")
  print(f"  hard           {_fmt(ops.hard_topk_magnitude(x, 3))}")
  for p in (2.0, 4 / 3):
    print(f"  soft p={p:<8.3g}{_fmt(ops.topk_magnitude(x, 3, regularization=0.5, p=p))}")

  logits = jax.random.normal(jax.random.key(0), (8, 16))  # 8 tokens, 16 experts.
  gates = ops.topk_mask(logits, 2, regularization=0.3)
  support = np.asarray((gates > 0).sum(-1))
  print(f"\nrouter: 8 tokens x 16 experts, k=2: gates sum to "
        f"{_fmt(gates.sum(-1))}\n  experts per token {support.tolist()}")
  target = jax.random.normal(jax.random.key(1), (8, 16))
  for name, gate in (("hard", ops.hard_topk_mask),
                     ("sparse soft", lambda z, k: ops.topk_mask(z, k, regularization=0.3))):
    grad = jax.grad(lambda z: jnp.sum(gate(z, 2) * target))(logits)
    print(f"  |d loss / d logits| through the {name:>11} mask: "
          f"{float(jnp.abs(grad).sum()):.4f}")


if __name__ == "__main__":
  main()
