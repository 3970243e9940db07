"""Device mesh, parameter and batch shardings, from `config.mesh`.

The mesh has two named axes, ('data', 'expert'), of sizes (D, X) with
X = `config.mesh.expert` (expert partitions) and D = #devices / X. Arrays are
placed by config, never by model code:

- Parameters: ordered regex rules, `config.mesh.partition_rules`, map a
  parameter name ('/'-joined, see `moe.config.param_names`) to a
  PartitionSpec-like tuple; the first rule that fully matches wins, e.g.
  ('.*/Experts/.*', ('expert',)) (`moe.config.recipes.EXPERT_PARTITION_RULES`)
  shards the leading E axis of every expert weight of a V-MoE over 'expert'.
  Unmatched parameters are replicated; a rule that matches no parameter is an
  error. With `config.mesh.fsdp_min_size` set, every parameter with at least
  that many elements is additionally sharded over 'data' along its largest
  dimension that is not sharded yet and divides evenly (the first one on
  ties).
- Optimizer state (or any tree holding copies of the parameters, such as a
  whole train state): a leaf whose name ends with a parameter's name and has
  its shape gets that parameter's sharding; every other leaf (step counters,
  scalars, rng) is replicated.
- Batch: the leading axis is split over all devices, 'data'-major then
  'expert' (PartitionSpec(('data', 'expert'))), as in V-MoE; each expert
  partition thus holds different examples.
- Inside the model: the MoE layer pins its token and expert buffers with
  sharding constraints on the axes its config names (`group_axes`,
  `expert_axes`; `moe.config.recipes.moe_config` sets `MOE_GROUP_AXES` and
  `MOE_EXPERT_AXES`), so that tokens move to the experts by all-to-all over
  'expert' and expert weights never move (docs/design.md §5). Constraints
  need a context mesh: `jit_on_mesh` traces and runs a jitted function under
  `jax.set_mesh(mesh)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from moe.config import schema
from moe.config import param_names

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
MESH_AXES = (DATA_AXIS, EXPERT_AXIS)
BATCH_SPEC = PartitionSpec(MESH_AXES)
# The MoE layer's axes: groups split like the batch, experts over 'expert'.
MOE_GROUP_AXES = MESH_AXES
MOE_EXPERT_AXES = (EXPERT_AXIS,)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device layout, `config.mesh`.

  Attributes:
    expert: number of expert partitions (size of the 'expert' axis); it must
      divide the number of devices, the rest forms the 'data' axis.
    partition_rules: ordered (regex, spec) pairs; spec is a tuple with one
      entry per leading dimension of the parameter: a mesh axis name, a tuple
      of axis names, or None. Missing trailing entries mean None.
    fsdp_min_size: parameters with at least this many elements are also
      sharded over 'data' (FSDP); None: never.
  """
  expert: int = 1
  partition_rules: Sequence[tuple[str, Sequence[Any]]] = ()
  fsdp_min_size: int | None = None

  def __post_init__(self):
    schema.check_int(self.expert, "config.mesh.expert", 1)
    if self.fsdp_min_size is not None:
      schema.check_int(self.fsdp_min_size, "config.mesh.fsdp_min_size",
                       1)
    parse_partition_rules(self.partition_rules)

  @classmethod
  def from_config(cls, config: Any) -> "MeshConfig":
    """Parses `config.mesh` (a ConfigDict, a dict, None or an instance)."""
    return schema.parse_section(cls, config, "config.mesh")


