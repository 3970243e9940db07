r"""Sparse attention post-training: drop attention edges, keep the loss.

Post-training starts from a trained addition decoder (`moe.train.
sequence_task`, loaded by `config.init_from.checkpoint`) whose attention
sparsity `config.model.attention.sparsity` (`moe.nn.attention`) is switched:

* "gated" (the paper's method): every attention edge has a Bernoulli gate
  open with probability σ(g); the objective is the expected fraction of
  active edges
      P = mean over blocks b and heads h of E_bh / A_b
  (E_bh: the expected number of open edges, Σ σ(g) over the allowed edges;
  A_b: the allowed edges), minimised subject to the answer cross-entropy
  staying near the base model's, CE <= (1 + ε) CE_base + δ, with a GECO
  multiplier λ (Rezende & Viola, 2018). With the target
  CE* = (1 + ε) CE_base + δ,
      loss = P + λ CE / CE*,
      c = log(CE / CE*),   c̄ <- β c̄ + (1 - β) c,
      λ <- clip(λ exp(α c̄), λ_min, λ_max)   after every step.
  λ grows while the constraint is violated (CE matters more) and shrinks
  while it holds (sparsity matters more). The constraint is a log-ratio
  so that α does not depend on the scale of the loss and a violation by
  orders of magnitude (the first steps with stochastic gates) moves λ by a
  few α, not by the ratio itself. The absolute
  slack δ (`absolute_tolerance`) matters for a base model that solves its
  task: the addition decoder ends at CE_base ~ 4e-4, where (1 + ε) CE_base
  alone is below the noise of stochastic gates (a gate open with
  probability 0.95 already costs CE ~ 0.7 in the first steps).
* "sparse_topk", "hard_topk", "dense": the cross-entropy alone, at the
  model's fixed keys per query k; lowering k while the constraint holds is
  a sequence of such runs (`experiments/sparse_attention.py`). λ stays at
  its initial value.

λ and c̄ are parameters under `geco/` that the optimizer does not move
(`mask_updates`); `after_update` applies the GECO update, so both are
checkpointed and a resumed run continues exactly.

CE_base (`base_loss`) is the base model's answer cross-entropy on the
train split; left at 0, it is measured from `config.init_from.checkpoint`
when the task is built (`base_train_loss`).

Metrics: those of `sequence_task` (edge fraction per block, mean over heads,
and in total: `edge_fraction`), plus `penalty` (P), `multiplier` (λ),
`constraint` (c; train only) and, at eval, `edge_fraction_<block>_head<h>`
per head.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from absl import logging
from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe.config import schema
from moe.data import addition
from moe.nn import models
from moe.train import frozen_embeddings
from moe.train import sequence_task
from moe.train import task_parts

Batch = Mapping[str, jax.Array]
PyTree = Any
FIELD = sequence_task.FIELD
GECO, MULTIPLIER, CONSTRAINT = "geco", "multiplier", "constraint_ema"
EXPECTED, ALLOWED = "expected_edges", "allowed_edges"


def model_params(params: PyTree) -> PyTree:
  """The decoder's parameters: everything but the GECO state."""
  return {name: value for name, value in params.items() if name != GECO}


def expected_edge_fraction(metrics: Mapping[str, jax.Array]) -> jax.Array:
  """P: the mean over blocks of expected / allowed edges (heads averaged).

  Args:
    metrics: `sequence_task.model_scalars` of the decoder's metrics, with
      `<block>/attention/expected_edges` and `.../allowed_edges`.

  Returns:
    The float32 scalar P.

  Raises:
    ValueError: the metrics hold no attention statistics.
  """
  suffix = sequence_task.ATTENTION + EXPECTED
  blocks = [name[:-len(suffix)] for name in metrics if name.endswith(suffix)]
  if not blocks:
    raise ValueError("the model reports no attention edges "
                     f"(<block>{suffix}); use the decoder of moe.nn.decoder.")
  attention = sequence_task.ATTENTION
  return jnp.mean(jnp.stack([
      metrics[block + attention + EXPECTED] / metrics[block + attention
                                                      + ALLOWED]
      for block in sorted(blocks)]))


