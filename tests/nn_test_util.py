"""Helpers shared by the moe.nn tests."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Tests compile many small programs once each: skip LLVM optimisations.
jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def normal(seed, *shape, scale=1.0):
  """Normal(0, scale^2) float32 test data (numpy: no compilation per shape)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
