"""Checksums and finiteness of a train state, computed on its devices.

A checkpoint records, per leaf of the saved state, a 32-bit checksum of its
bits (`digest`); restoring recomputes it on the restored arrays and compares,
so silent corruption of the files (a flipped byte that still decodes) is
found, and checks that every float leaf is finite.

The checksum of a leaf is `sum_i mix(bits_i, i) mod 2^32` over its elements
in row-major order, `bits_i` the element's bits as unsigned integers (8-byte
elements as two 32-bit words) and `mix` an avalanching integer hash of the
bits and the position, so a changed value or two swapped values change it.
Integer addition is exact and commutative, so the value does not depend on
how the array is sharded or reduced: it is one jitted reduction over the
global arrays, the same on every process of a multi-host job, which
therefore agree on whether a checkpoint is intact without exchanging
anything. Its cost is one pass over the state per save and per restore.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe.config import param_names

PyTree = Any
ALGORITHM = "moe-sum-mix32-v1"
_GOLDEN = np.uint32(0x9E3779B1)
_MIX_1 = np.uint32(0x85EBCA77)
_MIX_2 = np.uint32(0xC2B2AE3D)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class Digest(NamedTuple):
  """Per-leaf checksums and finiteness of a state.

  Attributes:
    checksums: leaf name -> 32-bit checksum.
    finite: leaf name -> whether every element is finite (True for
      non-float leaves).
  """
  checksums: dict[str, int]
  finite: dict[str, bool]


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32, shape of x (8-byte elements: `[..., 2]`;
  typed PRNG keys: their key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  itemsize = jnp.dtype(x.dtype).itemsize
  if itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[itemsize]).astype(
      jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Row-major positions of an array of `shape`, as uint32, in that shape
  (built from iotas: no reshape, so a sharded operand stays in place)."""
  position = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    position = position + jax.lax.broadcasted_iota(
        jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return position


def _checksum(x: jax.Array) -> jax.Array:
  words = _words(x)
  position = _positions(words.shape)
  mixed = words * _GOLDEN + position * _MIX_1
  mixed = mixed ^ (mixed >> 15)
  mixed = mixed * _MIX_2
  mixed = mixed ^ (mixed >> 13)
  return jnp.sum(mixed, dtype=jnp.uint32)


def _all_finite(x: jax.Array) -> jax.Array:
  if (not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      and jnp.issubdtype(x.dtype, jnp.inexact)):
    return jnp.all(jnp.isfinite(x))
  return jnp.asarray(True)


@jax.jit
def _digest_arrays(tree: PyTree) -> tuple[PyTree, PyTree]:
  return (jax.tree.map(_checksum, tree), jax.tree.map(_all_finite, tree))


def all_finite(tree: PyTree) -> jax.Array:
  """A scalar bool: whether every float leaf of `tree` is finite.

  For use inside a jitted step (one reduction per leaf, which XLA can fuse
  into the computation producing the leaf).
  """
  flags = [_all_finite(leaf) for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def digest(tree: PyTree) -> Digest:
  """Checksums and finiteness of every leaf of `tree` (jax or numpy arrays).

  Args:
    tree: a pytree of arrays, e.g. the train state.

  Returns:
    The `Digest`, by '/'-joined leaf name (`moe.config.param_names`).
  """
  # Replicated scalars; in a multi-process job each process reads its copy.
  checksums, finite = jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0)), _digest_arrays(tree))
  return Digest(
      checksums={name: int(value) for name, value in
                 param_names.named_leaves(checksums)},
      finite={name: bool(value) for name, value in
              param_names.named_leaves(finite)})


def mismatches(recorded: dict[str, int], restored: Digest) -> list[str]:
  """Names whose checksum differs from the recorded one (or is missing)."""
  return sorted(name for name in set(recorded) | set(restored.checksums)
                if recorded.get(name) != restored.checksums.get(name))


def non_finite(restored: Digest) -> list[str]:
  """Names of the float leaves holding NaN or infinity."""
  return sorted(name for name, ok in restored.finite.items() if not ok)
