"""Tokens/s of one MoE layer, forward + backward, per router and dispatcher.

Command (CPU, a few minutes):

  python experiments/bench_moe_layer.py

Shapes: D=384, H=4D, K=2, capacity factor 1.25, E in (8, 32), 2048 tokens in
groups of S=256. Prints one table row per (E, router, dispatcher) with the
step time, tokens/s and the step time relative to NoisyTopExpertsPerItem with
the same E and dispatcher (the target for SparseTopK is <= 1.25x). SoftMoE
has one row per E (its own soft dispatch, in the einsum rows).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe.nn import moe_layer

WIDTH, NUM_TOKENS, GROUP_SIZE, K, CAPACITY_FACTOR = 384, 2048, 256, 2, 1.25
ROUTERS = ("NoisyTopExpertsPerItem", "TopItemsPerExpert", "SparseTopK",
           "SparseTopItemsPerExpert", "SoftMoE")
DISPATCHERS = ("einsum", "index")
# SoftMoE mixes every token into every slot (`dispatch.SoftDispatcher`)
# whatever the layer's dispatcher: timed once, in the einsum rows.
SOFT_ROUTERS = ("SoftMoE",)


def step_time(num_experts, router, dispatcher, repeats=5):
  """Returns the median seconds of one jitted forward + backward step."""
  layer = moe_layer.MoeMlpBlock(
      num_experts=num_experts, num_selected_experts=K, mlp_dim=4 * WIDTH,
      group_size=GROUP_SIZE, dispatcher=dispatcher,
      router={"name": router, "capacity_factor": CAPACITY_FACTOR})
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (NUM_TOKENS // GROUP_SIZE, GROUP_SIZE, WIDTH)), jnp.float32)
  params = jax.jit(layer.init)(jax.random.key(0), x)["params"]

  def loss(params, x):
    y, metrics = layer.apply({"params": params}, x, train=True,
                             rngs={"gating": jax.random.key(1)})
    return jnp.mean(y**2) + metrics["auxiliary_loss"]

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  print(f"device: {jax.devices()[0].device_kind}, D={WIDTH}, K={K}, "
        f"capacity factor={CAPACITY_FACTOR}, tokens={NUM_TOKENS}, "
        f"S={GROUP_SIZE}")
  print(f"{'E':>3} {'router':<24} {'dispatcher':<10} {'ms/step':>9} "
        f"{'tokens/s':>10} {'vs NoisyTop':>11}")
  for num_experts in (8, 32):
    for dispatcher in DISPATCHERS:
      baseline = None
      for router in ROUTERS:
        if dispatcher != "einsum" and router in SOFT_ROUTERS:
          continue
        seconds = step_time(num_experts, router, dispatcher)
        baseline = baseline or seconds
        print(f"{num_experts:>3} {router:<24} {dispatcher:<10} "
              f"{1e3 * seconds:>9.1f} {NUM_TOKENS / seconds:>10.0f} "
              f"{seconds / baseline:>10.2f}x", flush=True)


if __name__ == "__main__":
  main()
