"""Two-digit addition as a next-token task for a causal decoder.

The data is `moe.data.addition`: rows of 11 tokens `ab+cd=` followed by the
5-digit sum (e.g. "36+28=00064"), split into train and held-out pairs by
`split_seed` and `test_fraction`, served through the data layer's in-memory
iterators (`moe.data.ArrayTrainIterator`, `ArrayEvalData`).

The model (`config.model.name` "decoder", `moe.nn.decoder`) reads the first
10 tokens `x = tokens[:, :-1]` and returns logits `[B, 10, V]`; the logits
at position t predict token t + 1. Only the answer counts: the 5 positions
4 + j (j = 1..5) predict the answer tokens `tokens[:, 5 + j]`, so the
question digits, which are random, never enter the loss.

Train loss: the mean over the batch and the 5 answer positions of the
softmax cross-entropy, plus `aux_loss_weight` times the model's
`auxiliary_loss` (MoE routers; 0 for a dense model).

Metrics (train: batch means, written as `train_<name>`; eval: means over
the real rows of the eval split, `eval_<name>`):

  loss            train: the total; eval: the cross-entropy alone.
  task_loss       train only: the cross-entropy.
  token_accuracy  the fraction of answer tokens whose argmax is right.
  exact_match     the fraction of rows with all 5 answer tokens right. Under
                  teacher forcing this equals greedy decoding: if all 5
                  teacher-forced argmaxes are right, greedy decoding feeds
                  itself exactly the true prefix at every step and so makes
                  the same 5 predictions; if one is wrong, the first wrong
                  one is made from the true prefix in both, so greedy
                  decoding is wrong too. (Token accuracy is not equal: after
                  a mistake greedy decoding continues from a wrong prefix.)
  edge_fraction   with the decoder's attention metrics: the mean over blocks
                  and heads of the fraction of allowed attention edges in
                  use; each `encoderblock_N/attention/<metric>` `[H]` is
                  also reported as its mean over the heads.
  and the model's other metrics (`task_parts.scalar_model_metrics`); eval
  averages them over batches, padding rows included.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from clu import metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from moe import data as data_lib
from moe.config import schema
from moe.data import addition
from moe.train import task_parts

Batch = Mapping[str, jax.Array]
PyTree = Any
FIELD = "config.task"
DATASET_NAME = "addition"
ATTENTION = "/attention/"
EDGE_FRACTION = "edge_fraction"


def model_scalars(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The model's metrics as scalars, attention metrics averaged over heads.

  Args:
    metrics: the decoder's metrics: `auxiliary_loss`, MoE metrics and
      `encoderblock_N/attention/<name>` (`[H]` or scalars).

  Returns:
    float32 scalars: each attention metric's mean over the heads, their
    overall mean `edge_fraction` (when the blocks report one), and the other
    metrics as `task_parts.scalar_model_metrics` makes them.
  """
  attention = {name: jnp.mean(jnp.asarray(value, jnp.float32))
               for name, value in metrics.items() if ATTENTION in name}
  others = {name: value for name, value in metrics.items()
            if name not in attention}
  scalars = {**task_parts.scalar_model_metrics(others), **attention}
  fractions = [value for name, value in attention.items()
               if name.endswith(ATTENTION + EDGE_FRACTION)]
  if fractions:
    scalars[EDGE_FRACTION] = jnp.mean(jnp.stack(fractions))
  return scalars


def answer_scores(logits: jax.Array, tokens: jax.Array
                  ) -> dict[str, jax.Array]:
  """Per-row loss and accuracies on the answer tokens.

  Args:
    logits: `[B, 10, V]`, the model's output for `tokens[:, :-1]`.
    tokens: int `[B, 11]`, the rows.

  Returns:
    float32 `[B]` each: `loss` (mean cross-entropy over the 5 answer
    tokens), `token_accuracy` (the fraction of them right), `exact_match`
    (1 where all 5 are right).
  """
  start = addition.ANSWER_START
  predicted = logits[:, start - 1:]             # [B, 5, V]
  targets = tokens[:, start:]                   # [B, 5]
  xent = optax.softmax_cross_entropy_with_integer_labels(
      predicted.astype(jnp.float32), targets)
  right = (jnp.argmax(predicted, axis=-1) == targets).astype(jnp.float32)
  return {"loss": jnp.mean(xent, axis=-1),
          "token_accuracy": jnp.mean(right, axis=-1),
          "exact_match": jnp.min(right, axis=-1)}