def geco_update(state: Mapping[str, jax.Array], constraint: jax.Array, *,
                rate: float, decay: float, bounds: tuple[float, float]
                ) -> dict[str, jax.Array]:
  """One GECO step: c̄ <- β c̄ + (1 - β) c, λ <- clip(λ exp(α c̄)).

  Args:
    state: {"multiplier": λ, "constraint_ema": c̄}, float32 scalars.
    constraint: c of this step.
    rate: α > 0.
    decay: β in [0, 1).
    bounds: (λ_min, λ_max).

  Returns:
    The new state.
  """
  ema = decay * state[CONSTRAINT] + (1 - decay) * constraint
  multiplier = jnp.clip(state[MULTIPLIER] * jnp.exp(rate * ema), *bounds)
  return {MULTIPLIER: multiplier.astype(jnp.float32),
          CONSTRAINT: ema.astype(jnp.float32)}


def mean_answer_loss(model: Any, params: PyTree, tokens: np.ndarray,
                     batch_size: int = 1000) -> float:
  """The mean answer cross-entropy of `model` over rows of tokens.

  Args:
    model: a decoder (`moe.nn.decoder`).
    params: its parameters.
    tokens: int `[N, 11]` rows of `moe.data.addition`.
    batch_size: rows per forward pass.

  Returns:
    The mean over the N rows.
  """
  apply = jax.jit(lambda p, t: sequence_task.answer_scores(
      model.apply({"params": p}, t[:, :-1], train=False)[0], t)["loss"])
  losses = [np.asarray(apply(params, tokens[i:i + batch_size]))
            for i in range(0, len(tokens), batch_size)]
  return float(np.mean(np.concatenate(losses)))


def base_train_loss(config: ml_collections.ConfigDict) -> float:
  """CE_base: the train cross-entropy of the `config.init_from` checkpoint.

  The checkpoint is read as the decoder of `config.model` with dense
  attention (the base model) and checked against it.

  Args:
    config: the post-training experiment config.

  Returns:
    The mean answer cross-entropy over `config.dataset.train_split`.

  Raises:
    ValueError: no `config.init_from.checkpoint`, or one that does not hold
      that decoder.
  """
  checkpoint = config.get("init_from", {}).get("checkpoint")
  if not checkpoint:
    raise ValueError(
        f"{FIELD}.base_loss is 0 and config.init_from.checkpoint is empty: "
        "set config.init_from.checkpoint to the base run (its train "
        f"cross-entropy is then measured) or {FIELD}.base_loss > 0.")
  dense = config.model.copy_and_resolve_references()
  dense.attention.sparsity = "dense"
  model = models.build_model(dense)
  tokens = addition.load_split(
      config.dataset.train_split, seed=config.task.split_seed,
      test_fraction=config.task.test_fraction, field=FIELD)[addition.TOKENS]
  params = frozen_embeddings.load_backbone(
      model, checkpoint, tokens[:1, :-1], field="config.init_from.checkpoint")
  return mean_answer_loss(model, params, tokens)


def per_head_fractions(metrics: Mapping[str, jax.Array]
                       ) -> dict[str, jax.Array]:
  """`edge_fraction_<block>_head<h>` of the decoder's raw `[H]` metrics."""
  suffix = sequence_task.ATTENTION + sequence_task.EDGE_FRACTION
  per_head = {}
  for name, value in metrics.items():
    if name.endswith(suffix):
      block = name[:-len(suffix)].replace("/", "_")
      for h in range(np.shape(value)[0]):
        per_head[f"edge_fraction_{block}_head{h}"] = value[h]
  return per_head