def create_mesh(expert: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns the ('data', 'expert') mesh over `devices` (default: all).

  Args:
    expert: size of the 'expert' axis.
    devices: the devices of the mesh, all processes' together.

  Returns:
    A Mesh of shape (len(devices) // expert, expert).

  Raises:
    ValueError: if `expert` does not divide the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  if not isinstance(expert, int) or expert < 1 or num_devices % expert:
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    raise ValueError(
        f"config.mesh.expert must divide the number of devices "
        f"({num_devices}); allowed values: {divisors}; got {expert!r}.")
  shape = (num_devices // expert, expert)
  device_array = mesh_utils.create_device_mesh(
      shape, devices=devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


def create_mesh_from_config(
    config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns the mesh of `config.mesh` (a ConfigDict, dict or MeshConfig)."""
  return create_mesh(MeshConfig.from_config(config).expert, devices)


def parse_partition_rules(
    rules: Sequence[tuple[str, Sequence[Any]]]
) -> list[tuple[Any, PartitionSpec]]:
  """Compiles (regex, spec tuple) rules to (pattern, PartitionSpec) pairs."""
  field = "config.mesh.partition_rules"
  parsed = []
  for pattern, spec in param_names.compile_rules(rules, field):
    if isinstance(spec, str) or spec is None:
      spec = (spec,)
    for entry in spec:
      axes = entry if isinstance(entry, (tuple, list)) else (entry,)
      unknown = [a for a in axes if a is not None and a not in MESH_AXES]
      if unknown:
        raise ValueError(
            f"{field}: rule {pattern.pattern!r} names mesh axes {unknown}; "
            f"allowed: {', '.join(MESH_AXES)} or None.")
    parsed.append((pattern, PartitionSpec(*(
        tuple(e) if isinstance(e, list) else e for e in spec))))
  return parsed


def jit_on_mesh(fun: Callable[..., Any], mesh: Mesh,
                **jit_kwargs: Any) -> Callable[..., Any]:
  """Returns `jax.jit(fun, **jit_kwargs)` that traces and runs on `mesh`.

  Every call (and `.lower(...)`) enters `jax.set_mesh(mesh)`, so that the
  sharding constraints of the model (`moe.nn.placement`) see the mesh.

  Args:
    fun: the function to jit.
    mesh: the context mesh.
    **jit_kwargs: `jax.jit` arguments (shardings, donation).

  Returns:
    The jitted function, with a `lower` method.
  """
  jitted = jax.jit(fun, **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted(*args, **kwargs)

  def lower(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted.lower(*args, **kwargs)

  call.lower = lower
  return call


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that puts a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of a batch: leading axis split over all devices."""
  return NamedSharding(mesh, BATCH_SPEC)


def param_shardings(params: PyTree, mesh: Mesh,
                    rules: Sequence[tuple[str, Sequence[Any]]] = (),
                    fsdp_min_size: int | None = None) -> PyTree:
  """Returns a tree of NamedSharding, one per parameter.

  Args:
    params: the parameter tree; arrays or `jax.ShapeDtypeStruct` (from
      `jax.eval_shape`), only shapes are read.
    mesh: the device mesh.
    rules: ordered (regex, spec tuple) partition rules.
    fsdp_min_size: shard parameters of at least this many elements over
      'data' too; None: never.

  Returns:
    A tree with the structure of `params`.

  Raises:
    ValueError: if a rule matches no parameter, a rule's spec has more
      entries than the parameter has dimensions, or shards a dimension that
      the mesh axes do not divide.
  """
  parsed = parse_partition_rules(rules)
  param_names.check_every_pattern_matches(
      [pattern for pattern, _ in parsed],
      [name for name, _ in param_names.named_leaves(params)],
      "config.mesh.partition_rules")

  def sharding(name, param):
    shape = tuple(np.shape(param))
    rule = param_names.first_matching_rule(parsed, name)
    spec = list(rule[1]) if rule else []
    if len(spec) > len(shape):
      raise ValueError(
          f"config.mesh.partition_rules: rule {rule[0].pattern!r} gives "
          f"{len(spec)} entries {tuple(spec)} but parameter {name!r} has shape "
          f"{shape}.")
    spec += [None] * (len(shape) - len(spec))
    if fsdp_min_size is not None and math.prod(shape) >= fsdp_min_size:
      spec = _add_fsdp_axis(spec, shape, mesh.shape[DATA_AXIS])
    _check_divisible(name, shape, spec, mesh)
    while spec and spec[-1] is None:
      spec.pop()
    return NamedSharding(mesh, PartitionSpec(*spec))

  return param_names.map_with_names(sharding, params)


def _add_fsdp_axis(spec: list[Any], shape: tuple[int, ...],
                   data_size: int) -> list[Any]:
  """Shards the largest free dimension that `data_size` divides over 'data'."""
  used = {axis for entry in spec if entry is not None
          for axis in (entry if isinstance(entry, tuple) else (entry,))}
  if data_size == 1 or DATA_AXIS in used:
    return spec
  free = [d for d, entry in enumerate(spec)
          if entry is None and shape[d] % data_size == 0]
  if not free:
    return spec
  largest = max(free, key=lambda d: (shape[d], -d))
  return [DATA_AXIS if d == largest else entry for d, entry in enumerate(spec)]


def _check_divisible(name: str, shape: tuple[int, ...], spec: list[Any],
                     mesh: Mesh) -> None:
  """Raises if a sharded dimension is not a multiple of its mesh axes' size."""
  for dim, entry in zip(shape, spec):
    if entry is None:
      continue
    axes = entry if isinstance(entry, tuple) else (entry,)
    parts = math.prod(mesh.shape[axis] for axis in axes)
    if dim % parts:
      raise ValueError(
          f"config.mesh.partition_rules: parameter {name!r} of shape {shape} "
          f"cannot be split {parts} ways along its dimension of size {dim} "
          f"(spec {tuple(spec)}, mesh {dict(mesh.shape)}).")


def shardings_like_params(tree: PyTree, params: PyTree,
                          params_shardings: PyTree, mesh: Mesh) -> PyTree:
  """Returns shardings for a tree that holds copies of the parameters.

  Meant for optimizer states (momentum, Adam moments, accumulated gradients)
  and whole train states: a leaf whose name ends with the name of a parameter
  (the longest such name) and has the same shape gets that parameter's
  sharding; any other leaf is replicated.

  Args:
    tree: the tree to place, e.g. `jax.eval_shape(tx.init, params)`.
    params: the parameter tree (arrays or ShapeDtypeStruct).
    params_shardings: the parameters' shardings, e.g. from `param_shardings`.
    mesh: the mesh of the replicated leaves.

  Returns:
    A tree of NamedSharding with the structure of `tree`.
  """
  by_name = {
      name: (tuple(np.shape(param)), sharding)
      for (name, param), (_, sharding) in zip(
          param_names.named_leaves(params),
          param_names.named_leaves(params_shardings))
  }

  def sharding(path, leaf):
    parts = [param_names.key_to_str(key) for key in path]
    for start in range(len(parts)):
      match = by_name.get("/".join(parts[start:]))
      if match is not None and match[0] == tuple(np.shape(leaf)):
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


def abstract_arrays(tree: PyTree, shardings: PyTree) -> PyTree:
  """Returns `jax.ShapeDtypeStruct`s with shardings, e.g. to restore into."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      tree, shardings)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Assembles each process's slice of the batch into global arrays.

  Args:
    local_batch: this process's examples (numpy arrays with a leading batch
      axis); the global batch is the concatenation over processes in
      process-index order.
    mesh: the mesh; the leading axis is split over all its devices.

  Returns:
    The tree of global jax Arrays with `batch_sharding(mesh)`.

  Raises:
    ValueError: if the local batch size is not a multiple of the number of
      this process's devices.
  """
  sharding = batch_sharding(mesh)
  num_local = len(mesh.local_devices)

  def to_global(name, x):
    if np.ndim(x) == 0 or np.shape(x)[0] % num_local:
      raise ValueError(
          f"batch entry {name!r} of shape {np.shape(x)}: the per-process "
          f"batch size must be a multiple of the {num_local} devices of this "
          "process.")
    return jax.make_array_from_process_local_data(sharding, x)

  return param_names.map_with_names(to_global, local_batch)
