"""Placing a model's intermediate arrays on the context mesh, if there is one.

Models in `moe.nn` name no mesh axis: the axis names come from config (for
the MoE layer, `group_axes` and `expert_axes`) and take effect only under a
context mesh (`jax.set_mesh`, which `moe.parallel.partitioning.jit_on_mesh`
enters around every call of the trainer's jitted functions). Without a mesh
every function here is a no-op, so the same model runs on one device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec

Array = jax.Array
# Per array dimension: mesh axis names (empty: not split).
Spec = Sequence[Sequence[str]]


def context_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """Returns the context mesh, or None outside `jax.set_mesh`."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def partition_spec(spec: Spec) -> PartitionSpec:
  """Turns per-dimension axis-name tuples into a PartitionSpec."""
  return PartitionSpec(*(tuple(axes) if axes else None for axes in spec))


def constrain(x: Array, spec: Spec) -> Array:
  """Pins the sharding of `x` to `spec` on the context mesh (no mesh: x).

  Args:
    x: the array.
    spec: for each leading dimension of `x`, the mesh axes that split it.

  Returns:
    `x`, with a sharding constraint when there is a context mesh and `spec`
    names at least one axis.

  Raises:
    ValueError: if `spec` names an axis the context mesh does not have.
  """
  mesh = context_mesh()
  if mesh is None or not any(spec):
    return x
  check_axes(spec, mesh)
  return jax.lax.with_sharding_constraint(x, partition_spec(spec))


def axes_size(axes: Sequence[str]) -> int:
  """The number of parts `axes` split a dimension into (1 without a mesh)."""
  mesh = context_mesh()
  if mesh is None:
    return 1
  check_axes((axes,), mesh)
  return math.prod(mesh.shape[axis] for axis in axes)


def check_axes(spec: Spec, mesh: jax.sharding.AbstractMesh) -> None:
  """Raises a ValueError naming any axis of `spec` that `mesh` lacks."""
  unknown = [axis for axes in spec for axis in axes
             if axis not in mesh.axis_names]
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not axes of the context mesh "
                     f"{dict(mesh.shape)}; check the MoE layer's group_axes "
                     "and expert_axes.")
