"""Tests of moe.train.losses: the top-k cross-entropy and loss options."""
import functools

import flax.linen as nn
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from moe.train import losses
from moe.train import tasks
import topk_reference
import train_testing

x64 = functools.partial(jax.enable_x64, True)


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def _reference_loss(logits, labels, weights, regularization, p, epsilon):
  """The docstring's formula in float64 numpy, masks from the PAV reference."""
  out = []
  for z, y in zip(np.asarray(logits, np.float64), np.asarray(labels)):
    q = weights[0] * _softmax(z)
    for k, weight in enumerate(weights[1:], start=2):
      if weight:
        q = q + weight * topk_reference.topk_mask(z, k, regularization, p)
    out.append(-np.sum(y * np.log(epsilon + (1 - 2 * epsilon) * q)))
  return np.array(out)


def test_topk_xent_hand_computed():
  # p = 2, λ = 1, k = 2: y_i = clip(z_i - τ, 0, 1) with Σ y = 2 gives
  # τ = -0.25 and m_2 = (1, 0.75, 0.25, 0).
  logits = jnp.array([[2.0, 0.5, 0.0, -3.0]] * 2)
  labels = jnp.eye(4)[jnp.array([2, 3])]
  got = losses.topk_xent(logits, labels, topk_weights=(0.5, 0.5),
                         regularization=1.0, p=2.0, epsilon=0.0)
  softmax = _softmax(np.array([2.0, 0.5, 0.0, -3.0]))
  expected = [-np.log(0.5 * softmax[2] + 0.5 * 0.25),
              -np.log(0.5 * softmax[3])]  # Class 3 is outside the support.
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("p", [2.0, 4 / 3])
def test_topk_xent_matches_reference(p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 7)) * 2
  labels = rng.dirichlet(np.ones(7), size=4)  # Soft labels.
  weights = (0.3, 0.2, 0.0, 0.5)
  with x64():
    got = losses.topk_xent(jnp.asarray(logits), jnp.asarray(labels),
                           topk_weights=weights, regularization=0.7, p=p)
  expected = _reference_loss(logits, labels, weights, 0.7, p, 1e-7)
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_topk_xent_is_softmax_xent_with_top1_weight_only():
  logits = jnp.array([[3.0, -1.0, 0.5], [100.0, 0.0, -100.0]])
  labels = jnp.array([[0.9, 0.05, 0.05], [0.0, 0.0, 1.0]])
  got = losses.topk_xent(logits, labels, topk_weights=(1.0,), epsilon=0.0)
  np.testing.assert_allclose(got, losses.softmax_xent(logits, labels),
                             rtol=1e-6)
  assert float(got[1]) == pytest.approx(200.0, rel=1e-6)  # No underflow.


def test_topk_xent_hard_limit_is_weighted_topk_accuracy():
  logits = jnp.array([[3.0, 2.0, 1.0, 0.0, -1.0]])
  softmax = _softmax(np.asarray(logits[0]))
  for label, in_top3 in ((1, 1.0), (4, 0.0)):
    got = losses.topk_xent(logits, jnp.eye(5)[jnp.array([label])],
                           topk_weights=(0.5, 0.0, 0.5),
                           regularization=1e-4, epsilon=0.0)
    np.testing.assert_allclose(
        got, [-np.log(0.5 * softmax[label] + 0.5 * in_top3)], rtol=1e-5)


