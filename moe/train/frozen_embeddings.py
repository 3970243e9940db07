"""A trained backbone's embeddings of a dataset, computed once.

The backbone is a run of our trainer (its workdir, checkpoint directory or
step directory) whose model is `config.model`; its parameters must match
that model exactly, name for name and shape for shape, or loading fails
loudly. An example's embedding is the representation the model's head reads
(`moe.nn.vit.REPRESENTATION`, sown by the ViT): `[D]` per image, computed
without dropout (`train=False`) on the split's eval preprocessing.

Shapes: N examples, D width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe import checkpoints
from moe import data as data_lib
from moe.config import param_names
from moe.nn import vit

PyTree = Any
EMBEDDING, LABEL = "embedding", "label"


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(np.shape(leaf))
          for name, leaf in param_names.named_leaves(tree)}


def check_backbone(params: PyTree, expected: PyTree, field: str) -> None:
  """Raises a ValueError unless `params` has the names and shapes of
  `expected` (the model's abstract parameters)."""
  got, want = _shapes(params), _shapes(expected)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted(f"{name} {got[name]} (model: {want[name]})"
                      for name in set(got) & set(want)
                      if got[name] != want[name])
  if missing or unexpected or mismatched:
    raise ValueError(
        f"{field} does not hold the parameters of config.model: "
        f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes "
        f"{mismatched[:5]}. Set config.model to the backbone run's model.")


def load_backbone(model: nn.Module, path: str, example_inputs: jax.Array,
                  field: str = "config.task.backbone") -> PyTree:
  """The parameters of the backbone run at `path`, checked against `model`.

  Args:
    model: the backbone's flax module.
    path: a workdir, checkpoint directory or step directory.
    example_inputs: `[B, ...]` inputs of the model (for the shapes).
    field: the config field naming `path`, for messages.

  Returns:
    The parameters, host arrays.

  Raises:
    ValueError: if `path` is empty or the parameters do not fit `model`.
    moe.checkpoints.CheckpointError: if `path` holds no readable checkpoint.
  """
  if not path:
    raise ValueError(f"{field} must name the workdir of the trained "
                     "backbone run (e.g. the --workdir of configs/"
                     "mnist5k_vit.py).")
  params = checkpoints.restore_params(path)
  expected = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      example_inputs)["params"]
  check_backbone(params, expected, f"{field}={path!r}")
  return params


def embed_batches(model: nn.Module, params: PyTree,
                  batches: Iterable[Mapping[str, np.ndarray]], *,
                  inputs_key: str = "image", labels_key: str = "labels"
                  ) -> dict[str, np.ndarray]:
  """Embeddings and class labels of the real rows of padded batches.

  Args:
    model: the backbone.
    params: its parameters.
    batches: padded batches (`MASK_KEY`) with `[B, ...]` inputs and `[B, C]`
      one-hot labels.
    inputs_key: the inputs' entry.
    labels_key: the labels' entry.

  Returns:
    {EMBEDDING: float32 `[N, D]`, LABEL: int32 `[N]` (argmax of the labels)}.
  """
  @jax.jit
  def representation(images):
    _, state = model.apply({"params": params}, images, train=False,
                           mutable=["intermediates"])
    return state["intermediates"][vit.REPRESENTATION][0]

  embeddings, labels = [], []
  for batch in batches:
    real = np.asarray(batch[data_lib.MASK_KEY])
    embeddings.append(np.asarray(representation(
        jnp.asarray(batch[inputs_key])), np.float32)[real])
    labels.append(np.argmax(batch[labels_key], axis=-1).astype(np.int32)[real])
  return {EMBEDDING: np.concatenate(embeddings),
          LABEL: np.concatenate(labels)}


def embed_split(model: nn.Module, params: PyTree,
                dataset: data_lib.DatasetConfig, split: str,
                **keys: str) -> dict[str, np.ndarray]:
  """`embed_batches` of a whole split (every process embeds all of it),
  preprocessed by `dataset.pp_eval` in `dataset.eval_batch_size` batches."""
  data = data_lib.make_eval_data(
      dataclasses.replace(dataset, eval_split=split, cache_eval=False),
      process_index=0, process_count=1)
  return embed_batches(model, params, data, **keys)
