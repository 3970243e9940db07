"""The train iterator: infinite, deterministic, exactly resumable.

A resumed job must neither repeat nor skip data, so the stream is a pure
function of the data seed, and the iterator's state is just its position in
the stream, `{"epoch": e, "index_in_epoch": i}` (two ints; the trainer saves
them with its checkpoint, e.g. as JSON). `set_state` rebuilds the stream from
that position; its next batch is the batch an uninterrupted run would have
produced next, bit for bit, augmentations included.

How (and why not something simpler):
  * `ds.shuffle(buffer)` + `ds.skip(n)` replays everything read since the
    start of the run, and the shuffle buffer's contents are not a small state;
    tf.data's own iterator checkpoints store that buffer (gigabytes for
    ImageNet). Index-based random access (`tfds.data_sources`) needs the
    ArrayRecord format, which prepared TFRecord datasets do not have.
  * Instead the order is planned in numpy (`moe.data.order`): per epoch the
    process's blocks (runs of records in a TFRecord file) are permuted, cut
    into windows of about `shuffle_buffer` examples, and each window is
    permuted. A window is read whole (blocks in parallel), gathered into its
    permuted order and streamed; the next window loads in the background.
    Resuming plans the windows from the saved position and reads only the
    window that position falls in: the cost of filling one shuffle buffer,
    independent of how far the run got. Memory: about three windows of
    serialized records.
  * Random preprocessing ops are seeded per example by
    (seed, process index, epoch, example number), so augmentations do not
    depend on batch size, prefetching or parallelism either.

Exact resumption assumes the same dataset, split, process count, seed,
shuffle buffer and preprocessing; the batch size may change.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from moe.data import order as order_lib
from moe.data import preprocess
from moe.data import sources

State = dict[str, int]
_STATE_KEYS = ("epoch", "index_in_epoch")


def position_state(position: int, num_examples: int) -> State:
  """The state {"epoch", "index_in_epoch"} of a stream position."""
  epoch, index = divmod(position, num_examples)
  return {"epoch": int(epoch), "index_in_epoch": int(index)}


def state_position(state: Mapping[str, int], num_examples: int) -> int:
  """The stream position of a state (ints or numpy scalars), checked."""
  if set(state) != set(_STATE_KEYS):
    raise ValueError(f"Train iterator state must have keys {_STATE_KEYS}, "
                     f"got {sorted(state)}.")
  epoch, index = (int(np.asarray(state[k])) for k in _STATE_KEYS)
  if epoch < 0 or not 0 <= index < num_examples:
    raise ValueError(f"Train iterator state {dict(state)} is out of range "
                     f"for {num_examples} examples per epoch.")
  return epoch * num_examples + index


class TrainIterator:
  """Infinite iterator over this process's train batches, checkpointable.

  Each `next()` returns a dict of numpy arrays with a leading batch axis of
  `batch_size` (B, the local batch: global batch / process count).

  Attributes:
    batch_size: B, examples per local batch.
    num_examples: N, examples per epoch in this process's slice.
  """

  def __init__(self, *, blocks: Sequence[sources.Block],
               decode: Callable[[tf.Tensor], dict],
               preprocess_fn: preprocess.Op, batch_size: int,
               shuffle_buffer: int, seed: int, process_index: int,
               prefetch: int, state: Mapping[str, int] | None = None):
    """Initialises the iterator; reading starts at the first `next()`.

    Args:
      blocks: this process's slice of the train split.
      decode: parses a serialized record into features.
      preprocess_fn: preprocessing of one example (`get_preprocess_fn`).
      batch_size: B, local batch size.
      shuffle_buffer: examples shuffled together (see `moe.data.order`).
      seed: data seed.
      process_index: this process; part of every example's augmentation seed.
      prefetch: batches prepared ahead.
      state: position to start from (`get_state()` of an earlier iterator);
        None starts at the beginning.
    """
    self._blocks = list(blocks)
    self._order = order_lib.EpochOrder([b.take for b in self._blocks],
                                       shuffle_buffer, seed)
    self._decode = decode
    self._preprocess_fn = preprocess_fn
    self._seed = seed
    self._process_index = process_index
    self._prefetch = prefetch
    self.batch_size = batch_size
    self.num_examples = self._order.num_examples
    self._position = 0
    self._batches = None
    if state is not None:
      self.set_state(state)

  def get_state(self) -> State:
    """Returns the position of the next example: {"epoch", "index_in_epoch"}."""
    return position_state(self._position, self.num_examples)

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `get_state` (ints or numpy scalars)."""
    self._position = state_position(state, self.num_examples)
    self._batches = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = self._dataset().as_numpy_iterator()
    batch = next(self._batches)
    self._position += self.batch_size
    return batch

  def _windows(self) -> tf.data.Dataset:
    """Returns (epoch, blocks, order, example_ids) of the stream's windows.

    Windows are numbered across epochs; the first one is the window of the
    current position, without the examples before the position.
    """
    per_epoch = self._order.windows_per_epoch
    epoch, index = divmod(self._position, self.num_examples)
    window, start = self._order.locate(epoch, index)
    first = epoch * per_epoch + window

    def plan(number):
      window = self._order.window(*divmod(int(number), per_epoch),
                                  start=start if number == first else 0)
      return window.blocks, window.order, window.example_ids

    def describe(number):
      blocks, order, example_ids = tf.numpy_function(
          plan, [number], (tf.int32, tf.int64, tf.int64), stateful=False)
      return (number // per_epoch, tf.ensure_shape(blocks, [None]),
              tf.ensure_shape(order, [None]),
              tf.ensure_shape(example_ids, [None]))

    return tf.data.Dataset.counter(first).map(describe)

  def _dataset(self) -> tf.data.Dataset:
    """Returns the batches of the stream from the current position."""
    filenames, skips, takes = sources.block_tensors(self._blocks)

    def load_window(epoch, blocks, order, example_ids):
      window_takes = tf.gather(takes, blocks)
      records = sources.read_records(tf.gather(filenames, blocks),
                                     tf.gather(skips, blocks), window_takes)
      window = records.batch(tf.reduce_sum(window_takes)).get_single_element()
      epochs = tf.fill(tf.shape(example_ids), epoch)
      return tf.gather(window, order), epochs, example_ids

    def prepare(record, epoch, example_id):
      rng = preprocess.example_seed(self._seed, self._process_index, epoch,
                                    example_id)
      return preprocess.apply_seeded(self._preprocess_fn, self._decode(record),
                                     rng)

    examples = self._windows().map(load_window).prefetch(1).unbatch()
    batches = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
    batches = batches.batch(self.batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return batches.prefetch(self._prefetch).with_options(options)