def test_label_outside_every_support_gives_a_finite_loss_and_gradient():
  logits = jnp.array([[5.0, 4.0, 3.0, -20.0]])
  labels = jnp.eye(4)[jnp.array([3])]

  @functools.partial(jax.jit, static_argnums=1)
  def loss(z, weights):
    return losses.topk_xent(z, labels, topk_weights=weights,
                            regularization=0.5, p=4 / 3)[0]

  # Only top-k terms: the loss is -log ε, flat.
  value, grad = jax.value_and_grad(loss)(logits, (0.0, 0.5, 0.5))
  assert float(value) == pytest.approx(-np.log(1e-7), rel=1e-6)
  np.testing.assert_array_equal(grad, np.zeros((1, 4)))
  # With the softmax term, its gradient alone moves the logits.
  value, grad = jax.value_and_grad(loss)(logits, (0.5, 0.0, 0.5))
  softmax_only = jax.grad(lambda z: -jnp.log(
      1e-7 + (1 - 2e-7) * 0.5 * jax.nn.softmax(z)[0, 3]))(logits)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(grad, softmax_only, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("p", [2.0, 4 / 3])
def test_topk_xent_check_grads(p):
  rng = np.random.default_rng(1)
  with x64():
    logits = jnp.asarray(rng.normal(size=(3, 6)))
    labels = jnp.asarray(rng.dirichlet(np.ones(6), size=3))
    fn = jax.jit(lambda z: losses.topk_xent(
        z, labels, topk_weights=(0.4, 0.3, 0.3), regularization=1.0, p=p))
    check_grads(fn, (logits,), order=1, modes=("fwd", "rev"), eps=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"topk_weights": (0.5, 0.4)}, "sum to 1"),
    ({"topk_weights": (1.5, -0.5)}, "non-negative"),
    ({"topk_weights": ()}, "topk_weights"),
    ({"topk_weights": 3}, "sequence of numbers"),
    ({"regularization": 0.0}, "regularization must be > 0"),
    ({"p": 1.0}, "p must be > 1"),
    ({"epsilon": 0.5}, r"epsilon must be in \[0, 0.5\)"),
    ({"topk_weights": (0.0, 1.0), "epsilon": 0.0},
     "epsilon must be > 0 when topk_weights"),
])
def test_topk_xent_option_errors(options, message):
  with pytest.raises(ValueError, match=message):
    losses.create_loss("topk_xent", options)
  with pytest.raises(ValueError, match=message):
    losses.topk_xent(jnp.zeros((1, 4)), jnp.eye(4)[:1], **options)


def test_more_weights_than_classes_is_an_error():
  with pytest.raises(ValueError, match="more than the 3 classes"):
    losses.topk_xent(jnp.zeros((1, 3)), jnp.eye(3)[:1],
                     topk_weights=(0.5, 0, 0, 0.5))


def test_create_loss_checks_names_and_options():
  assert losses.loss_option_names("topk_xent") == (
      "topk_weights", "regularization", "p", "epsilon")
  assert losses.loss_option_names("softmax_xent") == ()
  with pytest.raises(ValueError, match=r"config.task.loss must be one of "
                     r"'softmax_xent', 'sigmoid_xent', 'topk_xent'; got 'l2'"):
    losses.create_loss("l2")
  with pytest.raises(ValueError, match=r"config.task.loss_options of loss "
                     r"'softmax_xent' has unknown field\(s\) k; allowed "
                     r"fields: none"):
    losses.create_loss("softmax_xent", {"k": 5})
  with pytest.raises(ValueError, match=r"of loss 'topk_xent' has unknown "
                     r"field\(s\) k; allowed fields: topk_weights, "
                     r"regularization"):
    losses.create_loss("topk_xent", {"k": 5})
  loss = losses.create_loss("topk_xent", {"topk_weights": [1.0]})
  logits, labels = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0]])
  np.testing.assert_allclose(loss(logits, labels),
                             losses.softmax_xent(logits, labels), rtol=1e-5)


class _Identity(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False, step=None):
    del train, step
    return x * self.param("scale", nn.initializers.ones, ()), {
        "auxiliary_loss": jnp.float32(0.0)}


def test_task_uses_the_loss_options():
  options = {"topk_weights": (0.5, 0.5), "regularization": 1.0, "p": 2.0}
  task = tasks.ClassificationTask(model=_Identity(), eval_model=_Identity(),
                                  dataset=None, loss="topk_xent",
                                  loss_options=options)
  logits = jnp.array([[2.0, 0.5, 0.0, -3.0], [0.0, 1.0, 2.0, 3.0]])
  labels = jnp.eye(4)[jnp.array([2, 3])]
  batch = {"image": logits, "labels": labels}
  params = task.init(jax.random.key(0), batch)
  loss, metrics = task.train_loss(params, batch, jax.random.key(1))
  expected = losses.topk_xent(logits, labels, **options).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["task_loss"] == loss


def test_create_task_reads_loss_options_and_reports_bad_ones():
  config = train_testing.load_config("digits_vit.py:runlocal")
  with config.unlocked():
    config.task.loss = "topk_xent"
    config.task.loss_options = {"topk_weights": (0.5, 0.5), "p": 2.0}
  task = tasks.create_task(config)
  assert task.loss_options == {"topk_weights": (0.5, 0.5), "p": 2.0}
  with config.unlocked():
    config.task.loss_options.p = 0.5
  with pytest.raises(ValueError,
                     match=r"config.task.loss_options: p must be > 1"):
    tasks.create_task(config)
