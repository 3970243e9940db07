"""The train stream's order: a permutation per epoch, locatable anywhere."""
import numpy as np
import pytest

from moe.data import order as order_lib

_BLOCK_SIZES = [5, 3, 7, 1, 4, 6]


def _epoch_ids(plan, epoch):
  return np.concatenate([plan.window(epoch, w).example_ids
                         for w in range(plan.windows_per_epoch)])


@pytest.mark.parametrize("shuffle_buffer", [1, 8, 12, 26, 1000])
def test_every_epoch_is_a_permutation(shuffle_buffer):
  plan = order_lib.EpochOrder(_BLOCK_SIZES, shuffle_buffer, seed=3)
  epochs = [_epoch_ids(plan, e) for e in range(3)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(26))
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[2], _epoch_ids(plan, 2))


def test_windows_group_whole_blocks():
  plan = order_lib.EpochOrder(_BLOCK_SIZES, shuffle_buffer=9, seed=0)
  assert plan.blocks_per_window == 2 and plan.windows_per_epoch == 3
  starts = np.cumsum(_BLOCK_SIZES) - _BLOCK_SIZES
  window = plan.window(epoch=1, index=0)
  block_of = np.searchsorted(starts, window.example_ids, side="right") - 1
  assert set(block_of) == set(window.blocks)


@pytest.mark.parametrize("shuffle_buffer", [1, 9, 1000])
def test_locate_and_start_resume_the_stream(shuffle_buffer):
  plan = order_lib.EpochOrder(_BLOCK_SIZES, shuffle_buffer, seed=1)
  stream = _epoch_ids(plan, 2)
  for index in range(26):
    window, start = plan.locate(2, index)
    rest = [plan.window(2, window, start).example_ids] + [
        plan.window(2, w).example_ids
        for w in range(window + 1, plan.windows_per_epoch)]
    np.testing.assert_array_equal(np.concatenate(rest), stream[index:])


def test_seed_changes_the_order():
  first = _epoch_ids(order_lib.EpochOrder(_BLOCK_SIZES, 100, seed=0), 0)
  second = _epoch_ids(order_lib.EpochOrder(_BLOCK_SIZES, 100, seed=1), 0)
  assert not np.array_equal(first, second)


def test_bad_arguments():
  with pytest.raises(ValueError, match="positive block sizes"):
    order_lib.EpochOrder([3, 0], 10, seed=0)
  with pytest.raises(ValueError, match="index_in_epoch"):
    order_lib.EpochOrder([3], 10, seed=0).locate(0, 3)
