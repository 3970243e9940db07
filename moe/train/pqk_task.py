"""PQK (Kim, Chang, Kwak, Interspeech 2021) as a task of the one trainer.

Pruning, quantization and knowledge distillation with one weight tensor per
layer. Parameters: `{"model": the model's parameters, "masks": a 0/1 mask
for every pruned parameter}` (the masks are trained by nobody:
`mask_updates` zeroes their updates; they are checkpointed with the rest).

Views of the same weights (M the mask, Q fake quantization):

  student  Q(W ⊙ M) for the pruned parameters (soft pruning, during the
           prune phase: Q(σ topk_magnitude(W ⊙ M / σ, k))), the other
           parameters as they are; activations quantized at every layer
           input (`moe.compress.quantization`);
  teacher  W, float: the student's weights plus the pruned ones.

Phases (`moe.compress.phases`) and what each trains, bit-exactly:

  dense   the teacher (the full net) by cross-entropy: every weight;
  prune   the student by cross-entropy, with QAT: only the kept weights
          (the pruned ones are frozen, their updates are zeroed);
  warmup  both by cross-entropy: the student its kept weights and the
          parameters that are not pruned, the teacher the pruned weights;
  mutual  the same, each loss plus the other's distillation target:
          student: CE + α T² KL(teacher || student), teacher: CE + β T²
          KL(student || teacher), the target fixed in each.

Each network's loss reaches only its own weights through stop-gradients
(`_gate`), so the sum of the losses has exactly the gradient of each.
`qat=False` trains in float and quantizes only at evaluation (post-training
quantization), for baselines.

Metrics: `phase`, `target_sparsity`, `sparsity` (zeros of the student's
pruned kernels, over all of them) and `sparsity/<param>` per parameter,
`weight_bits`, `quantized` (1 while QAT is on), student `accuracy` and
`student_loss`, `teacher_accuracy` and `teacher_loss`, `student_kd` and
`teacher_kd`. Eval: the student's `loss`, `accuracy`, `top5`, the
teacher's `teacher_loss`, `teacher_accuracy`, `teacher_top5`, and the
sparsities.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

from clu import metrics as clu_metrics
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from moe import data as data_lib
from moe.compress import distillation
from moe.compress import phases
from moe.compress import pruning
from moe.compress import quantization
from moe.compress import student_file
from moe.config import schema
from moe.train import losses
from moe.train import task_parts

Batch = Mapping[str, jax.Array]
PyTree = Any
MODEL, MASKS = "model", "masks"


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _gate(x: jax.Array, on: jax.Array) -> jax.Array:
  """x whose gradient is multiplied by `on` (0 or 1); x exactly, forward."""
  fixed = jax.lax.stop_gradient(x)
  return fixed + on * (x - fixed)


@dataclasses.dataclass(frozen=True)
class PqkTask:
  """Prune -> QAT -> mutual distillation (module docstring).

  Attributes:
    model: flax module, as for `tasks.ClassificationTask`.
    eval_model: the module used for evaluation (the same parameters).
    dataset: the dataset config.
    total_steps: the run's steps (`config.total_steps`).
    prune_params: regexes of the parameter names to prune (and quantize);
      each must match one.
    sparsity: final fraction of pruned weights, in [0, 1).
    initial_sparsity: the sparsity before the first round.
    pruning_scope: "layer" (every parameter at the sparsity) or "global".
    pruning_method: "hard" (magnitude pruning, as the paper) or "soft"
      (the soft top-k in magnitude during the prune phase).
    pruning_rounds: R, rounds of the cubic schedule.
    regularization: λ of the soft top-k, relative to the weights' RMS.
    p: p-norm exponent of the soft top-k.
    weight_bits: bits of the student's pruned kernels (2..8, 32: float).
    activation_bits: bits of the student's layer inputs (2..8, 32).
    qat: quantize during training (from the prune phase on); False
      quantizes only at evaluation.
    dense_steps: steps of the dense phase.
    prune_steps: steps of the prune phase.
    warmup_steps: steps of the warm-up phase; the rest is mutual.
    temperature: T of the distillation.
    student_kd_weight: α.
    teacher_kd_weight: β.
    aux_loss_weight: weight of the models' `auxiliary_loss` (MoE).
    inputs_key: batch entry fed to the model.
    labels_key: batch entry holding `[B, C]` labels.
  """
  model: nn.Module
  eval_model: nn.Module
  dataset: data_lib.DatasetConfig
  total_steps: int
  prune_params: Sequence[str] = (r"(.*/)?kernel",)
  sparsity: float = 0.9
  initial_sparsity: float = 0.0
  pruning_scope: str = "layer"
  pruning_method: str = "hard"
  pruning_rounds: int = 4
  regularization: float = 1.0
  p: float = 4 / 3
  weight_bits: int = 8
  activation_bits: int = 8
  qat: bool = True
  dense_steps: int = 0
  prune_steps: int = 0
  warmup_steps: int = 0
  temperature: float = 4.0
  student_kd_weight: float = 1.0
  teacher_kd_weight: float = 1.0
  aux_loss_weight: float = 0.01
  inputs_key: str = "image"
  labels_key: str = "labels"

  BUILT_FIELDS = ("model", "eval_model", "dataset", "total_steps")

  def __post_init__(self):
    schema.check_choice(self.pruning_scope, "config.task.pruning_scope",
                        pruning.SCOPES)
    schema.check_choice(self.pruning_method, "config.task.pruning_method",
                        pruning.METHODS)
    quantization.check_bits(self.weight_bits, "config.task.weight_bits")
    quantization.check_bits(self.activation_bits,
                            "config.task.activation_bits")
    schema.check_number(self.regularization, "config.task.regularization",
                        strict=True)
    schema.check_number(self.p, "config.task.p", minimum=1, strict=True)
    schema.check_number(self.temperature, "config.task.temperature",
                        strict=True)
    for name in ("student_kd_weight", "teacher_kd_weight", "aux_loss_weight"):
      schema.check_number(getattr(self, name), f"config.task.{name}")
    self.schedule  # Checks the phases against total_steps.

  @property
  def schedule(self) -> phases.PhaseSchedule:
    return phases.PhaseSchedule(
        total_steps=self.total_steps, dense_steps=self.dense_steps,
        prune_steps=self.prune_steps, warmup_steps=self.warmup_steps,
        pruning_rounds=self.pruning_rounds,
        initial_sparsity=self.initial_sparsity, sparsity=self.sparsity,
        method=self.pruning_method)

  @classmethod
  def config_fields(cls) -> tuple[str, ...]:
    """The attributes that `config.task` sets."""
    return task_parts.config_fields(cls)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "PqkTask":
    """Builds the task from the experiment config (`config.total_steps`
    included; `task_parts.task_from_config`)."""
    return task_parts.task_from_config(cls, config,
                                       total_steps=config.total_steps)

  def make_train_iterator(self) -> data_lib.TrainIterator:
    return data_lib.make_train_iterator(self.dataset)

  def make_eval_data(self) -> data_lib.EvalData:
    return data_lib.make_eval_data(self.dataset)

  def pruned_names(self, model_params: PyTree) -> tuple[str, ...]:
    """The '/'-joined names of the pruned parameters."""
    return pruning.select_params(tuple(_flat(model_params)),
                                 self.prune_params, "config.task.prune_params")

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    model_params = self.model.init({"params": rng}, batch[self.inputs_key],
                                   train=False)["params"]
    flat = _flat(model_params)
    masks = {name: jnp.ones(flat[name].shape, jnp.float32)
             for name in self.pruned_names(model_params)}
    return {MODEL: model_params, MASKS: _nested(masks)}

  def _weights_and_masks(self, params: PyTree
                         ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    masks = _flat(params[MASKS])
    flat = _flat(params[MODEL])
    return {name: flat[name] for name in masks}, masks

  def _keep(self, sizes: Mapping[str, int], sparsity: float):
    return pruning.keep_counts(sizes, sparsity, self.pruning_scope)

  def prepare_params(self, params: PyTree, step: jax.Array) -> PyTree:
    """Cuts the masks at a mask event's step (`phases.PhaseSchedule`)."""
    events = self.schedule.mask_events
    if not events:
      return params
    weights, masks = self._weights_and_masks(params)
    sizes = {name: w.size for name, w in weights.items()}
    keeps = [self._keep(sizes, sparsity) for _, sparsity in events]
    table = jax.tree.map(lambda *k: jnp.asarray(k, jnp.int32), *keeps)
    hits = jnp.asarray([event_step for event_step, _ in events]) == step
    index = jnp.argmax(hits)

    def cut():
      keep = jax.tree.map(lambda column: column[index], table)
      return pruning.magnitude_masks(weights, masks, keep,
                                     self.pruning_scope)

    masks = jax.lax.cond(jnp.any(hits), cut, lambda: masks)
    return {MODEL: params[MODEL], MASKS: _nested(masks)}

  def student_kernels(self, params: PyTree, step: jax.Array
                      ) -> dict[str, jax.Array]:
    """The student's pruned kernels before quantization, by name."""
    weights, masks = self._weights_and_masks(params)
    hard = {name: w * masks[name] for name, w in weights.items()}
    schedule = self.schedule
    if self.pruning_method == "hard" or not schedule.prune_steps:
      return hard
    sizes = {name: w.size for name, w in weights.items()}

    def soft_round(round_index):
      keep = self._keep(sizes, schedule.round_sparsity(round_index + 1))
      return lambda: pruning.soft_pruned(
          weights, masks, keep, self.pruning_scope,
          regularization=self.regularization, p=self.p)

    def soft():
      return jax.lax.switch(schedule.round_index(step),
                            [soft_round(r) for r in range(
                                schedule.pruning_rounds)])

    return jax.lax.cond(schedule.phase(step) == phases.PRUNE, soft,
                        lambda: hard)

  def student_params(self, params: PyTree, step: jax.Array,
                     quantize: jax.Array | bool,
                     trained: jax.Array | bool = True,
                     kernels: Mapping[str, jax.Array] | None = None
                     ) -> PyTree:
    """The student's view of the model parameters.

    Args:
      params: the task's parameters.
      step: the train step.
      quantize: fake-quantize the pruned kernels (may be traced).
      trained: 1.0 to pass the gradient to the weights, 0.0 to stop it.
      kernels: `student_kernels(params, step)` if already computed.

    Returns:
      The model's parameters as the student sees them.
    """
    if kernels is None:
      kernels = self.student_kernels(params, step)
    flat = {}
    for name, value in _flat(params[MODEL]).items():
      if name in kernels:
        value = kernels[name]
        value = jnp.where(quantize, quantization.fake_quantize_kernel(
            value, self.weight_bits), value)
      flat[name] = _gate(value, jnp.asarray(trained, value.dtype))
    return _nested(flat)

  def teacher_params(self, params: PyTree, phase: jax.Array) -> PyTree:
    """The teacher's view W, each part's gradient kept only where the phase
    trains it (module docstring)."""
    dense = jnp.asarray(phase == phases.DENSE, jnp.float32)
    pruned_part = jnp.maximum(dense, phase >= phases.WARMUP)
    masks = _flat(params[MASKS])
    flat = {}
    for name, value in _flat(params[MODEL]).items():
      if name in masks:
        value = (_gate(value * masks[name], dense)
                 + _gate(value * (1 - masks[name]), pruned_part))
      else:
        value = _gate(value, dense)
      flat[name] = value
    return _nested(flat)

  def sparsity_metrics(self, kernels: Mapping[str, jax.Array]
                       ) -> dict[str, jax.Array]:
    """`sparsity` (over all pruned kernels) and `sparsity/<name>`."""
    zeros = {name: jnp.sum(k == 0) for name, k in kernels.items()}
    total = sum(k.size for k in kernels.values())
    metrics = {f"sparsity/{name}": (zeros[name] / k.size).astype(jnp.float32)
               for name, k in kernels.items()}
    metrics["sparsity"] = (sum(zeros.values()) / max(total, 1)).astype(
        jnp.float32)
    return metrics

  def _apply(self, model: nn.Module, model_params: PyTree, inputs: jax.Array,
             *, train: bool, step, rng=None, quantize_inputs=False):
    rngs = task_parts.model_rngs(rng) if rng is not None else None
    with quantization.quantized_layer_inputs(self.activation_bits,
                                             quantize_inputs):
      return model.apply({"params": model_params}, inputs, train=train,
                         step=step, rngs=rngs)

  def train_loss(self, params: PyTree, batch: Batch, rng: jax.Array,
                 step: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    step = jnp.asarray(0 if step is None else step)
    phase = self.schedule.phase(step)
    student_on = phase >= phases.PRUNE
    teacher_on = (phase == phases.DENSE) | (phase >= phases.WARMUP)
    quantize = student_on & self.qat
    student_rng, teacher_rng = jax.random.split(rng)
    inputs, labels = batch[self.inputs_key], batch[self.labels_key]
    kernels = self.student_kernels(params, step)
    student_logits, student_metrics = self._apply(
        self.model, self.student_params(params, step, quantize, student_on,
                                        kernels),
        inputs, train=True, step=step, rng=student_rng,
        quantize_inputs=quantize)
    teacher_logits, teacher_metrics = self._apply(
        self.model, self.teacher_params(params, phase), inputs, train=True,
        step=step, rng=teacher_rng)
    student_loss = jnp.mean(losses.softmax_xent(student_logits, labels))
    teacher_loss = jnp.mean(losses.softmax_xent(teacher_logits, labels))
    student_kd, teacher_kd = (jnp.mean(kd) for kd in
                              distillation.mutual_kd_losses(
                                  student_logits, teacher_logits,
                                  self.temperature))
    weights = [jnp.asarray(c, jnp.float32) for c in
               (student_on, teacher_on, phase == phases.MUTUAL)]
    loss = (weights[0] * (student_loss + self.aux_loss_weight
                          * student_metrics["auxiliary_loss"])
            + weights[1] * (teacher_loss + self.aux_loss_weight
                            * teacher_metrics["auxiliary_loss"])
            + weights[2] * (self.student_kd_weight * student_kd
                            + self.teacher_kd_weight * teacher_kd))
    return loss, {
        **task_parts.scalar_model_metrics(student_metrics),
        **self.sparsity_metrics(kernels),
        "loss": loss, "student_loss": student_loss,
        "teacher_loss": teacher_loss, "student_kd": student_kd,
        "teacher_kd": teacher_kd,
        "accuracy": jnp.mean(task_parts.topk_correct(student_logits, labels,
                                                     1)),
        "teacher_accuracy": jnp.mean(task_parts.topk_correct(
            teacher_logits, labels, 1)),
        **self._schedule_metrics(step, quantize)}

  def _schedule_metrics(self, step, quantized) -> dict[str, jax.Array]:
    return {"phase": self.schedule.phase(step).astype(jnp.float32),
            "target_sparsity": self.schedule.target_sparsity(step),
            "weight_bits": jnp.float32(self.weight_bits),
            "quantized": jnp.asarray(quantized, jnp.float32)}

  def mask_updates(self, updates: PyTree, params: PyTree,
                   step: jax.Array) -> PyTree:
    """Zero updates for the masks always and for pruned weights while the
    prune phase trains the student alone."""
    pruning_now = self.schedule.phase(step) == phases.PRUNE
    masks = _flat(params[MASKS])
    flat = _flat(updates[MODEL])
    for name, mask in masks.items():
      flat[name] = jnp.where(pruning_now, flat[name] * mask, flat[name])
    return {MODEL: _nested(flat),
            MASKS: jax.tree.map(jnp.zeros_like, updates[MASKS])}

  def eval_student_params(self, params: PyTree, step: jax.Array) -> PyTree:
    """The quantized student that evaluation runs (and export writes)."""
    return self.student_params(self.prepare_params(params, step), step,
                               quantize=True)

  def eval_metrics(self, params: PyTree, batch: Batch,
                   step: Optional[jax.Array] = None
                   ) -> dict[str, clu_metrics.Metric]:
    step = jnp.asarray(self.total_steps if step is None else step)
    params = self.prepare_params(params, step)
    inputs, labels = batch[self.inputs_key], batch[self.labels_key]
    mask = batch[data_lib.MASK_KEY]
    kernels = self.student_kernels(params, step)
    logits, model_metrics = self._apply(
        self.eval_model, self.student_params(params, step, True,
                                             kernels=kernels),
        inputs, train=False, step=step, quantize_inputs=True)
    teacher_logits, _ = self._apply(self.eval_model, params[MODEL], inputs,
                                    train=False, step=step)
    scalars = {**task_parts.scalar_model_metrics(model_metrics),
               **self.sparsity_metrics(kernels),
               **self._schedule_metrics(step, True)}
    metrics = {name: clu_metrics.Average.from_model_output(value)
               for name, value in scalars.items()}
    metrics.update(task_parts.eval_classification(
        logits, labels, mask, losses.softmax_xent))
    metrics.update(task_parts.eval_classification(
        teacher_logits, labels, mask, losses.softmax_xent, "teacher_"))
    return metrics

  def export_student(self, params: PyTree, step: int,
                     path: str, model_config: Any) -> int:
    """Writes the student at `step` (`moe.compress.student_file`).

    Args:
      params: the task's parameters (host or device arrays).
      step: the train step they are at (the state's step).
      path: the `.npz` to write.
      model_config: the `config.model` of the evaluation model.

    Returns:
      The file's size in bytes.
    """
    step = jnp.asarray(step)
    params = self.prepare_params(params, step)
    kernels = jax.device_get(self.student_kernels(params, step))
    others = {name: value for name, value in _flat(params[MODEL]).items()
              if name not in kernels}
    return student_file.write_student(
        path, model_config=schema.to_dict(model_config, "config.model"),
        kernels=kernels, other_params=jax.device_get(others),
        weight_bits=self.weight_bits, activation_bits=self.activation_bits)
