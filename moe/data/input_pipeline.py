"""Train and eval inputs from a dataset config; local batches to global arrays.

The task (`moe.train.tasks`) uses three functions:

    data_config = input_pipeline.default_config()  # then set its fields
    train = input_pipeline.make_train_iterator(data_config, state=saved)
    evaluation = input_pipeline.make_eval_data(data_config)

The config is a `DatasetConfig` or a ConfigDict with its fields. Every
process reads only its own slice of each split and yields local batches of
`batch_size // process_count` examples (numpy); the trainer assembles the
processes' local batches into global arrays
(`moe.parallel.partitioning.shard_batch`). `train.get_state()` is saved with each checkpoint and given back as `state=`
(or to `train.set_state`) when the job resumes.

Batches are dicts of numpy arrays with leading axis B (the local batch); the
features are what the preprocessing string leaves (e.g. "image" float32
[B, height, width, channels] and "labels" float32 [B, num_classes]). Eval batches also carry
`MASK_KEY` (bool [B]).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from moe.config import schema
from moe.data import preprocess
from moe.data import sources
from moe.data import train_iterator

MASK_KEY = "mask"
_DIGITS_PP = ("decode|value_range(-1, 1)|onehot(10, key_result='labels')"
              "|keep('image', 'labels')")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The dataset, `config.dataset` (defaults: the embedded digits).

  Attributes:
    name: tfds name, optionally with config/version ("digits", "mnist",
      "cifar10", "cifar100", "imagenet2012", "imagenet21k", ...).
    data_dir: data dir holding the prepared dataset; None resolves to
      $MOE_DATA_DIR or ~/.cache/moe/tensorflow_datasets for the embedded
      "digits" and "mnist5k" (prepared there on first use) and to $TFDS_DATA_DIR or
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
  name: str = "digits"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  pp_train: str = _DIGITS_PP
  pp_eval: str = _DIGITS_PP
  batch_size: int = 128
  eval_batch_size: int = 256
  shuffle_buffer: int = 50_000
  seed: int = 0
  cache_eval: bool = False
  prefetch: int = 2

  def __post_init__(self):
    field = "config.dataset"
    for name in ("name", "train_split", "eval_split", "pp_train", "pp_eval"):
      if not isinstance(getattr(self, name), str):
        raise TypeError(f"{field}.{name} must be a string, got "
                        f"{getattr(self, name)!r}.")
    for name in ("batch_size", "eval_batch_size", "shuffle_buffer"):
      schema.check_int(getattr(self, name), f"{field}.{name}", 1)
    schema.check_int(self.prefetch, f"{field}.prefetch", 0)
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"{field}.seed must be in [0, 2**32), got "
                       f"{self.seed!r}.")

  @classmethod
  def from_config(cls, section: Any) -> "DatasetConfig":
    """Parses `config.dataset` (a ConfigDict, a dict, None or an instance)."""
    return schema.parse_section(cls, section, "config.dataset")


def default_config() -> ml_collections.ConfigDict:
  """Returns the dataset config, every field of `DatasetConfig` at default."""
  return schema.section_defaults(DatasetConfig)


class _ProcessSlice(NamedTuple):
  """What one process reads of a split, and how it batches it."""
  process_index: int
  process_count: int
  batch_size: int
  preprocess_fn: preprocess.Op
  builder: Any
  blocks: list[sources.Block]


def _process_slice(config: DatasetConfig, *, split: str, pp: str,
                   batch_field: str, drop_remainder: bool,
                   process_index: int | None,
                   process_count: int | None) -> _ProcessSlice:
  """Resolves the process, its batch size, preprocessing and record blocks.

  Args:
    config: the dataset config.
    split: the tfds split.
    pp: its preprocessing string.
    batch_field: the config field of the global batch size.
    drop_remainder: cut the split into equal slices (train) or into slices
      whose sizes differ by at most one (eval).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The slice.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}.")
  global_batch_size = getattr(config, batch_field)
  if global_batch_size <= 0 or global_batch_size % count:
    raise ValueError(f"config.{batch_field}={global_batch_size} must be a "
                     f"positive multiple of the process count {count}.")
  preprocess_fn = preprocess.get_preprocess_fn(pp)
  builder = sources.load_builder(config.name, config.data_dir)
  blocks = sources.process_blocks(builder, split, process_index=index,
                                  process_count=count,
                                  drop_remainder=drop_remainder)
  return _ProcessSlice(index, count, global_batch_size // count,
                       preprocess_fn, builder, blocks)


