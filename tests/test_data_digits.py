"""The embedded digits dataset: sizes, content and a deterministic split."""
import os

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

from moe.data import digits
from moe.data import sources


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(data_dir):
  return sources.load_builder("digits", data_dir)


def _split_arrays(builder, split):
  examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def test_split_sizes(builder):
  splits = builder.info.splits
  assert splits["train"].num_examples == digits.NUM_TRAIN == 1437
  assert splits["test"].num_examples == digits.NUM_TEST == 360
  assert builder.info.features["label"].num_classes == 10


@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_match_scikit_learn(builder, split):
  arrays = _split_arrays(builder, split)
  reference = sklearn_datasets.load_digits()
  rows = arrays["id"]
  assert arrays["image"].shape == (len(rows), 8, 8, 1)
  assert arrays["image"].dtype == np.uint8
  assert arrays["label"].dtype == np.int64
  assert set(np.unique(arrays["label"])) == set(range(10))
  expected_images = np.round(reference.images[rows] * 255 / 16)
  np.testing.assert_array_equal(arrays["image"][..., 0], expected_images)
  np.testing.assert_array_equal(arrays["label"], reference.target[rows])
  assert sorted(rows) == sorted(digits.split_rows()[split])


def test_split_is_deterministic_and_partitions_the_data():
  first, second = digits.split_rows(), digits.split_rows()
  np.testing.assert_array_equal(first["train"], second["train"])
  np.testing.assert_array_equal(first["test"], second["test"])
  rows = np.concatenate([first["train"], first["test"]])
  np.testing.assert_array_equal(np.sort(rows), np.arange(1797))


def test_prepared_once_then_reused(data_dir, builder):
  info_file = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
  written = os.stat(info_file).st_mtime_ns
  again = sources.load_builder("digits", data_dir)
  assert os.fspath(again.data_path) == os.fspath(builder.data_path)
  assert os.stat(info_file).st_mtime_ns == written


def test_default_data_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv(sources.MOE_DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(sources.TFDS_DATA_DIR_ENV, raising=False)
  assert sources.resolve_data_dir("digits") == str(
      tmp_path / ".cache" / "moe" / "tensorflow_datasets")
  assert sources.resolve_data_dir("mnist") == str(
      tmp_path / "tensorflow_datasets")
  monkeypatch.setenv(sources.MOE_DATA_DIR_ENV, str(tmp_path / "moe"))
  monkeypatch.setenv(sources.TFDS_DATA_DIR_ENV, str(tmp_path / "tfds"))
  assert sources.resolve_data_dir("digits") == str(tmp_path / "moe")
  assert sources.resolve_data_dir("mnist:3.0.1") == str(tmp_path / "tfds")
  assert sources.resolve_data_dir("mnist", "/explicit") == "/explicit"


def test_prepares_in_default_location(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv(sources.MOE_DATA_DIR_ENV, raising=False)
  builder = sources.load_builder("digits")
  assert os.fspath(builder.data_path).startswith(
      str(tmp_path / ".cache" / "moe" / "tensorflow_datasets"))
  assert builder.info.splits["train"].num_examples == 1437
