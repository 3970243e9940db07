"""Tests of moe.train.tasks: losses, metrics, masks, eval overrides."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe.train import losses
from moe.train import tasks
import train_testing


class _FixedModel(nn.Module):
  """Logits = inputs (one bias-free scale), with MoE-like metrics."""

  @nn.compact
  def __call__(self, x, *, train=False, step=None):
    scale = self.param("scale", nn.initializers.ones, ())
    metrics = {"auxiliary_loss": jnp.float32(0.5),
               "step": jnp.float32(-1 if step is None else step),
               "encoderblock_1/tokens_per_expert": jnp.array([1., 3.]),
               "encoderblock_1/dropped_fraction": jnp.float32(0.25 + train)}
    return scale * x, metrics


def _task(**kwargs):
  return tasks.ClassificationTask(model=_FixedModel(), eval_model=_FixedModel(),
                                  dataset=None, **kwargs)


LOGITS = np.array([[2., 1., 0., -1., -2., -3.],
                   [0., 3., 1., 2., 5., 4.],
                   [1., 0., 0., 0., 0., 0.]], np.float32)
LABELS = np.eye(6, dtype=np.float32)[[0, 0, 2]]


def test_train_loss_is_smoothed_cross_entropy_plus_weighted_aux_loss():
  task = _task(label_smoothing=0.1, aux_loss_weight=0.2)
  batch = {"image": LOGITS, "labels": LABELS}
  params = task.init(jax.random.key(0), batch)
  loss, metrics = task.train_loss(params, batch, jax.random.key(1), 7)
  assert metrics["step"] == 7    # The model sees the train step.
  xent = optax.softmax_cross_entropy(LOGITS, optax.smooth_labels(LABELS, 0.1))
  np.testing.assert_allclose(metrics["task_loss"], xent.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, xent.mean() + 0.2 * 0.5, rtol=1e-6)
  assert metrics["loss"] == loss
  np.testing.assert_allclose(metrics["accuracy"], 1 / 3)
  np.testing.assert_allclose(metrics["encoderblock_1/tokens_per_expert_cv"],
                             0.5)
  assert metrics["encoderblock_1/dropped_fraction"] == 1.25
  assert all(np.ndim(value) == 0 for value in metrics.values())


def test_eval_metrics_ignore_padding_rows():
  task = _task(label_smoothing=0.1)
  padded = {"image": np.concatenate([LOGITS, 100 * np.ones((2, 6))]),
            "labels": np.concatenate([LABELS, np.zeros((2, 6))]),
            "mask": np.array([True, True, True, False, False])}
  params = task.init(jax.random.key(0), padded)
  metrics = {name: float(metric.compute()) for name, metric in
             task.eval_metrics(params, padded, 5).items()}
  assert metrics["step"] == 5
  xent = optax.softmax_cross_entropy(LOGITS, LABELS)  # No smoothing at eval.
  assert metrics["loss"] == pytest.approx(float(xent.mean()), rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(1 / 3)
  assert metrics["top5"] == pytest.approx(2 / 3)  # Row 1: label 0 is 6th.
  assert metrics["encoderblock_1/dropped_fraction"] == 0.25
  assert metrics["auxiliary_loss"] == 0.5


def test_topk_correct_with_multi_hot_labels_and_few_classes():
  labels = np.array([[0, 1, 1], [1, 0, 0]], np.float32)
  logits = np.array([[3., 2., 1.], [0., 2., 1.]], np.float32)
  np.testing.assert_array_equal(tasks.topk_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(tasks.topk_correct(logits, labels, 2), [1, 0])
  np.testing.assert_array_equal(tasks.topk_correct(logits, labels, 5), [1, 1])


def test_sigmoid_xent_sums_over_classes():
  logits = np.array([[0., 2.]], np.float32)
  labels = np.array([[1., 0.]], np.float32)
  expected = np.log(2) + np.log1p(np.exp(2.))
  np.testing.assert_allclose(losses.sigmoid_xent(logits, labels), [expected],
                             rtol=1e-6)


def test_create_task_builds_the_eval_model_with_overrides():
  config = train_testing.load_config("digits_vmoe.py:runlocal")
  with config.unlocked():
    config.evaluation.model_overrides = {
        "encoder": {"moe": {"num_selected_experts": 1,
                            "router": {"eval_capacity_factor": 4.0}}}}
  task = tasks.create_task(config)
  train_moe, eval_moe = (m.encoder["moe"] for m in (task.model,
                                                    task.eval_model))
  assert (train_moe["num_selected_experts"],
          eval_moe["num_selected_experts"]) == (2, 1)
  assert train_moe["router"]["eval_capacity_factor"] is None
  assert eval_moe["router"]["eval_capacity_factor"] == 4.0
  assert eval_moe["router"]["name"] == "SparseTopK"
  images = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  shapes = [jax.eval_shape(m.init, jax.random.key(0), images)
            for m in (task.model, task.eval_model)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])


@pytest.mark.parametrize("field, value, message", [
    ("name", "regression", r"config.task.name must be one of "
     r"'classification', 'pqk', 'smec', 'addition', 'sparse_attention'; "
     r"got 'regression'"),
    ("label_smoothing", 1.0,
     r"config.task.label_smoothing must be in \[0, 1\)"),
])
def test_task_config_errors(field, value, message):
  config = train_testing.load_config("digits_vit.py:runlocal")
  config.task[field] = value
  with pytest.raises(ValueError, match=message):
    tasks.create_task(config)


def test_unknown_task_field_is_an_error():
  config = train_testing.load_config("digits_vit.py:runlocal")
  with config.unlocked():
    config.task.smoothing = 0.1
  with pytest.raises(ValueError, match=r"config.task has unknown field\(s\) "
                     r"smoothing; allowed fields: name, loss, label_smoothing"):
    tasks.create_task(config)


def test_merged_model_config_is_deep():
  merged = tasks.merged_model_config(
      {"a": 1, "encoder": {"moe": {"k": 2, "router": {"c": 1.0, "n": "x"}}}},
      {"encoder": {"moe": {"router": {"c": 4.0}}}, "b": 2})
  assert merged == {"a": 1, "b": 2,
                    "encoder": {"moe": {"k": 2, "router": {"c": 4.0,
                                                           "n": "x"}}}}
