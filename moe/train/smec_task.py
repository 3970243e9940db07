"""SMEC (Zhang et al., EMNLP 2025) and its Matryoshka baseline as a task.

Compresses a frozen backbone's retrieval embeddings e `[D]` (computed once
from a trained run, `frozen_embeddings`) to d < D dimensions. Both methods
train an optional projection head h = W e + b (`head`; W starts at the
identity) and keep dimensions of h:

  smec  sequential Matryoshka learning (SMRL): the run's steps are cut into
        S equal stages, one per kept size d_1 > d_2 > ... > d_S (default
        D/2, D/4, D/8). Stage s learns logits l_s `[D]` over the pool P_s
        of candidate dimensions (all D for s = 1, the d_{s-1} dimensions
        stage s - 1 kept after) and trains the selector's mask m
        (`moe.compress.dimension_selection`) by the rank loss between e and
        h ⊙ m (`moe.compress.rank_loss`). At the first step of stage s + 1
        the top-d_s of l_s are cut into `kept[s]` and frozen; the head
        trains in stage 1 only, so later stages never move what earlier
        ones chose.
  mrl   Matryoshka representation learning: the head alone, trained on the
        mean over the d_s of the rank loss between e and the prefix
        h[:d_s]; at inference the first d dimensions.

Candidates of the rank loss: the other examples of the batch and, with
`cross_batch_memory` (S-XBM, `moe.compress.cross_batch_memory`), each
query's `memory_neighbors` most similar entries of a queue of the last
`memory_size` train embeddings, updated after every step.

Parameters: {"logits" [S, D], "kept" [S, D] (0/1, cut at stage ends),
"head" {"kernel" [D, D], "bias" [D]}, "memory" {...}}, the entries each
method uses; only the logits of the current stage and the head (stage 1)
receive updates (`mask_updates`), the rest is state, checkpointed with them.

Metrics. Train: `loss`, `stage` (0-based), `mask_sum` (the mask's total: d
for hard selectors), `memory_filled`. Eval: retrieval of the test split in
the train split by class (`moe.compress.retrieval`): `ndcg10_d<d>`,
`recall10_d<d>`, `map100_d<d>` for every kept size and `*_full` for e;
for stages not reached yet, their current top-d.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

from clu import metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe import data as data_lib
from moe.compress import cross_batch_memory as xbm
from moe.compress import dimension_selection as selection
from moe.compress import rank_loss
from moe.compress import retrieval
from moe.config import schema
from moe.train import frozen_embeddings
from moe.train import task_parts

Batch = Mapping[str, jax.Array]
PyTree = Any
METHODS = ("smec", "mrl")
LOGITS, KEPT, HEAD, MEMORY = "logits", "kept", "head", "memory"
EMBEDDING, LABEL = frozen_embeddings.EMBEDDING, frozen_embeddings.LABEL
FIELD = "config.task"


def embedding_width(model: nn.Module) -> int:
  """D, the width of the representation a ViT's head reads."""
  width = getattr(model, "representation_size", None) or getattr(
      model, "hidden_size", None)
  if not isinstance(width, int):
    raise TypeError("The SMEC task needs a ViT backbone (config.model.name "
                    f"'vit'); got {type(model).__name__}.")
  return width


