"""Train and eval data held in memory: dicts of numpy arrays.

For tasks whose examples are computed rather than read (the frozen
embeddings of `moe.train.smec_task`). The same contracts as the tfds
pipeline (`input_pipeline`):

  ArrayTrainIterator  infinite, checkpointable: the stream is epoch 0,
                      epoch 1, ..., epoch e the rows of this process's
                      slice in the order `RandomState([seed, e])`
                      permutes them; a batch may straddle two epochs. Its
                      state is {"epoch", "index_in_epoch"}, as
                      `TrainIterator`'s.
  ArrayEvalData       this process's share of the rows in padded batches
                      with `MASK_KEY`, every process the same number.

Shapes: N rows, B local batch size.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping

import numpy as np

from moe.data import input_pipeline
from moe.data import train_iterator

Arrays = Mapping[str, np.ndarray]


def _num_rows(arrays: Arrays, field: str) -> int:
  sizes = {key: len(value) for key, value in arrays.items()}
  if not sizes or len(set(sizes.values())) != 1:
    raise ValueError(f"{field} must be a non-empty dict of arrays with one "
                     f"leading size; got sizes {sizes}.")
  return next(iter(sizes.values()))


def _local_batch(batch_size: int, process_count: int, field: str) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"{field} ({batch_size}) must be a positive multiple "
                     f"of the process count ({process_count}).")
  return batch_size // process_count


class ArrayTrainIterator:
  """Infinite, checkpointable iterator over local batches of arrays.

  Attributes:
    batch_size: B, examples per local batch.
    num_examples: N, rows of this process's slice (one epoch).
  """

  def __init__(self, arrays: Arrays, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               state: Mapping[str, int] | None = None):
    """Initialises the iterator.

    Args:
      arrays: the train rows, every array `[N_all, ...]`; the process cuts
        them into `process_count` equal slices (the remainder is dropped).
      batch_size: the global batch, a multiple of `process_count`.
      seed: the order's seed.
      process_index: this process.
      process_count: processes.
      state: position to start from (`get_state()`); None: the start.
    """
    total = _num_rows(arrays, "arrays")
    self.batch_size = _local_batch(batch_size, process_count,
                                   "config.dataset.batch_size")
    self.num_examples = total // process_count
    if self.num_examples < 1:
      raise ValueError(f"{total} rows cannot be split over {process_count} "
                       "processes.")
    start = process_index * self.num_examples
    self._arrays = {key: np.asarray(value)[start:start + self.num_examples]
                    for key, value in arrays.items()}
    self._seed = seed
    self._position = 0
    if state is not None:
      self.set_state(state)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The row order `[N]` of `epoch`."""
    return np.random.RandomState([self._seed, epoch]).permutation(
        self.num_examples)

  def get_state(self) -> dict[str, int]:
    """The position of the next row: {"epoch", "index_in_epoch"}."""
    return train_iterator.position_state(self._position, self.num_examples)

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `get_state`."""
    self._position = train_iterator.state_position(state, self.num_examples)

  def __iter__(self) -> "ArrayTrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    positions = self._position + np.arange(self.batch_size)
    epochs, index = np.divmod(positions, self.num_examples)
    rows = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      rows[here] = self.epoch_order(int(epoch))[index[here]]
    self._position += self.batch_size
    return {key: value[rows] for key, value in self._arrays.items()}


class ArrayEvalData:
  """This process's share of eval rows, in padded batches (`EvalData`'s
  contract: `MASK_KEY` False on padding rows, the same `num_batches` on
  every process, each row real exactly once over all processes).

  Attributes:
    batch_size: B, local eval batch size.
    num_batches: batches per pass.
    num_examples: rows over all processes.
  """

  def __init__(self, arrays: Arrays, *, batch_size: int,
               process_index: int = 0, process_count: int = 1):
    """Initialises from all rows; `batch_size` is the global eval batch."""
    self.num_examples = _num_rows(arrays, "arrays")
    if self.num_examples < process_count:
      raise ValueError(f"{self.num_examples} eval rows are fewer than the "
                       f"{process_count} processes.")
    self.batch_size = _local_batch(batch_size, process_count,
                                   "config.dataset.eval_batch_size")
    bounds = np.linspace(0, self.num_examples, process_count + 1).astype(int)
    lo, hi = bounds[process_index], bounds[process_index + 1]
    self._arrays = {key: np.asarray(value)[lo:hi]
                    for key, value in arrays.items()}
    largest = math.ceil(self.num_examples / process_count)
    self.num_batches = math.ceil(largest / self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for b in range(self.num_batches):
      rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
      yield input_pipeline.padded_batch(
          {key: value[rows] for key, value in self._arrays.items()},
          self.batch_size)
