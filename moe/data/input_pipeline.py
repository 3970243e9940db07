"""Train and eval inputs from a dataset config; local batches to global arrays.

The trainer uses four functions:

    data_config = input_pipeline.default_config()  # then set its fields
    train = input_pipeline.make_train_iterator(data_config, state=saved)
    evaluation = input_pipeline.make_eval_data(data_config)
    batch = input_pipeline.to_global_array(next(train), sharding)

Every process reads only its own slice of each split and yields local
batches of `batch_size // process_count` examples; `to_global_array`
assembles the processes' local batches into one `jax.Array` per feature.
`train.get_state()` is saved with each checkpoint and given back as `state=`
(or to `train.set_state`) when the job resumes.

Batches are dicts of numpy arrays with leading axis B (the local batch); the
features are what the preprocessing string leaves (e.g. "image" float32
[B, H, W, C] and "labels" float32 [B, num_classes]). Eval batches also carry
`MASK_KEY` (bool [B]).
"""
from __future__ import annotations

import math
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from moe.data import preprocess
from moe.data import sources
from moe.data import train_iterator

MASK_KEY = "mask"
_DIGITS_PP = ("decode|value_range(-1, 1)|onehot(10, key_result='labels')"
              "|keep('image', 'labels')")


def default_config() -> ml_collections.ConfigDict:
  """Returns the dataset config, every field at its default (digits).

  Fields:
    name: tfds name, optionally with config/version ("digits", "mnist",
      "cifar10", "cifar100", "imagenet2012", "imagenet21k", ...).
    data_dir: data dir holding the prepared dataset; None resolves to
      $MOE_DATA_DIR or ~/.cache/moe/tensorflow_datasets for "digits" (which is
      prepared there on first use) and to $TFDS_DATA_DIR or
      ~/tensorflow_datasets for other datasets (see `moe.data.sources`).
    train_split: tfds split to train on; sub-splits allowed ("train[:90%]").
    eval_split: tfds split to evaluate on.
    pp_train: preprocessing string of train examples (`moe.data.preprocess`).
    pp_eval: preprocessing string of eval examples.
    batch_size: global train batch, divisible by the process count.
    eval_batch_size: global eval batch, divisible by the process count.
    shuffle_buffer: examples shuffled together in the train stream, rounded
      down to whole blocks (a TFRecord file, or the part of one in this
      process's slice), at least one; >= the slice size gives a uniform
      shuffle per epoch (see `moe.data.order`).
    seed: data seed in [0, 2**32): train order and random preprocessing.
    cache_eval: keep the preprocessed eval batches in memory after the first
      evaluation (for small eval splits).
    prefetch: batches prepared ahead by tf.data.
  """
  config = ml_collections.ConfigDict()
  config.name = "digits"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = "train"
  config.eval_split = "test"
  config.pp_train = _DIGITS_PP
  config.pp_eval = _DIGITS_PP
  config.batch_size = 128
  config.eval_batch_size = 256
  config.shuffle_buffer = 50_000
  config.seed = 0
  config.cache_eval = False
  config.prefetch = 2
  return config


def _process(process_index: int | None,
             process_count: int | None) -> tuple[int, int]:
  """Returns (process index, process count), defaulting to jax's."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}.")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int,
                      field: str) -> int:
  """Returns the per-process batch size, or raises if it is not whole."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"config.{field}={global_batch_size} must be a positive "
                     f"multiple of the process count {process_count}.")
  return global_batch_size // process_count


def make_train_iterator(
    config: ml_collections.ConfigDict, *,
    state: dict[str, int] | None = None, process_index: int | None = None,
    process_count: int | None = None) -> train_iterator.TrainIterator:
  """Returns this process's infinite, checkpointable train iterator.

  The train split is cut into `process_count` equal slices (the last
  `len % process_count` examples are dropped); this process reads slice
  `process_index`.

  Args:
    config: dataset config (`default_config`).
    state: `get_state()` of the iterator to resume; None starts afresh.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    A `TrainIterator` of local batches of `config.batch_size //
    process_count` examples.
  """
  process_index, process_count = _process(process_index, process_count)
  batch_size = _local_batch_size(config.batch_size, process_count,
                                 "batch_size")
  preprocess_fn = preprocess.get_preprocess_fn(config.pp_train)
  builder = sources.load_builder(config.name, config.data_dir)
  blocks = sources.process_blocks(
      builder, config.train_split, process_index=process_index,
      process_count=process_count, drop_remainder=True)
  if not blocks:
    raise ValueError(f"Split {config.train_split!r} of {config.name!r} has "
                     f"fewer examples than the {process_count} processes.")
  return train_iterator.TrainIterator(
      blocks=blocks, decode=sources.make_decoder(builder),
      preprocess_fn=preprocess_fn, batch_size=batch_size,
      shuffle_buffer=config.shuffle_buffer, seed=config.seed,
      process_index=process_index, prefetch=config.prefetch, state=state)


