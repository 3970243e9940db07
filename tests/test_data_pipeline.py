"""Train and eval pipelines: shapes, process slices, resumption, errors."""
import socket

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe import data
from moe.data import digits
from moe.data import preprocess
from moe.data import sources
from moe.data import train_iterator
from moe.parallel import partitioning

_PP_WITH_IDS = ("decode|value_range(-1, 1)|onehot(10, key_result='labels')"
                "|keep('image', 'labels', 'id')")
_PP_AUGMENTED = ("decode|random_crop(6)|resize(8)|flip_lr|value_range(0, 1)"
                 "|keep('image', 'label', 'id')")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.load_builder("digits", data_dir)
  return data_dir


@pytest.fixture
def config(data_dir):
  config = data.default_config()
  config.data_dir = data_dir
  config.pp_train = _PP_WITH_IDS
  config.pp_eval = _PP_WITH_IDS
  config.batch_size = 64
  config.eval_batch_size = 64
  return config


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      assert want[key].dtype == got[key].dtype
      np.testing.assert_array_equal(want[key], got[key])


def test_train_batch_shapes(config):
  config.pp_train = data.default_config().pp_train
  batch = next(data.make_train_iterator(config))
  assert batch["image"].shape == (64, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["labels"].shape == (64, 10)
  np.testing.assert_array_equal(batch["labels"].sum(-1), 1)


def test_epoch_visits_every_example_once(config):
  config.batch_size = 479  # 3 batches = one epoch of 1,437.
  ids = np.concatenate([b["id"] for b in _take(
      data.make_train_iterator(config), 6)])
  train_rows = np.sort(digits.split_rows()["train"])
  np.testing.assert_array_equal(np.sort(ids[:1437]), train_rows)
  np.testing.assert_array_equal(np.sort(ids[1437:]), train_rows)
  assert not np.array_equal(ids[:1437], ids[1437:])


def test_processes_read_disjoint_slices_covering_the_split(config):
  config.batch_size = 2 * 359  # 2 local batches = one epoch of 718.
  slices = []
  for process_index in range(2):
    iterator = data.make_train_iterator(config, process_index=process_index,
                                        process_count=2)
    assert iterator.num_examples == 718 and iterator.batch_size == 359
    slices.append(np.concatenate([b["id"] for b in _take(iterator, 2)]))
  assert all(len(np.unique(s)) == 718 for s in slices)
  assert not set(slices[0]) & set(slices[1])
  covered = set(slices[0]) | set(slices[1])
  assert len(covered) == 1436  # The remainder example is dropped.
  assert covered <= set(digits.split_rows()["train"])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_example_once(config, process_count):
  config.eval_batch_size = 8 * process_count
  seen, num_batches = [], set()
  for process_index in range(process_count):
    evaluation = data.make_eval_data(config, process_index=process_index,
                                     process_count=process_count)
    batches = list(evaluation)
    num_batches.add(len(batches))
    assert len(batches) == evaluation.num_batches
    for batch in batches:
      assert batch[data.MASK_KEY].dtype == bool
      assert all(len(x) == 8 for x in batch.values())
      seen.append(batch["id"][batch[data.MASK_KEY]])
      np.testing.assert_array_equal(
          batch["image"][~batch[data.MASK_KEY]], 0)
  seen = np.concatenate(seen)
  assert len(num_batches) == 1
  assert len(seen) == 360
  np.testing.assert_array_equal(np.sort(seen),
                                np.sort(digits.split_rows()["test"]))


def test_eval_passes_repeat_with_cache(config):
  config.cache_eval = True
  evaluation = data.make_eval_data(config)
  _assert_batches_equal(list(evaluation), list(evaluation))


@pytest.mark.parametrize("pp,shuffle_buffer", [(_PP_WITH_IDS, 50_000),
                                               (_PP_AUGMENTED, 50_000),
                                               (_PP_AUGMENTED, 1)])
def test_resume_continues_bitwise(config, tmp_path, pp, shuffle_buffer):
  config.pp_train = pp
  config.shuffle_buffer = shuffle_buffer
  straight = _take(data.make_train_iterator(config), 30)  # 1.3 epochs.
  interrupted = data.make_train_iterator(config)
  _take(interrupted, 17)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(17, args=ocp.args.Composite(
        data=ocp.args.JsonSave(interrupted.get_state())))
    manager.wait_until_finished()
    saved = manager.restore(17, args=ocp.args.Composite(
        data=ocp.args.JsonRestore()))["data"]
  assert saved == {"epoch": 0, "index_in_epoch": 17 * 64}
  resumed = data.make_train_iterator(config, state=saved)
  _assert_batches_equal(straight[17:], _take(resumed, 13))


def test_set_state_accepts_numpy_scalars_and_rewinds(config):
  iterator = data.make_train_iterator(config)
  first = _take(iterator, 3)
  iterator.set_state({"epoch": np.int64(0), "index_in_epoch": np.int32(64)})
  _assert_batches_equal(first[1:], _take(iterator, 2))
  with pytest.raises(ValueError, match="keys"):
    iterator.set_state({"step": 3})
  with pytest.raises(ValueError, match="out of range"):
    iterator.set_state({"epoch": 0, "index_in_epoch": 5000})


def test_resume_across_shuffle_windows_of_many_blocks(data_dir):
  # One block per 100 records of the single train file: 15 blocks, windows
  # of 3 blocks, so resuming lands mid-window and windows cross epochs.
  builder = sources.load_builder("digits", data_dir)
  (whole,) = sources.process_blocks(builder, "train", process_index=0,
                                    process_count=1, drop_remainder=True)
  blocks = [sources.Block(whole.filename, skip, min(100, 1437 - skip))
            for skip in range(0, 1437, 100)]

  def make(state=None):
    return train_iterator.TrainIterator(
        blocks=blocks, decode=sources.make_decoder(builder),
        preprocess_fn=preprocess.get_preprocess_fn(_PP_AUGMENTED),
        batch_size=50, shuffle_buffer=300, seed=7, process_index=0,
        prefetch=1, state=state)

  straight = _take(make(), 40)
  ids = np.concatenate([b["id"] for b in straight])
  np.testing.assert_array_equal(np.sort(ids[:1437]),
                                np.sort(digits.split_rows()["train"]))
  for resume_at in (7, 31):
    interrupted = make()
    _take(interrupted, resume_at)
    _assert_batches_equal(straight[resume_at:],
                          _take(make(interrupted.get_state()),
                                40 - resume_at))


@pytest.fixture
def no_network(monkeypatch):
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access attempted in a test")

  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)
  return attempts


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet2012",
                                  "no_such_dataset"])
