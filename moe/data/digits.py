"""The embedded dataset: scikit-learn's handwritten digits as a tfds dataset.

scikit-learn ships the UCI optical-recognition digits inside its package
(`sklearn.datasets.load_digits`), so this dataset is prepared from local files
with no download: 1,797 grayscale images of 8x8 pixels, 10 classes.

Features:
  image: uint8 [8, 8, 1]; the original pixel counts 0..16 are rescaled to
    0..255 with `round(v * 255 / 16)`.
  label: int64 class 0..9.
  id: int32 row of the example in `load_digits()` (stable example identity).

Splits (deterministic, not stratified): the 1,797 rows are permuted by
`np.random.RandomState(0).permutation`, whose stream numpy keeps frozen across
versions; the first 1,437 rows of the permutation are `train`, the last 360
are `test`. Each class has 28 to 44 test examples.

Importing this module registers the builder with tfds under the name
"digits"; `moe.data.sources` prepares it on first use.
"""
from __future__ import annotations

import io

from etils import epath
import numpy as np
from PIL import Image as pil_image
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN
NUM_CLASSES = 10
SPLIT_SEED = 0
_MAX_PIXEL = 16


def split_rows() -> dict[str, np.ndarray]:
  """Returns the rows of `load_digits()` in each split.

  Returns:
    {"train": int64 [1437], "test": int64 [360]}, disjoint, covering
    0..1796.
  """
  order = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {"train": order[:NUM_TRAIN], "test": order[NUM_TRAIN:]}


def encode_png(image: np.ndarray) -> bytes:
  """Returns the PNG bytes of a uint8 [H, W, 1] grayscale image.

  PIL encodes in microseconds; tfds' own encoder would start a TF graph
  session, which costs seconds for a dataset this small.
  """
  buffer = io.BytesIO()
  pil_image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


def to_uint8_images(images: np.ndarray) -> np.ndarray:
  """Rescales digit images from 0..16 to uint8 0..255.

  Args:
    images: float [N, 8, 8] pixel counts in 0..16.

  Returns:
    uint8 [N, 8, 8, 1].
  """
  scaled = np.round(np.asarray(images, np.float64) * 255.0 / _MAX_PIXEL)
  return scaled.astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn handwritten digits (8x8 grayscale, 10 classes).

  Also the base of the other embedded image datasets (`moe.data.mnist5k`),
  which set the class attributes below and `_split_generators`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Shadows tfds' `code_path` class property, which for builders outside the
  # tensorflow_datasets package needs the optional `importlib_resources`.
  code_path = epath.Path(__file__)
  IMAGE_SHAPE = (8, 8, 1)
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html"
  DESCRIPTION = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "id": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    digits = sklearn_datasets.load_digits()
    images = to_uint8_images(digits.images)
    labels = digits.target.astype(np.int64)
    return {
        name: self._generate_examples(images, labels, rows)
        for name, rows in split_rows().items()
    }

  def _generate_examples(self, images, labels, rows):
    for row in rows:
      yield int(row), {
          "image": encode_png(images[row]),
          "label": labels[row],
          "id": np.int32(row),
      }
