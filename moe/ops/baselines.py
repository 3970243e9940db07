"""Baseline soft top-k operators, for experiments and MoE routers.

These sit next to the project's own sparse top-k operators (`moe.ops.topk_mask`)
and share their conventions: `x` has any leading shape, the top-k runs along
`axis` (default -1), `k` is a static Python int in 1..n where n is the size of
that axis, bfloat16/float16 inputs are computed in float32 and returned in the
input dtype (float64 stays float64 when x64 is on), and every function works
under `jax.jit`, `jax.vmap` and `jax.grad`.

The baselines:

* `softmax_topk`: V-MoE gating (Riquelme et al. 2021, "Scaling vision with
  sparse mixture of experts", NeurIPS). Softmax over the axis, then keep the k
  largest probabilities and zero the rest, optionally renormalised. Exactly
  k-sparse; the gradient is that of the kept probabilities. Use it as the
  standard MoE router baseline.
* `gumbel_topk`: Gumbel-softmax perturbed relaxed top-k (Xie & Ermon 2019,
  "Reparameterizable subset sampling via continuous relaxations", IJCAI), as
  used by SMEC (arXiv 2510.12474). With `hard=True` the forward value is the
  exact k-hot mask of the perturbed logits and the gradient is that of the
  relaxation (straight-through). Use it for stochastic, exploration-friendly
  routing, or deterministic relaxed routing with `key=None`.
* `entropic_topk`: entropy-regularised optimal-transport soft top-k (Xie et al.
  2020, "Differentiable top-k with optimal transport", NeurIPS), solved by
  log-domain Sinkhorn iterations and differentiated by unrolling. Dense, values
  in [0, 1] summing to k (up to Sinkhorn convergence); approaches the hard
  mask as `regularization` -> 0 given enough iterations.
  Use it as the smooth, deterministic, dense soft top-k baseline.
* `perturbed_topk`: Monte-Carlo perturbed optimiser (Berthet et al. 2020,
  "Learning with differentiable perturbed optimizers", NeurIPS). Mean of hard
  top-k masks of Gaussian-perturbed scores, with the perturbation gradient
  estimator of their Prop. 3.1. Use it as the unbiased-smoothing baseline whose
  sparsity and variance are set by `sigma` and `num_samples`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from moe.ops._checks import check_positive
from moe.ops._checks import check_positive_int
from moe.ops._checks import check_selection
from moe.ops.topk import along_last_axis
from moe.ops.topk import hard_mask_last_axis
from moe.ops.topk import scatter_last_axis

__all__ = [
    "entropic_topk",
    "gumbel_topk",
    "perturbed_topk",
    "softmax_topk",
]


def _check_bool(value, name: str) -> bool:
  """Returns `value` if it is a Python bool, or raises naming `name`."""
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be a Python bool, got {value!r}.")
  return value


def _check_key(key, name: str = "key"):
  """Returns `key` if it is given, or raises naming `name`."""
  if key is None:
    raise ValueError(
        f"{name} must be a jax.random key (e.g. jax.random.key(0)), got None.")
  return key


# softmax_topk


def _softmax_topk_last(logits: jnp.ndarray, k: int,
                       renormalize: bool) -> jnp.ndarray:
  """`softmax_topk` along the last axis of [..., n] logits."""
  # Softmax is monotone, so the k largest logits are the k largest
  # probabilities; selecting on the logits avoids ties from rounding.
  kept_logits, indices = lax.top_k(logits, k)
  if renormalize:
    # p_i / sum_{j kept} p_j is the softmax over the kept logits alone.
    kept = jax.nn.softmax(kept_logits, axis=-1)
  else:
    log_normalizer = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    kept = jnp.exp(kept_logits - log_normalizer)
  return scatter_last_axis(kept, indices, logits.shape[-1])


def softmax_topk(x, k: int, *, axis: int = -1,
                 renormalize: bool = False) -> jnp.ndarray:
  """V-MoE gating: softmax, then keep the k largest probabilities.

  out_i = p_i if i is among the k largest p (ties broken by lower index), else
  0, where p = softmax(x) along `axis`. With `renormalize=True` the kept values
  are divided by their sum, which equals softmax over the kept logits only.

  Args:
    x: [..., n, ...] logits, floating dtype.
    k: number of entries kept per row, a static Python int in 1..n.
    axis: the axis of size n along which the top-k runs.
    renormalize: whether the kept probabilities are rescaled to sum to 1.

  Returns:
    [..., n, ...] array of the dtype of `x`, exactly k nonzeros (unless some
    kept probability underflows) along `axis`. The gradient flows through the
    kept values only.

  Raises:
    ValueError: if an argument is invalid; the message names it.
  """
  x, k, axis = check_selection(x, k, axis)
  renormalize = _check_bool(renormalize, "renormalize")
  fn = functools.partial(_softmax_topk_last, k=k, renormalize=renormalize)
  return along_last_axis(fn, x, axis)


# gumbel_topk


def _relaxed_topk_last(logits: jnp.ndarray, k: int,
                       temperature: float) -> jnp.ndarray:
  """Relaxed k-hot vector of Xie & Ermon (2019) along the last axis.

  w_0 = logits, a_0 = 0, and for j = 1..k:
    w_j = w_{j-1} + log(max(1 - a_{j-1}, tiny)),
    a_j = softmax(w_j / temperature),
  returning khot = a_1 + ... + a_k, which sums to k along the last axis.

  Args:
    logits: [..., n] (perturbed) logits.
    k: the number of softmax steps.
    temperature: the softmax temperature, > 0.

  Returns:
    [..., n] relaxed k-hot vector.
  """
  tiny = jnp.finfo(logits.dtype).tiny

  def step(_, carry):
    weights, onehot_approx, khot = carry
    weights = weights + jnp.log(jnp.maximum(1.0 - onehot_approx, tiny))
    onehot_approx = jax.nn.softmax(weights / temperature, axis=-1)
    return weights, onehot_approx, khot + onehot_approx

  zeros = jnp.zeros_like(logits)
  init = (logits, zeros, zeros)
  _, _, khot = lax.fori_loop(0, k, step, init)
  return khot


def _gumbel_topk_last(logits: jnp.ndarray, k: int, key, temperature: float,
                      hard: bool) -> jnp.ndarray:
  """`gumbel_topk` along the last axis of [..., n] logits."""
  if key is not None:
    logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  relaxed = _relaxed_topk_last(logits, k, temperature)
  if not hard:
    return relaxed
  hard_mask = hard_mask_last_axis(lax.stop_gradient(logits), k)
  # Forward: hard_mask + 0 exactly. Backward: the gradient of `relaxed`.
  return hard_mask + (relaxed - lax.stop_gradient(relaxed))


def gumbel_topk(x, k: int, *, key, temperature: float = 1.0, axis: int = -1,
                hard: bool = True) -> jnp.ndarray:
  """Gumbel-softmax perturbed top-k (Xie & Ermon 2019; SMEC, arXiv 2510.12474).

  The logits are perturbed, w = x + g with g ~ Gumbel(0, 1) i.i.d. drawn from
  `key` in the layout of `x` with `axis` moved last (no noise if `key` is
  None). The relaxed k-hot vector is k successive masked softmaxes:
    w_0 = w, a_0 = 0, and for j = 1..k:
    w_j = w_{j-1} + log(max(1 - a_{j-1}, tiny)),  a_j = softmax(w_j / T),
    relaxed = a_1 + ... + a_k,
  with T = `temperature` and tiny the smallest normal float (the form of the
  published algorithm: w_j = w + sum_{i<j} log(1 - a_i)). With `hard=True`
  the output is hard + relaxed - stop_gradient(relaxed), where hard is the
  k-hot mask of the top-k of w (ties broken by lower index): its forward value
  is exactly the hard mask and its gradient is that of the relaxed vector
  (straight-through estimator).

  Args:
    x: [..., n, ...] logits, floating dtype.
    k: number of entries selected per row, a static Python int in 1..n.
    key: a jax.random key for the Gumbel noise, or None for no noise.
    temperature: softmax temperature T > 0 of the relaxation.
    axis: the axis of size n along which the top-k runs.
    hard: whether to return the straight-through hard k-hot mask instead of
      the relaxed vector.

  Returns:
    [..., n, ...] array of the dtype of `x` summing to k along `axis`: exactly
    k-hot if `hard`, else nonnegative relaxed values, which approach the hard
    mask as `temperature` -> 0 (at high temperature an entry may exceed 1).

  Raises:
    ValueError: if an argument is invalid; the message names it.
  """
  x, k, axis = check_selection(x, k, axis)
  temperature = check_positive(temperature, "temperature")
  hard = _check_bool(hard, "hard")
  fn = functools.partial(_gumbel_topk_last, k=k, key=key,
                         temperature=temperature, hard=hard)
  return along_last_axis(fn, x, axis)


# entropic_topk


def _rescale_to_unit_last(scores: jnp.ndarray) -> jnp.ndarray:
  """Maps each row of [..., n] scores affinely onto [0, 1] by its min and max.

  A constant row maps to zeros, with a finite gradient.
  """
  low = jnp.min(scores, axis=-1, keepdims=True)
  high = jnp.max(scores, axis=-1, keepdims=True)
  spread = high - low
  safe_spread = jnp.where(spread > 0, spread, jnp.ones_like(spread))
  return (scores - low) / safe_spread


def _entropic_topk_last(scores: jnp.ndarray, k: int, regularization: float,
                        num_iter: int) -> jnp.ndarray:
  """`entropic_topk` along the last axis of [..., n] scores."""
  n = scores.shape[-1]
  dtype = scores.dtype
  unit = _rescale_to_unit_last(scores)
  anchors = jnp.array([0.0, 1.0], dtype)
  cost = jnp.square(unit[..., :, None] - anchors)  # [..., n, 2]
  log_source = jnp.full((n,), -math.log(n), dtype)  # [n]
  log_target = jnp.log(jnp.array([(n - k) / n, k / n], dtype))  # [2]
  eps = regularization

  def source_potential(target_pot):
    # f_i = eps log mu_i - eps logsumexp_j (g_j - C_ij) / eps; [..., n].
    logits = (target_pot[..., None, :] - cost) / eps
    return eps * (log_source - jax.nn.logsumexp(logits, axis=-1))

  def target_potential(source_pot):
    # g_j = eps log nu_j - eps logsumexp_i (f_i - C_ij) / eps; [..., 2].
    logits = (source_pot[..., :, None] - cost) / eps
    return eps * (log_target - jax.nn.logsumexp(logits, axis=-2))

  def sinkhorn_step(_, target_pot):
    return target_potential(source_potential(target_pot))

  target_pot = jnp.zeros(cost.shape[:-2] + (2,), dtype)
  target_pot = lax.fori_loop(0, num_iter, sinkhorn_step, target_pot)
  # n P_ij with the final f-update folded in: each row of n P is a softmax
  # over the two anchors, so n P_i1 lies in [0, 1] exactly.
  scaled_plan = jax.nn.softmax((target_pot[..., None, :] - cost) / eps, axis=-1)
  return scaled_plan[..., 1]


def entropic_topk(x, k: int, *, regularization: float = 0.1,
                  num_iter: int = 100, axis: int = -1) -> jnp.ndarray:
  """Entropic optimal-transport soft top-k (Xie et al. 2020, NeurIPS).

  Each row of scores is rescaled to s = (x - min x) / (max x - min x) in
  [0, 1] (a constant row gives s = 0). The n scores, each with mass 1/n, are
  transported onto the anchors {0, 1} with masses (n - k)/n and k/n under the
  cost C_ij = (s_i - y_j)^2, y = (0, 1): P minimises <C, P> - eps H(P) with
  eps = `regularization`. Log-domain Sinkhorn, starting from g = 0, repeats
  `num_iter` times
    f_i = eps log(1/n) - eps logsumexp_j (g_j - C_ij) / eps,
    g_j = eps log nu_j - eps logsumexp_i (f_i - C_ij) / eps,
  then a final f-update, and the output is n P_i1 with
  P_ij = exp((f_i + g_j - C_ij) / eps). The final f-update makes each output
  exactly in [0, 1]; the sum along `axis` is k up to Sinkhorn convergence.
  Gradients are by autodiff through the unrolled iterations.

  Args:
    x: [..., n, ...] scores, floating dtype.
    k: the target sum per row, a static Python int in 1..n.
    regularization: entropic regularisation eps > 0; smaller is closer to the
      hard mask but needs more iterations.
    num_iter: number of Sinkhorn iterations, a Python int >= 1.
    axis: the axis of size n along which the top-k runs.

  Returns:
    [..., n, ...] array of the dtype of `x`, values in [0, 1] summing to
    (approximately) k along `axis`.

  Raises:
    ValueError: if an argument is invalid; the message names it.
  """
  x, k, axis = check_selection(x, k, axis)
  regularization = check_positive(regularization, "regularization")
  num_iter = check_positive_int(num_iter, "num_iter")
  fn = functools.partial(_entropic_topk_last, k=k,
                         regularization=regularization, num_iter=num_iter)
  return along_last_axis(fn, x, axis)


# perturbed_topk


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _perturbed_mean_mask(scores: jnp.ndarray, noise: jnp.ndarray, k: int,
                         sigma: float) -> jnp.ndarray:
  """Monte-Carlo mean of hard top-k masks of perturbed scores.

  Args:
    scores: [..., n] scores.
    noise: [S, ..., n] standard Gaussian samples Z_s, treated as constant.
    k: the number of ones per mask.
    sigma: the noise scale.

  Returns:
    [..., n] mean over s of hardtopk(scores + sigma Z_s).
  """
  masks = hard_mask_last_axis(scores + sigma * noise, k)
  return jnp.mean(masks, axis=0)


@_perturbed_mean_mask.defjvp
def _perturbed_mean_mask_jvp(k, sigma, primals, tangents):
  """JVP of Berthet et al. (2020) Prop. 3.1: mean_s mask_s <Z_s, dx> / sigma.

  Its transpose, used by reverse mode, is vjp(g) = mean_s <g, mask_s> Z_s /
  sigma, so no [n, n] Jacobian is ever formed. The tangent of the noise is
  ignored: the noise is a constant sample.
  """
  scores, noise = primals
  scores_dot, _ = tangents
  masks = hard_mask_last_axis(scores + sigma * noise, k)  # [S, ..., n]
  projections = jnp.sum(noise * scores_dot, axis=-1, keepdims=True)
  out = jnp.mean(masks, axis=0)
  out_dot = jnp.mean(masks * projections, axis=0) / sigma
  return out, out_dot


def _perturbed_topk_last(scores: jnp.ndarray, k: int, key, num_samples: int,
                         sigma: float) -> jnp.ndarray:
  """`perturbed_topk` along the last axis of [..., n] scores."""
  noise_shape = (num_samples,) + scores.shape
  noise = jax.random.normal(key, noise_shape, scores.dtype)
  return _perturbed_mean_mask(scores, lax.stop_gradient(noise), k, sigma)


def perturbed_topk(x, k: int, *, key, num_samples: int = 100,
                   sigma: float = 0.1, axis: int = -1) -> jnp.ndarray:
  """Perturbed-optimiser soft top-k (Berthet et al. 2020, NeurIPS).

  Forward: y = (1/S) sum_s hardtopk(x + sigma Z_s), with S = `num_samples`
  and Z_s i.i.d. standard Gaussian of shape [S, ..., n] drawn from `key` in
  the layout of `x` with `axis` moved last; hardtopk is the k-hot mask of the
  k largest entries (ties broken by lower index). Gradient: the perturbation
  estimator of Prop. 3.1, dy/dx ~= E[hardtopk(x + sigma Z) Z^T] / sigma,
  applied as vjp(g) = (1/S) sum_s <g, mask_s> Z_s / sigma with the same
  samples, without forming an [n, n] matrix.

  Args:
    x: [..., n, ...] scores, floating dtype.
    k: the number of entries per hard mask, a static Python int in 1..n.
    key: a jax.random key for the Gaussian perturbations; required.
    num_samples: Monte-Carlo sample count S, a Python int >= 1.
    sigma: perturbation scale > 0.
    axis: the axis of size n along which the top-k runs.

  Returns:
    [..., n, ...] array of the dtype of `x`, values in [0, 1] that are
    multiples of 1/S and sum to k along `axis`.

  Raises:
    ValueError: if an argument is invalid; the message names it.
  """
  x, k, axis = check_selection(x, k, axis)
  key = _check_key(key)
  num_samples = check_positive_int(num_samples, "num_samples")
  sigma = check_positive(sigma, "sigma")
  fn = functools.partial(_perturbed_topk_last, k=k, key=key,
                         num_samples=num_samples, sigma=sigma)
  return along_last_axis(fn, x, axis)
