"""Per-example classification losses, chosen by name in `config.task.loss`.

Every loss maps logits `[B, num_classes]` and label weights
`[B, num_classes]` (one-hot, multi-hot or smoothed) to per-example losses
`[B]`; the task averages them.
A loss's options (keyword-only arguments, e.g. those of `topk_xent`) come
from `config.task.loss_options`, checked by `create_loss`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from moe import ops
from moe.config import schema

Loss = Callable[[jax.Array, jax.Array], jax.Array]

# P_K of the top-k loss: half top-1 (softmax), half top-5 (soft top-5 mask).
DEFAULT_TOPK_WEIGHTS = (0.5, 0.0, 0.0, 0.0, 0.5)


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy: `-sum_c labels_c * log softmax(logits)_c`."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-class sigmoid cross-entropy summed over the classes.

  For multi-label data such as ImageNet-21k (the V-MoE choice there).
  """
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


def check_topk_xent_options(topk_weights: Sequence[float],
                            regularization: float, p: float,
                            epsilon: float) -> tuple[float, ...]:
  """Checks the options of `topk_xent`; returns the weights as a tuple.

  Raises:
    ValueError: weights empty, negative or not summing to 1;
      regularization <= 0; p <= 1; epsilon outside [0, 0.5); epsilon = 0
      together with topk_weights[0] = 0 (the loss would be infinite for a
      label outside every soft top-k support).
  """
  try:
    weights = tuple(float(w) for w in topk_weights)
  except TypeError as e:
    raise ValueError(f"topk_weights must be a sequence of numbers, got "
                     f"{topk_weights!r}.") from e
  if not weights or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
    raise ValueError(f"topk_weights must be non-negative and sum to 1 (w_k "
                     f"weighs the top-k term, k = 1, 2, ...), got "
                     f"{topk_weights!r}.")
  if not regularization > 0:
    raise ValueError(f"regularization must be > 0, got {regularization!r}.")
  if not p > 1:
    raise ValueError(f"p must be > 1, got {p!r}.")
  if not 0 <= epsilon < 0.5:
    raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon!r}.")
  if epsilon == 0 and weights[0] == 0:
    raise ValueError("epsilon must be > 0 when topk_weights[0] is 0: a label "
                     "outside the support of every soft top-k mask would "
                     "have an infinite loss.")
  return weights


def _log_or_minus_inf(x: jax.Array) -> jax.Array:
  """log(x) for x > 0 and -inf for x = 0, with a zero (not NaN) gradient."""
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), -jnp.inf)


