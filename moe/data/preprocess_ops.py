"""The registered preprocessing ops (see `moe.data.preprocess`).

Each factory below returns a function `Features -> Features` on one example.
Images are [height, width, channels] tensors; `key` selects the feature an op reads and
writes. Random ops draw stateless seeds with `preprocess.take_seed`, so their
output is a pure function of the example's seed.

Sizes are an int (square) or an (h, w) pair. Areas of inception crops are in
percent of the image area, as in the Inception and big_vision papers' code.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from moe.data import preprocess
from moe.data.preprocess import Features

Size = int | Sequence[int]


def _hw(size: Size) -> tuple[int, int]:
  """Returns (h, w) for an int or an (h, w) pair."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _resize(image: tf.Tensor, size: Size, method: str,
            antialias: bool) -> tf.Tensor:
  """Resizes [height, width, channels] to [h, w, channels], keeping the dtype (integers rounded)."""
  resized = tf.image.resize(image, _hw(size), method=method,
                            antialias=antialias)
  if image.dtype.is_integer:
    return tf.saturate_cast(tf.round(resized), image.dtype)
  return tf.cast(resized, image.dtype)


def _inception_box(image_shape: tf.Tensor, seed: tf.Tensor, area_min: float,
                   area_max: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Samples an Inception-style crop box.

  Args:
    image_shape: int32 [3], (height, width, channels).
    seed: int64 [2] stateless seed.
    area_min: smallest crop area, percent of the image.
    area_max: largest crop area, percent of the image.

  Returns:
    (begin, size), int32 [3] each, as for `tf.slice`.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      area_range=(area_min / 100.0, area_max / 100.0),
      min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True)
  return begin, size


@preprocess.register()
def decode(channels: int | None = None, key: str = "image"):
  """Decodes an encoded (PNG, JPEG, ...) image; no-op if already decoded.

  Args:
    channels: channels of the decoded image; None keeps the stored number.
    key: feature to decode.
  """

  def fn(data: Features) -> Features:
    image = data[key]
    if image.dtype != tf.string:
      return data
    decoded = tf.io.decode_image(image, channels=channels or 0,
                                 expand_animations=False)
    return {**data, key: decoded}

  return fn


@preprocess.register()
def resize(size: Size, method: str = "bilinear", antialias: bool = False,
           key: str = "image"):
  """Resizes the image to `size` (dtype kept; integer images are rounded)."""

  def fn(data: Features) -> Features:
    return {**data, key: _resize(data[key], size, method, antialias)}

  return fn


@preprocess.register()
def central_crop(size: Size, key: str = "image"):
  """Crops the central (h, w) window of the image."""
  h, w = _hw(size)

  def fn(data: Features) -> Features:
    image = data[key]
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return {**data, key: image[top:top + h, left:left + w]}

  return fn


@preprocess.register()
def random_crop(size: Size, key: str = "image"):
  """Crops a uniformly placed (h, w) window of the image."""
  h, w = _hw(size)

  def fn(data: Features) -> Features:
    seed, data = preprocess.take_seed(data)
    image = data[key]
    crop_shape = tf.stack([h, w, tf.shape(image)[-1]])
    return {**data, key: tf.image.stateless_random_crop(image, crop_shape,
                                                        seed)}

  return fn


@preprocess.register()
def inception_crop(size: Size | None = None, area_min: float = 5,
                   area_max: float = 100, method: str = "bilinear",
                   antialias: bool = False, key: str = "image"):
  """Inception-style random crop of a decoded image, resized to `size`.

  Args:
    size: output (h, w); None keeps the crop's own size.
    area_min: smallest crop area, percent of the image.
    area_max: largest crop area, percent of the image.
    method: resize method.
    antialias: whether resizing antialiases.
    key: image feature.
  """

  def fn(data: Features) -> Features:
    seed, data = preprocess.take_seed(data)
    image = data[key]
    begin, box = _inception_box(tf.shape(image), seed, area_min, area_max)
    crop = tf.slice(image, begin, box)
    if size is not None:
      crop = _resize(crop, size, method, antialias)
    return {**data, key: crop}

  return fn


@preprocess.register()
def decode_jpeg_and_inception_crop(size: Size | None = None,
                                   area_min: float = 5, area_max: float = 100,
                                   method: str = "bilinear",
                                   antialias: bool = False,
                                   key: str = "image"):
  """`inception_crop` of an encoded JPEG that decodes only the crop.

  Takes the arguments of `inception_crop`; the output has 3 channels.
  """

  def fn(data: Features) -> Features:
    seed, data = preprocess.take_seed(data)
    jpeg = data[key]
    begin, box = _inception_box(tf.image.extract_jpeg_shape(jpeg), seed,
                                area_min, area_max)
    window = tf.stack([begin[0], begin[1], box[0], box[1]])
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    if size is not None:
      crop = _resize(crop, size, method, antialias)
    return {**data, key: crop}

  return fn


@preprocess.register()
def flip_lr(key: str = "image"):
  """Flips the image left-right with probability 1/2."""

  def fn(data: Features) -> Features:
    seed, data = preprocess.take_seed(data)
    return {**data,
            key: tf.image.stateless_random_flip_left_right(data[key], seed)}

  return fn


@preprocess.register()
def value_range(vmin: float, vmax: float, in_min: float = 0.0,
                in_max: float = 255.0, clip_values: bool = False,
                key: str = "image"):
  """Maps values linearly from [in_min, in_max] to float32 [vmin, vmax].

  Args:
    vmin: output value of `in_min`.
    vmax: output value of `in_max`.
    in_min: input value mapped to `vmin`.
    in_max: input value mapped to `vmax`.
    clip_values: whether to clip the output to [vmin, vmax].
    key: feature to map.
  """

  def fn(data: Features) -> Features:
    x = tf.cast(data[key], tf.float32)
    x = vmin + (x - in_min) * ((vmax - vmin) / (in_max - in_min))
    if clip_values:
      x = tf.clip_by_value(x, vmin, vmax)
    return {**data, key: x}

  return fn


@preprocess.register()
def onehot(depth: int, key: str = "label", key_result: str | None = None,
           on: float = 1.0, off: float = 0.0):
  """One-hot encodes integer labels: [...] -> float32 [..., depth].

  Args:
    depth: number of classes.
    key: integer label feature.
    key_result: output feature; defaults to `key` (replaced).
    on: value at the label's position.
    off: value elsewhere.
  """

  def fn(data: Features) -> Features:
    labels = tf.one_hot(data[key], depth, on_value=on, off_value=off,
                        dtype=tf.float32)
    return {**data, key_result or key: labels}

  return fn


@preprocess.register()
def keep(*keys: str):
  """Keeps only the given features (the pipeline's seed is kept too)."""
  kept = set(keys) | {preprocess.RNG_KEY}

  def fn(data: Features) -> Features:
    missing = set(keys) - set(data)
    if missing:
      raise KeyError(f"keep{keys}: no features {sorted(missing)}; the "
                     f"example has {sorted(data)}.")
    return {k: v for k, v in data.items() if k in kept}

  return fn


@preprocess.register()
def grayscale_to_rgb(key: str = "image"):
  """Repeats a 1-channel image to 3 channels; 3-channel images pass."""

  def fn(data: Features) -> Features:
    image = data[key]
    if image.shape[-1] == 3:
      return data
    return {**data, key: tf.image.grayscale_to_rgb(image)}

  return fn
