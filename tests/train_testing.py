"""Helpers shared by the trainer tests: configs, event files, comparisons."""
import os
import sys
from unittest import mock

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def load_config(spec, *overrides):
  """Loads `configs/<spec>` the way `moe.main` does, with flag overrides.

  Args:
    spec: file name in configs/ with an optional ':arg'.
    *overrides: command-line overrides, e.g. '--config.total_steps=4'.

  Returns:
    The locked ConfigDict.
  """
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True)
  argv = ["moe.main", f"--config={os.path.join(CONFIGS, spec)}", *overrides]
  # config_flags reads the overrides from sys.argv.
  with mock.patch.object(sys, "argv", argv):
    flag_values(argv)
  return flag_values.config


def tiny_config(data_dir, *overrides):
  """The runlocal digits V-MoE on 8 devices: 2 data x 4 expert partitions."""
  return load_config("digits_vmoe.py:runlocal",
                     f"--config.dataset.data_dir={data_dir}",
                     "--config.mesh.expert=4", *overrides)


def summaries(logdir):
  """Returns {tag: [(step, value), ...]} of the scalars written to `logdir`."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()[event_accumulator.TENSORS]:
    values = [(e.step, tensor_util.make_ndarray(e.tensor_proto))
              for e in accumulator.Tensors(tag)]
    if all(np.ndim(value) == 0 for _, value in values):
      scalars[tag] = [(step, float(value)) for step, value in values]
  return scalars


def host_tree(tree):
  """Returns a tree of jax Arrays (typed keys included) as numpy arrays."""
  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(to_numpy, tree)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  """Asserts equal structure and values (bitwise with the default tolerance)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host_tree(a)),
                          jax.tree.leaves(host_tree(b))):
    name = jax.tree_util.keystr(path)
    if rtol == 0 and atol == 0:
      np.testing.assert_array_equal(x, y, err_msg=name)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