@dataclasses.dataclass(frozen=True)
class SmecTask:
  """Embedding compression by learned dimension selection (module doc).

  Attributes:
    model: the backbone (`config.model`), frozen.
    eval_model: unused (the backbone embeds with `model`); kept for the
      shared config plumbing.
    dataset: the images the backbone embeds; batches are of embeddings.
    total_steps: the run's steps, a multiple of the number of stages.
    backbone: the trained backbone run: workdir, checkpoint or step dir.
    method: "smec" or "mrl".
    selector: a key of `dimension_selection.SELECTORS` (smec).
    dims: kept sizes, strictly decreasing in 1..D-1; () is (D/2, D/4, D/8).
    head: train a projection head (required by "mrl").
    gumbel_temperature: τ of "gumbel_topk".
    regularization: λ of "sparse_topk".
    p: p-norm exponent of "sparse_topk".
    rank_temperature: τ of the listwise rank loss.
    cross_batch_memory: add S-XBM hard pairs.
    memory_size: Q, entries of the queue (>= the global batch).
    memory_neighbors: hard pairs per query, in 1..Q.
  """
  model: nn.Module
  eval_model: nn.Module
  dataset: data_lib.DatasetConfig
  total_steps: int
  backbone: str = ""
  method: str = "smec"
  selector: str = "sparse_topk"
  dims: Sequence[int] = ()
  head: bool = True
  gumbel_temperature: float = 1.0
  regularization: float = 0.1
  p: float = 4 / 3
  rank_temperature: float = 0.05
  cross_batch_memory: bool = False
  memory_size: int = 1024
  memory_neighbors: int = 32

  BUILT_FIELDS = ("model", "eval_model", "dataset", "total_steps")

  def __post_init__(self):
    schema.check_choice(self.method, f"{FIELD}.method", METHODS)
    schema.check_choice(self.selector, f"{FIELD}.selector",
                        selection.SELECTORS)
    for name in ("gumbel_temperature", "regularization", "rank_temperature"):
      schema.check_number(getattr(self, name), f"{FIELD}.{name}",
                          strict=True)
    schema.check_number(self.p, f"{FIELD}.p", minimum=1, strict=True)
    xbm.check_sizes(self.memory_size, self.memory_neighbors,
                    self.dataset.batch_size, FIELD)
    if self.method == "mrl" and not self.head:
      raise ValueError(f"{FIELD}.method='mrl' trains the projection head "
                       f"alone: set {FIELD}.head=True.")
    if self.total_steps < self.num_stages or (
        self.total_steps % self.num_stages):
      raise ValueError(
          f"config.total_steps ({self.total_steps}) must be a positive "
          f"multiple of the {self.num_stages} stages of {FIELD}.dims="
          f"{self.kept_dims}.")

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    """The attributes that `config.task` sets."""
    return task_parts.config_fields(cls)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SmecTask":
    """Builds the task from the experiment config."""
    return task_parts.task_from_config(cls, config,
                                       total_steps=config.total_steps)

  @property
  def width(self) -> int:
    """D."""
    return embedding_width(self.model)

  @property
  def kept_dims(self) -> tuple[int, ...]:
    """d_1 > ... > d_S."""
    dims = tuple(self.dims) or tuple(
        d for d in (self.width // 2, self.width // 4, self.width // 8) if d)
    return selection.check_dims(dims, self.width, f"{FIELD}.dims")

  @property
  def num_stages(self) -> int:
    """S: one per kept size for smec, one for mrl."""
    return len(self.kept_dims) if self.method == "smec" else 1

  @property
  def stage_steps(self) -> int:
    return self.total_steps // self.num_stages

  @property
  def summary_metrics(self) -> tuple[str, ...]:
    """The eval metrics of the run's final line."""
    return ("eval_ndcg10_full",) + tuple(f"eval_ndcg10_d{d}"
                                         for d in self.kept_dims)

  @functools.cached_property
  def splits(self) -> dict[str, dict[str, np.ndarray]]:
    """The frozen embeddings {"train": ..., "eval": ...} of the backbone."""
    eval_data = data_lib.make_eval_data(self.dataset, process_index=0,
                                        process_count=1)
    first = next(iter(eval_data))
    params = frozen_embeddings.load_backbone(
        self.model, self.backbone, first["image"][:1])
    return {name: frozen_embeddings.embed_split(
                self.model, params, self.dataset, split)
            for name, split in (("train", self.dataset.train_split),
                                ("eval", self.dataset.eval_split))}

  def make_train_iterator(self) -> data_lib.ArrayTrainIterator:
    return data_lib.ArrayTrainIterator(
        self.splits["train"], batch_size=self.dataset.batch_size,
        seed=self.dataset.seed, process_index=jax.process_index(),
        process_count=jax.process_count())

  def make_eval_data(self) -> data_lib.ArrayEvalData:
    return data_lib.ArrayEvalData(
        self.splits["eval"], batch_size=self.dataset.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    del rng, batch  # Deterministic: the identity head, zero logits.
    width, stages = self.width, self.num_stages
    params = {}
    if self.method == "smec":
      params[LOGITS] = jnp.zeros((stages, width), jnp.float32)
      params[KEPT] = jnp.zeros((stages, width), jnp.float32)
    if self.head:
      params[HEAD] = {"kernel": jnp.eye(width, dtype=jnp.float32),
                      "bias": jnp.zeros((width,), jnp.float32)}
    if self.cross_batch_memory:
      params[MEMORY] = xbm.init_memory(self.memory_size, width)
    return params

  def project(self, params: PyTree, embeddings: jax.Array) -> jax.Array:
    """h: the head applied to `[..., D]` embeddings (identity without)."""
    if HEAD not in params:
      return embeddings
    return embeddings @ params[HEAD]["kernel"] + params[HEAD]["bias"]

  def stage(self, step: jax.Array) -> jax.Array:
    """The 0-based stage that `step` trains."""
    return jnp.minimum(step // self.stage_steps, self.num_stages - 1)

  def selections(self, params: PyTree, step: jax.Array
                 ) -> tuple[jax.Array, list[jax.Array]]:
    """The kept dimensions of every stage, cut where a stage has ended.

    Returns:
      `(kept [S, D], indices)`: `kept` with the rows of stages ended by
      `step` cut (the others as they were), and per stage its int32 `[d_s]`
      kept dimensions: the cut row, or the current top-d_s of its logits.
    """
    kept, chosen = [], []
    pool = jnp.arange(self.width)
    for s, d in enumerate(self.kept_dims):
      row = params[KEPT][s]
      is_cut = jnp.sum(row) > 0
      indices = jnp.where(is_cut, selection.pool_indices(row, d),
                          selection.kept_indices(params[LOGITS][s], pool, d))
      ended = step >= (s + 1) * self.stage_steps
      kept.append(jnp.where(ended & ~is_cut,
                            selection.keep_mask(indices, self.width), row))
      chosen.append(indices)
      pool = indices
    return jnp.stack(kept), chosen

  def prepare_params(self, params: PyTree, step: jax.Array) -> PyTree:
    """Cuts and freezes the selection of every stage that has ended."""
    if self.method != "smec":
      return params
    return dict(params, **{KEPT: self.selections(params, step)[0]})

  def _train_mask(self, params: PyTree, step: jax.Array,
                  rng: jax.Array) -> jax.Array:
    """The selector's mask `[D]` of the stage `step` trains."""
    def branch(s):
      def mask():
        pool = (jnp.arange(self.width) if s == 0 else
                selection.pool_indices(params[KEPT][s - 1],
                                       self.kept_dims[s - 1]))
        return selection.train_mask(
            params[LOGITS][s], pool, self.kept_dims[s],
            selector=self.selector, rng=rng,
            temperature=self.gumbel_temperature,
            regularization=self.regularization, p=self.p).astype(jnp.float32)
      return mask

    return jax.lax.switch(self.stage(step),
                          [branch(s) for s in range(self.num_stages)])

  def _candidates(self, params: PyTree, embeddings: jax.Array):
    """Teacher similarities `[B, M]`, the valid mask, and the neighbours'
    embeddings `[B, m, D]` (None without S-XBM)."""
    size = embeddings.shape[0]
    neighbors, valid = None, ~jnp.eye(size, dtype=bool)
    if self.cross_batch_memory:
      neighbors, found = xbm.hard_neighbors(params[MEMORY], embeddings,
                                            self.memory_neighbors)
      valid = jnp.concatenate([valid, found], axis=1)
    teacher = rank_loss.candidate_similarities(embeddings, embeddings,
                                               neighbors)
    return teacher, valid, neighbors

  def _student_loss(self, teacher, valid, projected, neighbors, keep):
    """The rank loss of the compressed view `keep(h)`."""
    student = rank_loss.candidate_similarities(
        keep(projected), keep(projected),
        None if neighbors is None else keep(neighbors))
    return rank_loss.listwise_rank_loss(teacher, student, valid,
                                        self.rank_temperature)

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    step = jnp.asarray(0 if step is None else step)
    embeddings = batch[EMBEDDING]
    teacher, valid, neighbors = self._candidates(params, embeddings)
    projected = self.project(params, embeddings)
    if neighbors is not None:
      neighbors = self.project(params, neighbors)
    if self.method == "mrl":
      loss = jnp.mean(jnp.stack([
          self._student_loss(teacher, valid, projected, neighbors,
                             lambda x, d=d: x[..., :d])
          for d in self.kept_dims]))
      mask_sum = jnp.float32(self.kept_dims[0])
    else:
      mask = self._train_mask(params, step, rng)
      loss = self._student_loss(teacher, valid, projected, neighbors,
                                lambda x: x * mask)
      mask_sum = jnp.sum(mask)
    filled = (jnp.mean(params[MEMORY]["filled"]) if self.cross_batch_memory
              else jnp.float32(0))
    return loss, {"loss": loss, "stage": self.stage(step).astype(jnp.float32),
                  "mask_sum": mask_sum, "memory_filled": filled}

  def mask_updates(self, updates: PyTree, params: PyTree,
                   step: jax.Array) -> PyTree:
    """Updates only for the current stage's logits and (stage 1) the head."""
    del params
    stage = self.stage(step)
    updates = dict(updates)
    if LOGITS in updates:
      current = jnp.arange(self.num_stages)[:, None] == stage
      updates[LOGITS] = jnp.where(current, updates[LOGITS], 0)
    if HEAD in updates:
      updates[HEAD] = jax.tree.map(lambda u: jnp.where(stage == 0, u, 0),
                                   updates[HEAD])
    for name in (KEPT, MEMORY):
      if name in updates:
        updates[name] = jax.tree.map(jnp.zeros_like, updates[name])
    return updates

  def after_update(self, params: PyTree, batch: Batch, step: jax.Array,
                   metrics: Mapping[str, jax.Array]) -> PyTree:
    """Enqueues the batch's embeddings into the S-XBM memory."""
    del step, metrics
    if not self.cross_batch_memory:
      return params
    return dict(params, **{MEMORY: xbm.enqueue(params[MEMORY],
                                               batch[EMBEDDING])})

  def compressed_indices(self, params: PyTree, step: jax.Array
                         ) -> dict[int, jax.Array]:
    """The kept dimensions `[d]` of h at inference, by size d."""
    if self.method == "mrl":
      return {d: jnp.arange(d) for d in self.kept_dims}
    _, chosen = self.selections(params, step)
    return dict(zip(self.kept_dims, chosen))

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    step = jnp.asarray(self.total_steps if step is None else step)
    corpus = self.splits["train"]
    corpus_embeddings = jnp.asarray(corpus[EMBEDDING])
    corpus_labels = jnp.asarray(corpus[LABEL])
    real = batch[data_lib.MASK_KEY]
    views = {"full": (batch[EMBEDDING], corpus_embeddings)}
    projected = self.project(params, batch[EMBEDDING])
    projected_corpus = self.project(params, corpus_embeddings)
    for d, indices in self.compressed_indices(params, step).items():
      views[f"d{d}"] = (selection.select(projected, indices),
                        selection.select(projected_corpus, indices))
    metrics = {}
    for name, (queries, items) in views.items():
      scores = retrieval.retrieval_metrics(queries, batch[LABEL], items,
                                           corpus_labels)
      for metric, values in scores.items():
        metrics[f"{metric.replace('@', '')}_{name}"] = (
            clu_metrics.Average.from_model_output(values, mask=real))
    return metrics