def make_train_iterator(
    config: ml_collections.ConfigDict, *,
    state: dict[str, int] | None = None, process_index: int | None = None,
    process_count: int | None = None) -> train_iterator.TrainIterator:
  """Returns this process's infinite, checkpointable train iterator.

  The train split is cut into `process_count` equal slices (the last
  `len % process_count` examples are dropped); this process reads slice
  `process_index`.

  Args:
    config: `DatasetConfig`, or a ConfigDict of its fields.
    state: `get_state()` of the iterator to resume; None starts afresh.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    A `TrainIterator` of local batches of `config.batch_size //
    process_count` examples.
  """
  part = _process_slice(config, split=config.train_split, pp=config.pp_train,
                        batch_field="batch_size", drop_remainder=True,
                        process_index=process_index,
                        process_count=process_count)
  if not part.blocks:
    raise ValueError(f"Split {config.train_split!r} of {config.name!r} has "
                     f"fewer examples than the {part.process_count} "
                     "processes.")
  return train_iterator.TrainIterator(
      blocks=part.blocks, decode=sources.make_decoder(part.builder),
      preprocess_fn=part.preprocess_fn, batch_size=part.batch_size,
      shuffle_buffer=config.shuffle_buffer, seed=config.seed,
      process_index=part.process_index, prefetch=config.prefetch, state=state)


def padded_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
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
      yield padded_batch(batch, self.batch_size)
      num_real_batches += 1
      empty = {key: x[:0] for key, x in batch.items()}
    for _ in range(num_real_batches, self.num_batches):
      yield padded_batch(empty, self.batch_size)


def make_eval_data(config: ml_collections.ConfigDict, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> EvalData:
  """Returns this process's share of the eval split, covering it once.

  The split is cut into `process_count` slices whose sizes differ by at most
  one; this process reads slice `process_index` in file order.

  Args:
    config: `DatasetConfig`, or a ConfigDict of its fields.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An `EvalData` that can be iterated once per evaluation.
  """
  part = _process_slice(config, split=config.eval_split, pp=config.pp_eval,
                        batch_field="eval_batch_size", drop_remainder=False,
                        process_index=process_index,
                        process_count=process_count)
  num_examples = part.builder.info.splits[config.eval_split].num_examples
  if num_examples < part.process_count:
    raise ValueError(f"Split {config.eval_split!r} of {config.name!r} has "
                     f"fewer examples than the {part.process_count} "
                     "processes.")
  decode = sources.make_decoder(part.builder)

  def prepare(record, example_id):
    rng = preprocess.example_seed(config.seed, part.process_index, example_id)
    return preprocess.apply_seeded(part.preprocess_fn, decode(record), rng)

  records = sources.read_records(*sources.block_tensors(part.blocks))
  examples = tf.data.Dataset.zip(records, tf.data.Dataset.range(
      sum(b.take for b in part.blocks)))
  batches = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True).batch(part.batch_size)
  if config.cache_eval:
    batches = batches.cache()
  largest_slice = math.ceil(num_examples / part.process_count)
  return EvalData(batches.prefetch(config.prefetch),
                  batch_size=part.batch_size,
                  num_batches=math.ceil(largest_slice / part.batch_size),
                  num_examples=num_examples)