def test_missing_dataset_is_a_clear_error(config, tmp_path, no_network,
                                          name):
  config.name = name
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    data.make_train_iterator(config)
  message = str(error.value)
  assert repr(name) in message and repr(str(tmp_path)) in message
  assert f"tfds build {name}" in message
  assert not no_network
  assert not list(tmp_path.iterdir())


def test_missing_data_dir_is_a_clear_error(config, tmp_path, no_network):
  config.name = "cifar100"
  config.data_dir = str(tmp_path / "not_there")
  with pytest.raises(FileNotFoundError, match="'cifar100' is not prepared in "
                     "data dir '.*not_there'"):
    data.make_eval_data(config)
  assert not no_network
  assert not (tmp_path / "not_there").exists()


def test_bad_batch_size_and_split(config):
  config.batch_size = 63
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    data.make_train_iterator(config, process_index=0, process_count=2)
  config.batch_size = 64
  config.train_split = "validation"
  with pytest.raises(ValueError, match="split 'validation'.*'test', 'train'"):
    data.make_train_iterator(config)


def test_global_array_on_eight_devices(config, eight_devices):
  mesh = Mesh(np.array(eight_devices).reshape(4, 2), ("data", "expert"))
  sharding = NamedSharding(mesh, P(("data", "expert")))
  batch = next(data.make_train_iterator(config))
  global_batch = partitioning.shard_batch(batch, mesh)
  for key, local in batch.items():
    array = global_batch[key]
    assert isinstance(array, jax.Array)
    assert array.shape == local.shape and array.sharding == sharding
    assert {s.data.shape[0] for s in array.addressable_shards} == {8}
    np.testing.assert_array_equal(np.asarray(array), local)