def topk_xent(logits: jax.Array, labels: jax.Array, *,
              topk_weights: Sequence[float] = DEFAULT_TOPK_WEIGHTS,
              regularization: float = 1.0, p: float = 4 / 3,
              epsilon: float = 1e-7) -> jax.Array:
  """Top-k cross-entropy on the sparse soft top-k mask of the logits.

  The differentiable top-k classification loss of Petersen et al.,
  "Differentiable Top-k Classification Learning" (ICML 2022, arXiv
  2206.07290; the `TopKCrossEntropyLoss` of their difftopk code with its
  default top1_mode="sm"), in which Sander et al., "Fast, Differentiable and
  Sparse Top-k: a Convex Analysis Perspective" (ICML 2023, arXiv 2302.01425,
  §6) replace the relaxed sorting network by their sparse soft top-k mask.
  With z = logits [num_classes], y = labels [num_classes], w = topk_weights = (w_1, ..., w_K)
  (Petersen's P_K: w_k weighs "the label is among the top k", w >= 0,
  Σ w = 1) and m_k(z) = `moe.ops.topk_mask(z, k, regularization, p)` (values
  in [0, 1], summing to k, exactly 0 outside a support):

      q_c(z) = w_1 softmax(z)_c + Σ_{k=2..K, w_k > 0} w_k m_k(z)_c
      loss(z, y) = -Σ_c y_c log(ε + (1 - 2ε) q_c(z)),

  computed in log space (log-sum-exp of the terms) so that it is stable for
  large logits. The top-1 term uses the softmax, as Petersen et al. do by
  default (and for its stability); q_c lies in [0, 1].

  Sparse masks: m_k(z)_c is exactly 0 (with zero gradient) for a class far
  below the k-th largest logit. Then only the softmax term w_1 softmax(z)_c
  moves the logits, and the ε floor keeps the loss finite even if w_1 = 0
  (then, with ε = 1e-7, the loss is at most -log ε ≈ 16.1 with a zero
  gradient for that example). ε = 1e-7 is Petersen et al.'s value.

  Limits: w = (1,) and ε = 0 give the softmax cross-entropy exactly; as
  regularization -> 0, m_k(z)_c -> 1[c is among the k largest logits] (hard
  top-k accuracy terms, no gradient).

  Args:
    logits: `[B, num_classes]`.
    labels: `[B, num_classes]` label weights (one-hot, multi-hot or smoothed).
    topk_weights: (w_1, ..., w_K), K <= num_classes.
    regularization: λ > 0 of `topk_mask`, in logit units.
    p: p > 1 of `topk_mask` (2: piecewise linear, 4/3: smooth).
    epsilon: ε in [0, 0.5); must be > 0 when w_1 = 0.

  Returns:
    `[B]` per-example losses.

  Raises:
    ValueError: bad options (`check_topk_xent_options`) or K > num_classes.
  """
  weights = check_topk_xent_options(topk_weights, regularization, p, epsilon)
  num_classes = logits.shape[-1]
  if len(weights) > num_classes:
    raise ValueError(f"topk_weights has {len(weights)} entries (K), more "
                     f"than the {num_classes} classes.")
  mask_sum = jnp.zeros_like(logits)
  for k, weight in enumerate(weights[1:], start=2):
    if weight > 0:
      mask_sum += weight * ops.topk_mask(logits, k,
                                         regularization=regularization, p=p)
  log_q = _log_or_minus_inf(mask_sum)
  if weights[0] > 0:
    log_q = jnp.logaddexp(log_q, jnp.log(weights[0]) +
                          jax.nn.log_softmax(logits))
  if epsilon > 0:
    log_q = jnp.logaddexp(jnp.log1p(-2 * epsilon) + log_q, jnp.log(epsilon))
  # Where y_c = 0, log_q may be -inf (ε = 0, class outside every support).
  return -jnp.sum(jnp.where(labels > 0, labels * log_q, 0.0), axis=-1)


LOSSES: dict[str, Loss] = {
    "softmax_xent": softmax_xent,
    "sigmoid_xent": sigmoid_xent,
    "topk_xent": topk_xent,
}


def loss_option_names(name: str) -> tuple[str, ...]:
  """The options (keyword-only arguments) of loss `name`."""
  parameters = inspect.signature(LOSSES[name]).parameters.values()
  return tuple(param.name for param in parameters
               if param.kind == inspect.Parameter.KEYWORD_ONLY)


def default_loss_options(name: str) -> dict[str, Any]:
  """The options of loss `name` with their default values."""
  schema.check_choice(name, "config.task.loss", tuple(LOSSES))
  parameters = inspect.signature(LOSSES[name]).parameters
  return {option: parameters[option].default
          for option in loss_option_names(name)}


def create_loss(name: str, options: Mapping[str, Any] | None = None,
                field: str = "config.task") -> Loss:
  """Returns loss `name` with its options bound.

  Args:
    name: key of `LOSSES`.
    options: keyword-only arguments of that loss (e.g. `topk_xent`'s
      `topk_weights`, `regularization`, `p`, `epsilon`); None or {} keeps
      the defaults.
    field: the config section quoted in error messages.

  Returns:
    A function (logits [B, num_classes], labels [B, num_classes]) -> [B].

  Raises:
    ValueError: unknown loss, an option the loss does not take, or a bad
      option value.
  """
  schema.check_choice(name, f"{field}.loss", tuple(LOSSES))
  options = dict(options or {})
  allowed = loss_option_names(name)
  schema.check_unknown_fields(options, allowed,
                              f"{field}.loss_options of loss {name!r}")
  if name == "topk_xent":
    defaults = inspect.signature(topk_xent).parameters
    merged = {key: options.get(key, defaults[key].default) for key in allowed}
    try:
      options["topk_weights"] = check_topk_xent_options(**merged)
    except ValueError as e:
      raise ValueError(f"{field}.loss_options: {e}") from e
  return functools.partial(LOSSES[name], **options)