@dataclasses.dataclass(frozen=True)
class SequenceTask:
  """Next-token training on the answers of `moe.data.addition` (module doc).

  Attributes:
    model: the decoder (`config.model`), `model.apply(variables, tokens,
      train=..., step=...)` -> `(logits [B, L, V], metrics)` with V the
      addition vocabulary.
    eval_model: the decoder used for evaluation (same parameters).
    dataset: `config.dataset`: `name` "addition", `train_split` and
      `eval_split` in "train", "test", "all", `batch_size`,
      `eval_batch_size`, and `seed` (the train order); its preprocessing,
      data dir, shuffle buffer, cache and prefetch fields do not apply to
      this generated, in-memory dataset.
    split_seed: seed of the train/test split of the 10,000 pairs, in
      [0, 2**32).
    test_fraction: the held-out fraction, in (0, 1).
    aux_loss_weight: weight of the model's `auxiliary_loss`, >= 0.
  """
  model: nn.Module
  eval_model: nn.Module
  dataset: data_lib.DatasetConfig
  split_seed: int = 0
  test_fraction: float = addition.DEFAULT_TEST_FRACTION
  aux_loss_weight: float = 0.01

  BUILT_FIELDS = ("model", "eval_model", "dataset")
  summary_metrics = ("eval_exact_match", "eval_token_accuracy", "eval_loss")

  def __post_init__(self):
    schema.check_choice(self.dataset.name, "config.dataset.name",
                        (DATASET_NAME,))
    for name in ("train_split", "eval_split"):
      schema.check_choice(getattr(self.dataset, name),
                          f"config.dataset.{name}", addition.SPLITS)
    addition.check_split(self.split_seed, self.test_fraction, FIELD)
    schema.check_number(self.aux_loss_weight, f"{FIELD}.aux_loss_weight")
    for model in (self.model, self.eval_model):
      vocab_size = getattr(model, "vocab_size", None)
      if vocab_size is None:
        raise TypeError("The addition task needs a token model "
                        "(config.model.name 'decoder'); got "
                        f"{type(model).__name__}.")
      if vocab_size != addition.VOCAB_SIZE:
        raise ValueError(
            f"config.model.vocab_size must be {addition.VOCAB_SIZE}, the "
            f"addition vocabulary {addition.VOCAB!r}; got {vocab_size!r}.")

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    """The attributes that `config.task` sets."""
    return task_parts.config_fields(cls)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SequenceTask":
    """Builds the task from the experiment config
    (`task_parts.task_from_config`)."""
    return task_parts.task_from_config(cls, config)

  def split(self, name: str) -> dict[str, Any]:
    """The rows of split `name`, {"tokens": int32 `[N, 11]`}."""
    return addition.load_split(name, seed=self.split_seed,
                               test_fraction=self.test_fraction, field=FIELD)

  def make_train_iterator(self) -> data_lib.ArrayTrainIterator:
    return data_lib.ArrayTrainIterator(
        self.split(self.dataset.train_split),
        batch_size=self.dataset.batch_size, seed=self.dataset.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def make_eval_data(self) -> data_lib.ArrayEvalData:
    return data_lib.ArrayEvalData(
        self.split(self.dataset.eval_split),
        batch_size=self.dataset.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    return self.model.init({"params": rng},
                           batch[addition.TOKENS][:, :-1],
                           train=False)["params"]

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens = batch[addition.TOKENS]
    logits, model_metrics = self.model.apply(
        {"params": params}, tokens[:, :-1], train=True, step=step,
        rngs=task_parts.model_rngs(rng))
    scores = {name: jnp.mean(value)
              for name, value in answer_scores(logits, tokens).items()}
    task_loss = scores.pop("loss")
    loss = task_loss + self.aux_loss_weight * model_metrics["auxiliary_loss"]
    return loss, {**model_scalars(model_metrics), **scores,
                  "loss": loss, "task_loss": task_loss}

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    logits, model_metrics = self.eval_outputs(params, batch, step)
    return self.metrics_of_outputs(logits, model_metrics, batch)

  def eval_outputs(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The eval model's `(logits [B, 10, V], metrics)` on a batch."""
    return self.eval_model.apply(
        {"params": params}, batch[addition.TOKENS][:, :-1], train=False,
        step=step)

  def metrics_of_outputs(self, logits: jax.Array,
                         model_metrics: Mapping[str, jax.Array],
                         batch: Batch) -> dict[str, clu_metrics.Metric]:
    """The eval metrics of `eval_outputs` on `batch` (module docstring)."""
    metrics = {name: clu_metrics.Average.from_model_output(value)
               for name, value in model_scalars(model_metrics).items()}
    mask = batch[data_lib.MASK_KEY]
    for name, value in answer_scores(
        logits, batch[addition.TOKENS]).items():
      metrics[name] = clu_metrics.Average.from_model_output(value, mask=mask)
    return metrics
