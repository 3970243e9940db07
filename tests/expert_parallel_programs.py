"""Compiles the digits V-MoE train step per case; prints one JSON line each.

Run by `tests/test_expert_parallel.py` in a subprocess with XLA's log on
(TF_CPP_MIN_LOG_LEVEL=0), because the SPMD partitioner reports
"Involuntary full rematerialization" only in its log, and the test process
silences that log at start-up. Usage:

  python tests/expert_parallel_programs.py EXPERT:DISPATCHER:ROUTER[:unpinned]

(`unpinned`: the MoE layer without its mesh axes, the control.)

Each line holds the case, the collectives by kind (`moe.parallel.hlo`), the
all-gathered shapes, the shapes of the expert parameters, the number of MoE
layers and the compiler log lines that mention a rematerialization.
"""
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags)
import jax.numpy as jnp  # noqa: E402

from moe.config import param_names  # noqa: E402
from moe.nn import transformer  # noqa: E402
from moe.parallel import hlo  # noqa: E402
from moe.train import train_state  # noqa: E402
from moe.train import trainer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs"))
import digits_vmoe  # noqa: E402  pylint: disable=g-import-not-at-top

# Partitioning is done before code generation: skip LLVM optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
BATCH = {"image": jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32),
         "labels": jax.ShapeDtypeStruct((64, 10), jnp.float32)}


def compile_with_log(expert, dispatcher, router, unpinned=False):
  """Returns (compiled train step, layout, config, compiler log)."""
  config = digits_vmoe.get_config("runlocal")
  if unpinned:
    config.model.encoder.moe.group_axes = ()
    config.model.encoder.moe.expert_axes = ()
  config.mesh.expert = expert
  config.model.encoder.moe.dispatcher = dispatcher
  config.model.encoder.moe.router.name = router
  layout = trainer.create_layout(config, BATCH)
  lowered = train_state.make_train_step(layout).lower(layout.abstract,
                                                      layout.batch_spec)
  with tempfile.TemporaryFile(mode="w+") as log:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
      compiled = lowered.compile(FAST_COMPILE)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    log.seek(0)
    return compiled, layout, config, log.read()


def main(cases):
  for case in cases:
    expert, dispatcher, router, *unpinned = case.split(":")
    compiled, layout, config, log = compile_with_log(
        int(expert), dispatcher, router, unpinned == ["unpinned"])
    found = hlo.collectives(compiled.as_text())
    expert_shapes = sorted({
        hlo.shape_text(leaf.dtype, leaf.shape)
        for name, leaf in param_names.named_leaves(layout.abstract.params)
        if "/Experts/" in name})
    encoder = config.model.encoder
    print(json.dumps({
        "case": case,
        "summary": hlo.summarize(found),
        "all_gathers": [op.shapes for op in found if op.kind == "all-gather"],
        "expert_param_shapes": expert_shapes,
        "moe_layers": len(transformer.moe_layer_indices(
            encoder.moe.layers, encoder.num_layers)),
        "remat_log": [line for line in log.splitlines()
                      if "rematerialization" in line.lower()],
    }), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
