"""The order of the train stream: a pure function of (seed, epoch).

A process's slice of the train split is a list of K blocks (contiguous runs of
records, `moe.data.sources.Block`) holding N examples, numbered 0..N-1 in
block order. One epoch visits every example once:

  1. the blocks are permuted with `RandomState([seed, epoch])`;
  2. the permuted blocks are cut into windows of `blocks_per_window`
     consecutive blocks (the last window of an epoch may be smaller);
  3. the examples of window w are permuted with
     `RandomState([seed, epoch, w])`.

The stream is epoch 0, epoch 1, ...; a position in it is
(epoch, index_in_epoch). `locate` finds the window of any position and
`window` lists its examples without touching the data, so resuming costs
nothing but reading the window the position falls in.

When one window holds all blocks (shuffle buffer >= N) an epoch is a uniform
random permutation; otherwise it is a shuffle at block granularity plus a
uniform shuffle inside each window (like tfds' file shuffling plus a shuffle
buffer, but repeatable from any position). Windows are W = blocks_per_window
blocks; M counts a window's examples.

numpy keeps the streams of its legacy `RandomState` frozen, so an order (and
a resumed run) survives numpy upgrades.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
  """The examples of one window, in stream order, from a start position.

  Attributes:
    blocks: int32 [W], the window's blocks in read order.
    order: int64 [M], positions within the concatenated records of `blocks`,
      in stream order; M is the window's size minus the examples already
      consumed.
    example_ids: int64 [M], the example numbers (0..N-1) at `order`.
  """
  blocks: np.ndarray
  order: np.ndarray
  example_ids: np.ndarray


class EpochOrder:
  """The window plan of a slice of blocks.

  Attributes:
    block_sizes: int64 [K], examples per block.
    num_examples: N, examples per epoch.
    blocks_per_window: blocks shuffled together.
    seed: the data seed.
  """

  def __init__(self, block_sizes: Sequence[int], shuffle_buffer: int,
               seed: int):
    """Initialises the plan.

    Args:
      block_sizes: examples per block, all positive.
      shuffle_buffer: examples shuffled together; rounded down to whole
        blocks of the mean size, at least one block.
      seed: the data seed.
    """
    self.block_sizes = np.asarray(block_sizes, np.int64)
    if self.block_sizes.size == 0 or np.any(self.block_sizes <= 0):
      raise ValueError(f"Need at least one block and positive block sizes, "
                       f"got {list(block_sizes)}.")
    self.num_examples = int(self.block_sizes.sum())
    num_blocks = len(self.block_sizes)
    self.blocks_per_window = int(
        np.clip(shuffle_buffer * num_blocks // self.num_examples, 1,
                num_blocks))
    self.seed = seed
    self._block_starts = np.cumsum(self.block_sizes) - self.block_sizes

  @property
  def windows_per_epoch(self) -> int:
    """Number of windows in every epoch."""
    return math.ceil(len(self.block_sizes) / self.blocks_per_window)

  def _window_blocks(self, epoch: int) -> list[np.ndarray]:
    """Returns the block ids of each window of `epoch`, in stream order."""
    blocks = np.random.RandomState([self.seed, epoch]).permutation(
        len(self.block_sizes))
    return [blocks[i:i + self.blocks_per_window]
            for i in range(0, len(blocks), self.blocks_per_window)]

  def locate(self, epoch: int, index_in_epoch: int) -> tuple[int, int]:
    """Returns where a position of the stream lies.

    Args:
      epoch: the position's epoch.
      index_in_epoch: the position within the epoch, 0..N-1.

    Returns:
      (window, start): the window of `epoch` holding the position, and the
      number of examples of that window before it.
    """
    if not 0 <= index_in_epoch < self.num_examples:
      raise ValueError(f"index_in_epoch must be in [0, {self.num_examples}), "
                       f"got {index_in_epoch}.")
    sizes = [self.block_sizes[b].sum() for b in self._window_blocks(epoch)]
    ends = np.cumsum(sizes)
    window = int(np.searchsorted(ends, index_in_epoch, side="right"))
    return window, int(index_in_epoch - (ends[window] - sizes[window]))

  def window(self, epoch: int, index: int, start: int = 0) -> Window:
    """Returns window `index` of `epoch` without its first `start` examples.

    Args:
      epoch: the epoch.
      index: the window, 0..windows_per_epoch-1.
      start: examples of the window already consumed.

    Returns:
      The window's remaining examples in stream order.
    """
    blocks = self._window_blocks(epoch)[index]
    ids = np.concatenate([
        np.arange(self._block_starts[b], self._block_starts[b] + size)
        for b, size in zip(blocks, self.block_sizes[blocks])])
    order = np.random.RandomState([self.seed, epoch, index]).permutation(
        len(ids))[start:]
    return Window(blocks=blocks.astype(np.int32),
                  order=order.astype(np.int64), example_ids=ids[order])
