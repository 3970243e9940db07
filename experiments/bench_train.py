r"""Speed of the train step: compile time, steps/s and examples/s.

Times the jitted train step of `moe.train` (forward, loss, backward, Adam
update, on the default devices with the configs' shardings) on a synthetic
batch already on the devices, so the input pipeline is not included:

  digits_vmoe: `configs/digits_vmoe.py` (8x8x1 images, batch 128).
  vmoe_s16: a ViT-S/16 V-MoE at 224 px (12 blocks, D=384; E=8, K=2 MoE MLPs
    in every other block, SparseTopK router, groups of 8 images), batch 64.

Each row is one train step variant: `state check` on is the step the
trainer runs, which also reduces the updated parameters and optimizer state
to one `state_finite` flag (so that no non-finite state is ever saved); off
skips that reduction, to show its cost. Times are the median over
`--repeats` timing loops of `--steps` steps each, after compilation and two
warm-up steps, with `block_until_ready`.

Usage (prints a markdown table):

  python experiments/bench_train.py [--setups=digits_vmoe,vmoe_s16]
      [--steps=N] [--repeats=R] [--state_check=on,off]
      [--router=NoisyTopExpertsPerItem]
"""
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from moe.config import recipes
from moe.parallel import partitioning
from moe.train import train_state
from moe.train import trainer

import training_runs

_SETUPS = flags.DEFINE_list("setups", ["digits_vmoe", "vmoe_s16"],
                            "Setups to time.")
_STEPS = flags.DEFINE_integer("steps", 0,
                              "Timed steps per setup; 0: the setup's default.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timing loops per variant.")
_STATE_CHECK = flags.DEFINE_list(
    "state_check", ["on", "off"],
    "Train step variants: 'on' (the trainer's, with the finite-state check) "
    "and/or 'off'.")
_ROUTER = flags.DEFINE_string(
    "router", None, "Router of the MoE layers; default: the config's.")

# setup: (image shape, batch size, default timed steps)
SHAPES = {"digits_vmoe": ((8, 8, 1), 128, 100), "vmoe_s16": ((224, 224, 3),
                                                             64, 3)}


def _config(setup):
  """Returns the experiment config of a setup."""
  config = training_runs.load_config("digits_vmoe.py")
  if setup == "vmoe_s16":
    moe = recipes.moe_config(
        8, 2, layers="every_2", group_size=8 * 197,
        router=recipes.router_config(capacity_factor=1.25))
    config.model = recipes.vit_model("S/16", 1000, moe=moe)
  if _ROUTER.value:
    config.model.encoder.moe.router.name = _ROUTER.value
  return config


def _synthetic_batch(image_shape, batch_size, num_classes, mesh):
  """Returns random images and one-hot labels, split over the devices."""
  rng = np.random.default_rng(0)
  local = {
      "image": rng.uniform(-1, 1, (batch_size,) + image_shape).astype(
          np.float32),
      "labels": np.eye(num_classes, dtype=np.float32)[
          rng.integers(0, num_classes, batch_size)],
  }
  return partitioning.shard_batch(local, mesh)


def bench(setup, check_state=True):
  """Returns (parameters, compile seconds, steps/s, examples/s) of a setup."""
  image_shape, batch_size, default_steps = SHAPES[setup]
  steps = _STEPS.value or default_steps
  config = _config(setup)
  mesh = partitioning.create_mesh_from_config(config.mesh)
  batch = _synthetic_batch(image_shape, batch_size, config.model.num_classes,
                           mesh)
  layout = trainer.create_layout(
      config, {k: jax.ShapeDtypeStruct(x.shape, x.dtype)
               for k, x in batch.items()}, mesh=mesh)
  state = layout.initialize(0)
  start = time.perf_counter()
  step = train_state.make_train_step(layout, check_state).lower(
      state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  seconds = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
  steps_per_s = steps / float(np.median(seconds))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return num_params, compile_s, steps_per_s, steps_per_s * batch_size


def main(argv):
  del argv
  rows = ["| setup | state check | batch | parameters | compile (s) | "
          "steps/s | examples/s |", "|---|---|---:|---:|---:|---:|---:|"]
  for variant in _STATE_CHECK.value:
    if variant not in ("on", "off"):
      raise app.UsageError(f"--state_check: 'on' or 'off', got {variant!r}.")
  for setup in _SETUPS.value:
    if setup not in SHAPES:
      raise app.UsageError(f"--setups: unknown setup {setup!r}; known: "
                           f"{', '.join(SHAPES)}.")
    for variant in _STATE_CHECK.value:
      num_params, compile_s, steps_per_s, examples_per_s = bench(
          setup, variant == "on")
      rows.append(f"| {setup} | {variant} | {SHAPES[setup][1]} | "
                  f"{num_params:,} | {compile_s:.1f} | {steps_per_s:.2f} | "
                  f"{examples_per_s:.1f} |")
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
