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


def random_params(module, *inputs, key=jax.random.key(0), scale=0.5):
  """Normal(0, scale^2) parameters of the shapes `module.init` would give.

  Cheaper than `init`, which compiles a forward pass.
  """
  shapes = jax.eval_shape(module.init, key, *inputs)["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [
      normal(seed, *leaf.shape, scale=scale)
      for seed, leaf in enumerate(leaves, start=100)])
