r"""Expert parallelism and dropless dispatch: what a train step moves and holds.

Compiles and runs the trainer's own train step (`moe.train.trainer.
create_layout`, forward, backward, Adam update) of a V-MoE whose size the
flags give, on a synthetic batch, and prints two markdown tables:

1. mesh.expert in {1, 2, 4, 8} on 8 devices (einsum dispatch): the
   collectives of the compiled program by kind, with the bytes of their
   results on one device per step (`moe.parallel.hlo`), the all-to-all
   bytes the design predicts (docs/design.md §5: per MoE layer and
   direction `(G/N) E C D` bytes(dtype), in and out, forward and backward),
   per-device argument and temporary bytes (`compiled.memory_analysis()`)
   and the step time.
2. Dispatchers "einsum", "index" and "ragged" (dropless) at E in
   {8, 32, 64}, on one device: step time and memory.

CPU times are not pod times: the 8 "devices" are fake CPU devices sharing
this machine's cores, and their collectives are memory copies. The bytes and
the memory are what the program moves and holds on any backend with the same
mesh and shapes. On CPU `jax.lax.ragged_dot` is computed as a dense masked
product over all E experts (E times the FLOPs and memory of the rows); GPU
and TPU have grouped-matmul kernels.

Command (2-core CPU, about 10 minutes; on one GPU pass --tables=2):

  python experiments/bench_expert_parallel.py [--variant=S/16]
      [--image_size=64] [--num_layers=2] [--experts=8] [--batch_size=64]
      [--router=SparseTopK] [--dtype=float32] [--tables=1,2]
"""
import os
import statistics
import time

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

from absl import app  # noqa: E402  (after the flags)
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe.config import recipes  # noqa: E402
from moe.nn import routers  # noqa: E402
from moe.nn import transformer  # noqa: E402
from moe.nn import vit  # noqa: E402
from moe.parallel import hlo  # noqa: E402
from moe.parallel import partitioning  # noqa: E402
from moe.train import train_state  # noqa: E402
from moe.train import trainer  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "S/16", "ViT variant.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side (pixels).")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2,
                                   "Encoder blocks; MoE in every other one.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "E of table 1.")
_K = flags.DEFINE_integer("k", 2, "Experts per token K.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_ROUTER = flags.DEFINE_string("router", "SparseTopK", "Router name.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "MoE compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps (median).")
_TABLES = flags.DEFINE_list("tables", ["1", "2"], "Tables to print.")

CAPACITY_FACTOR = 1.25
NUM_CLASSES = 10


def experiment_config(num_experts, dispatcher, expert_partitions):
  """Returns the V-MoE experiment config of the flags."""
  router = recipes.router_config(_ROUTER.value,
                                 capacity_factor=CAPACITY_FACTOR)
  moe = recipes.moe_config(num_experts, _K.value, layers="every_2",
                           router=router, dispatcher=dispatcher,
                           dtype=_DTYPE.value)
  config = recipes.digits_config(moe)
  config.model = recipes.vit_model(_VARIANT.value, NUM_CLASSES,
                                   num_layers=_NUM_LAYERS.value, moe=moe)
  config.mesh.expert = expert_partitions
  return config


def synthetic_batch(mesh):
  """Random images and one-hot labels, split over all devices."""
  rng = np.random.default_rng(0)
  size, batch_size = _IMAGE_SIZE.value, _BATCH_SIZE.value
  local = {"image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(
               np.float32),
           "labels": np.eye(NUM_CLASSES, dtype=np.float32)[
               rng.integers(0, NUM_CLASSES, batch_size)]}
  return partitioning.shard_batch(local, mesh)


def measure(config, devices=None):
  """Compiles and times one config's train step on `devices` (default all).

  Returns:
    (collectives summary, memory analysis, median step ms).
  """
  mesh = partitioning.create_mesh(config.mesh.expert, devices)
  batch = synthetic_batch(mesh)
  layout = trainer.create_layout(
      config, {k: jax.ShapeDtypeStruct(x.shape, x.dtype)
               for k, x in batch.items()}, mesh=mesh)
  compiled = train_state.make_train_step(layout).lower(
      layout.abstract, layout.batch_spec).compile()
  state = layout.initialize(0)
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return (hlo.summarize(hlo.collectives(compiled.as_text())),
          compiled.memory_analysis(), 1e3 * statistics.median(times))


def predicted_all_to_all_bytes(num_experts, num_devices):
  """The design's all-to-all bytes per device and step (docs/design.md §5)."""
  width = vit.decode_variant(_VARIANT.value)["hidden_size"]
  patch = vit.decode_variant(_VARIANT.value)["patch_size"][0]
  tokens = (_IMAGE_SIZE.value // patch)**2 + 1
  capacity = routers.compute_capacity(tokens, num_experts, _K.value,
                                      CAPACITY_FACTOR)
  layers = len(transformer.moe_layer_indices("every_2", _NUM_LAYERS.value))
  groups_per_device = _BATCH_SIZE.value // num_devices
  buffer = (groups_per_device * num_experts * capacity * width *
            jnp.dtype(_DTYPE.value).itemsize)
  return 4 * layers * buffer   # in and out, forward and backward


def _mb(num_bytes):
  return f"{num_bytes / 2**20:.2f}"


def table_mesh():
  """Table 1: collectives and memory per mesh.expert; yields rows."""
  num_devices = len(jax.devices())
  kinds = [k for k in hlo.KINDS if k != "ragged-all-to-all"]
  yield ("| mesh.expert | " + " | ".join(f"{k} (n, MB)" for k in kinds) +
         " | all-to-all MB, design | args MB | temp MB | step ms |")
  yield "|---:|" + "---:|" * (len(kinds) + 4)
  for expert in (1, 2, 4, 8):
    if num_devices % expert:
      continue
    summary, memory, ms = measure(experiment_config(
        _EXPERTS.value, "einsum", expert))
    design = predicted_all_to_all_bytes(_EXPERTS.value, num_devices)
    cells = [f"{summary[k][0]}, {_mb(summary[k][1])}" for k in kinds]
    yield (f"| {expert} | " + " | ".join(cells) +
           f" | {_mb(design) if expert > 1 else '0'} | "
           f"{_mb(memory.argument_size_in_bytes)} | "
           f"{_mb(memory.temp_size_in_bytes)} | {ms:.1f} |")


def table_dispatchers():
  """Table 2: einsum vs index vs ragged on one device, per E; yields rows."""
  yield "| E | dispatcher | step ms | args MB | temp MB |"
  yield "|---:|---|---:|---:|---:|"
  for num_experts in (8, 32, 64):
    for dispatcher in ("einsum", "index", "ragged"):
      _, memory, ms = measure(experiment_config(num_experts, dispatcher, 1),
                              jax.devices()[:1])
      yield (f"| {num_experts} | {dispatcher} | {ms:.1f} | "
             f"{_mb(memory.argument_size_in_bytes)} | "
             f"{_mb(memory.temp_size_in_bytes)} |")


def main(argv):
  del argv
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPU cores; "
        f"{_VARIANT.value} at {_IMAGE_SIZE.value} px, {_NUM_LAYERS.value} "
        f"blocks (MoE every other), K={_K.value}, capacity factor "
        f"{CAPACITY_FACTOR}, router {_ROUTER.value}, batch "
        f"{_BATCH_SIZE.value}, {_DTYPE.value}; bytes per device and step")
  tables = {"1": table_mesh, "2": table_dispatchers}
  for name in _TABLES.value:
    if name not in tables:
      raise app.UsageError(f"--tables: unknown table {name!r}; known: 1, 2.")
    print()
    for row in tables[name]():
      print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