def _padded(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every feature of `batch` with zero rows to `size`; adds the mask."""
  num_real = len(next(iter(batch.values())))
  padded = {
      key: np.concatenate(
          [x, np.zeros((size - num_real,) + x.shape[1:], x.dtype)])
      for key, x in batch.items()
  }
  padded[MASK_KEY] = np.arange(size) < num_real
  return padded


class EvalData:
  """This process's share of the eval split, in padded batches.

  Each pass (`iter()`) yields `num_batches` dicts of numpy arrays with
  leading axis B = `batch_size`, plus `MASK_KEY`: bool [B], True for real
  examples, False for padding rows (zeros). Every process yields the same
  number of batches, and over all processes and batches each example of the
  split is real exactly once; metrics must weight by the mask.

  Attributes:
    batch_size: B, local eval batch size.
    num_batches: batches per pass, the same on every process.
    num_examples: examples in the whole eval split (all processes).
  """

  def __init__(self, batches: tf.data.Dataset, *, batch_size: int,
               num_batches: int, num_examples: int):
    """Initialises from the unpadded local batches (the last may be short)."""
    if MASK_KEY in batches.element_spec:
      raise ValueError(f"Eval preprocessing must not produce {MASK_KEY!r}; "
                       f"the pipeline adds it.")
    self._batches = batches
    self.batch_size = batch_size
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    num_real_batches, empty = 0, None
    for batch in self._batches.as_numpy_iterator():
      yield _padded(batch, self.batch_size)
      num_real_batches += 1
      empty = {key: x[:0] for key, x in batch.items()}
    for _ in range(num_real_batches, self.num_batches):
      yield _padded(empty, self.batch_size)


def make_eval_data(config: ml_collections.ConfigDict, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> EvalData:
  """Returns this process's share of the eval split, covering it once.

  The split is cut into `process_count` slices whose sizes differ by at most
  one; this process reads slice `process_index` in file order.

  Args:
    config: dataset config (`default_config`).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An `EvalData` that can be iterated once per evaluation.
  """
  process_index, process_count = _process(process_index, process_count)
  batch_size = _local_batch_size(config.eval_batch_size, process_count,
                                 "eval_batch_size")
  preprocess_fn = preprocess.get_preprocess_fn(config.pp_eval)
  builder = sources.load_builder(config.name, config.data_dir)
  blocks = sources.process_blocks(
      builder, config.eval_split, process_index=process_index,
      process_count=process_count, drop_remainder=False)
  num_examples = builder.info.splits[config.eval_split].num_examples
  if num_examples < process_count:
    raise ValueError(f"Split {config.eval_split!r} of {config.name!r} has "
                     f"fewer examples than the {process_count} processes.")
  decode = sources.make_decoder(builder)

  def prepare(record, example_id):
    rng = preprocess.example_seed(config.seed, process_index, example_id)
    return preprocess.apply_seeded(preprocess_fn, decode(record), rng)

  records = sources.read_records(*sources.block_tensors(blocks))
  examples = tf.data.Dataset.zip(records, tf.data.Dataset.range(
      sum(b.take for b in blocks)))
  batches = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True).batch(batch_size)
  if config.cache_eval:
    batches = batches.cache()
  largest_slice = math.ceil(num_examples / process_count)
  return EvalData(batches.prefetch(config.prefetch), batch_size=batch_size,
                  num_batches=math.ceil(largest_slice / batch_size),
                  num_examples=num_examples)


def to_global_array(batch: dict[str, np.ndarray],
                    sharding: jax.sharding.NamedSharding) -> dict[str,
                                                                  jax.Array]:
  """Assembles the processes' local batches into global arrays.

  Args:
    batch: this process's local batch of numeric arrays, leading axis B
      (every process passes the same B).
    sharding: the global batch's sharding, splitting the leading axis over
      devices, e.g. `NamedSharding(mesh, P(("data", "expert")))`; the
      processes' batches are concatenated in process order.

  Returns:
    The same dict of `jax.Array`s with leading axis B * process_count.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