@dataclasses.dataclass(frozen=True)
class SparseAttentionTask(sequence_task.SequenceTask):
  """Post-training of a decoder's attention sparsity (module docstring).

  Attributes (besides `sequence_task.SequenceTask`'s):
    base_loss: CE_base, the base model's train cross-entropy; 0: measured
      from `config.init_from.checkpoint` (`from_config`); > 0 for "gated".
    tolerance: ε > 0 of the constraint CE <= (1 + ε) CE_base + δ.
    absolute_tolerance: δ >= 0 of the constraint.
    multiplier_init: λ at step 0, > 0.
    multiplier_rate: α > 0 of the GECO update.
    constraint_decay: β in [0, 0.999] of the constraint's moving average.
    multiplier_bounds: (λ_min, λ_max), 0 < λ_min <= λ_init <= λ_max.
  """
  base_loss: float = 0.0
  tolerance: float = 0.1
  absolute_tolerance: float = 0.01
  multiplier_init: float = 1.0
  multiplier_rate: float = 0.05
  constraint_decay: float = 0.9
  multiplier_bounds: tuple[float, float] = (1e-3, 1e4)

  summary_metrics = ("eval_exact_match", "eval_loss", "eval_edge_fraction",
                     "eval_multiplier")

  def __post_init__(self):
    super().__post_init__()
    for name in ("tolerance", "multiplier_init", "multiplier_rate"):
      schema.check_number(getattr(self, name), f"{FIELD}.{name}",
                          strict=True)
    schema.check_number(self.absolute_tolerance,
                        f"{FIELD}.absolute_tolerance")
    schema.check_number(self.constraint_decay, f"{FIELD}.constraint_decay",
                        maximum=0.999)
    low, high = self.multiplier_bounds
    if not 0 < low <= self.multiplier_init <= high:
      raise ValueError(
          f"{FIELD}.multiplier_bounds {tuple(self.multiplier_bounds)} must "
          f"satisfy 0 < low <= multiplier_init ({self.multiplier_init}) <= "
          "high.")
    if self.gated and not self.base_loss > 0:
      raise ValueError(
          f"{FIELD}.base_loss must be > 0 with gated attention (the base "
          "model's train cross-entropy; 0 measures it from "
          "config.init_from.checkpoint); "
          f"got {self.base_loss!r}.")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict
                  ) -> "SparseAttentionTask":
    """Builds the task; `base_loss` 0 is measured (`base_train_loss`)
    when `config.init_from.checkpoint` names the base run."""
    has_base = bool(config.get("init_from", {}).get("checkpoint"))
    gated = config.model.get("attention", {}).get("sparsity") == "gated"
    if not config.task.get("base_loss") and (has_base or gated):
      config = config.copy_and_resolve_references()
      config.task.base_loss = base_train_loss(config)
      logging.info("%s.base_loss = %.6g, the base run's train "
                   "cross-entropy", FIELD, config.task.base_loss)
    return task_parts.task_from_config(cls, config)

  @property
  def target_loss(self) -> float:
    """CE* = (1 + ε) CE_base + δ."""
    return (1 + self.tolerance) * self.base_loss + self.absolute_tolerance

  @property
  def gated(self) -> bool:
    """Whether the model's attention has Bernoulli edge gates."""
    return dict(self.model.attention or {}).get("sparsity") == "gated"

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    params = dict(super().init(rng, batch))
    params[GECO] = {MULTIPLIER: jnp.float32(self.multiplier_init),
                    CONSTRAINT: jnp.float32(0)}
    return params

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss, metrics = super().train_loss(model_params(params), batch, rng,
                                       step)
    ce = metrics["task_loss"]
    penalty = expected_edge_fraction(metrics)
    multiplier = jax.lax.stop_gradient(params[GECO][MULTIPLIER])
    metrics = dict(metrics, penalty=penalty, multiplier=multiplier)
    if self.base_loss > 0:
      relative = ce / self.target_loss
      metrics["constraint"] = jnp.log(relative)
      if self.gated:
        loss = loss - ce + penalty + multiplier * relative
    return loss, dict(metrics, loss=loss)

  def mask_updates(self, updates: PyTree, params: PyTree,
                   step: jax.Array) -> PyTree:
    """No optimizer update for the GECO state."""
    del params, step
    return dict(updates, **{GECO: jax.tree.map(jnp.zeros_like,
                                               updates[GECO])})

  def after_update(self, params: PyTree, batch: Batch, step: jax.Array,
                   metrics: Mapping[str, jax.Array]) -> PyTree:
    """The GECO update of λ from this step's constraint (gated only)."""
    del batch, step
    if not self.gated:
      return params
    return dict(params, **{GECO: geco_update(
        params[GECO], metrics["constraint"], rate=self.multiplier_rate,
        decay=self.constraint_decay,
        bounds=tuple(self.multiplier_bounds))})

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    logits, raw = self.eval_outputs(model_params(params), batch, step)
    metrics = self.metrics_of_outputs(logits, raw, batch)
    scalars = sequence_task.model_scalars(raw)
    extra = {"penalty": expected_edge_fraction(scalars),
             "multiplier": params[GECO][MULTIPLIER], **per_head_fractions(raw)}
    metrics.update({name: clu_metrics.Average.from_model_output(value)
                    for name, value in extra.items()})
    return metrics
