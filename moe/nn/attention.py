"""Multi-head self-attention with selectable edge sparsity.

Shapes: B batch, L tokens, D width, H heads, D/H width of a head.

An *edge* (i, j) is query i attending to key j; it is *allowed* for every
(i, j) without `causal` and for j <= i with it (L(L+1)/2 edges). With the
scaled logits s_ij = <q_i, k_j> / sqrt(D/H) of a head, the weights w_ij of
each `sparsity` are (all of them 0 outside the allowed edges):

* "dense": w_i = softmax over the allowed keys of s_i.
* "sparse_topk": m_i = `moe.ops.topk_mask` of s_i over the allowed keys with
  k = `keys_per_query` and λ, p from the config: a soft top-k mask in
  [0, 1] with Σ_j m_ij = k, exactly 1 on keys well above its threshold τ_i
  and exactly 0 below it (the support is the k largest keys plus those
  within about λ of the k-th; it shrinks to exactly k as λ -> 0). Then
      w_ij = m_ij exp(s_ij - M_i) / Σ_j m_ij exp(s_ij - M_i),
  M_i = max over the allowed j of s_ij: the softmax restricted by the mask
  and renormalised over its support, so rows sum to 1 and w is exactly 0
  off the support. A row with at most k allowed keys keeps all of them
  (m = 1: dense). The gradient flows through s and through m (the
  operator's implicit-function JVP).
* "hard_topk": the same with m the hard top-k mask of s_i (exactly k ones;
  ties to the lower key), with a straight-through gradient: the forward pass
  is w_hard, the backward pass that of the dense weights,
      w = w_dense + stop_gradient(w_hard - w_dense),
  so that keys outside the top k still receive gradient.
* "gated": one Bernoulli gate per edge, open with probability σ(g_ij), where
  the gate logit is a per-head affine function of the attention logit,
      g_ij = a_h s_ij + b_h        (parameters `gate_scale`, `gate_bias` [H]).
  Two parameters per head and no new projection: a gate keeps the edges the
  head already scores high, so post-training can drop edges by moving one
  threshold -b_h / a_h per head. a starts at 0 and b at `gate_bias_init`,
  so every gate starts open (σ(b) ~ 1). The weights are the dense softmax
  times the gates z_ij, renormalised:
      w_ij = z_ij exp(s_ij - M_i) / Σ_j z_ij exp(s_ij - M_i),
  and a query whose gates are all closed gets w_i = 0 (its output is the
  output projection's bias; no NaN). Gates at train time (rng "dropout"):
    - "straight_through": z = 1[u < σ(g)], u ~ U(0, 1), exactly 0 or 1,
      with the gradient of σ(g): z = 1[u < σ(g)] + σ(g) - stop_gradient(σ(g)).
    - "relaxed": the binary concrete z = σ((g + log u - log(1 - u)) / T),
      T = `gate_temperature`: in (0, 1), exact gradient.
  At eval the gates are deterministic: z = 1[σ(g) > 0.5]. The expected
  number of active edges, the penalty of sparse post-training, is
      E_h = mean over the batch of Σ_{allowed (i, j)} σ(g_ij)   (per head),
  the metric `expected_edges` (differentiable in a_h, b_h and the logits).

Metrics (float32): `edge_fraction` [H], the active edges (w_ij != 0) over
the allowed ones, mean over the batch (relaxed gates are never exactly 0,
so at train time it is 1 for them); `expected_edges` [H], E_h above when
gated, the number of active edges otherwise; `allowed_edges`, L(L+1)/2 or
L².

Parameters are those of `flax.linen.MultiHeadDotProductAttention`, so that
ViT checkpoints load unchanged: `{query,key,value}/kernel [D, H, D/H]`,
`{query,key,value}/bias [H, D/H]`, `out/kernel [H, D/H, D]`, `out/bias [D]`;
plus `gate_scale`, `gate_bias` `[H]` for "gated" only.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe.config import schema
from moe.ops import threshold
from moe.ops import topk

Array = jax.Array
Metrics = dict[str, Array]

SPARSITIES = ("dense", "gated", "sparse_topk", "hard_topk")
GATE_ESTIMATORS = ("straight_through", "relaxed")


def allowed_edges(length: int, causal: bool) -> Array:
  """`[L, L]` bool: query i may attend to key j (j <= i when causal)."""
  if causal:
    return jnp.tril(jnp.ones((length, length), bool))
  return jnp.ones((length, length), bool)


def num_allowed_edges(length: int, causal: bool) -> int:
  """L(L+1)/2 when causal, L² otherwise."""
  return length * (length + 1) // 2 if causal else length * length


def allowed_keys_per_query(length: int, causal: bool) -> np.ndarray:
  """`[L, 1]` numpy: the allowed keys of each query (i + 1 when causal).

  Static, so that no reduction over the constant mask is left to XLA's
  constant folding (seconds at L = 1024).
  """
  if causal:
    return np.arange(1, length + 1)[:, None]
  return np.full((length, 1), length)


def renormalised_softmax(s: Array, m: Array, allowed: Array,
                         row_max: Array | None = None) -> Array:
  """w_ij = m_ij exp(s_ij - max) / Σ_j m_ij exp(s_ij - max) over allowed j.

  Args:
    s: `[..., L, L]` logits.
    m: `[..., L, L]` non-negative support weights (a mask or gates), 0 off
      the allowed edges.
    allowed: `[L, L]` allowed edges; the max runs over them.
    row_max: `[..., L, 1]` that max when the caller has it already (no
      gradient flows through it); None: computed here.

  Returns:
    `[..., L, L]` weights, exactly 0 where m = 0; a row with Σ m = 0 is all
    0 (finite gradients).
  """
  top = row_max
  if top is None:
    top = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  # Off the allowed edges s may exceed the max: exp is kept finite there
  # (where m = 0 anyway). A `where`, not `minimum`, which would halve the
  # gradient of the maximal entry.
  e = m * jnp.exp(jnp.where(s <= top, s - top, 0.0))
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


def dense_weights(s: Array, allowed: Array) -> Array:
  """Softmax over the allowed keys, as flax's dot-product attention."""
  return jax.nn.softmax(jnp.where(allowed, s, jnp.finfo(s.dtype).min))


def query_blocks(length: int, causal: bool, k: int) -> list[tuple[int, int]]:
  """Query ranges [q0, q1) whose thresholds `sparse_topk_support` solves
  separately.

  Causal queries below q1 see only the keys below q1, so a block solves over
  `[q1 - q0, q1]` instead of `[q1 - q0, L]`: with 4 blocks about 5/8 of the
  work of one `[L, L]` solve. Blocks with q1 <= k keep every allowed key.
  """
  if not causal or length <= 4 * k:
    return [(0, length)]
  edges = [round(length * i / 4) for i in range(5)]
  return list(zip(edges[:-1], edges[1:]))


def sparse_topk_support(s: Array, k: int, regularization: float, p: float,
                        causal: bool) -> Array:
  """The soft top-k mask of each row of s over its allowed keys: the first
  output of `sparse_topk_support_and_max`."""
  return sparse_topk_support_and_max(s, k, regularization, p, causal)[0]


def sparse_topk_support_and_max(s: Array, k: int, regularization: float,
                                p: float, causal: bool
                                ) -> tuple[Array, Array]:
  """The soft top-k mask of each row of s over its allowed keys, and the
  row max over them (from the rows the solver reads anyway).

  Causal thresholds are solved per block of queries over the keys the
  block can see (`query_blocks`), disallowed entries filled with (min of
  the first k logits of the row) - 2λ: the threshold is at least (k-th
  largest allowed entry) - λ, which is at least the smallest of any k
  allowed entries (the first k keys are allowed in every row with more
  than k) - λ, so they are below it. Unlike -inf or finfo.min the fill
  keeps the root-find's bracket and tolerance on the scale of the logits,
  and unlike the row min it reads k columns, not L. The mask and its
  gradient are then computed once on the full rows, within the allowed
  edges (`moe.ops.topk.topk_mask_at_threshold`): exactly 0 off them, no
  gradient.

  Args:
    s: `[..., L, L]` logits.
    k: keys per query; rows with at most k allowed keys keep them all.
    regularization: λ > 0.
    p: p > 1.
    causal: only the keys j <= i are allowed.

  Returns:
    `[..., L, L]` mask in [0, 1], Σ_j = min(k, allowed keys of row i), and
    `[..., L, 1]` the max of the allowed logits of each row (no gradient).
  """
  length = s.shape[-1]
  allowed = allowed_edges(length, causal)
  solve = jax.lax.stop_gradient(s)
  if k >= length:
    row_max = jnp.max(jnp.where(allowed, solve, -jnp.inf), axis=-1,
                      keepdims=True)
    return jnp.broadcast_to(allowed, s.shape).astype(s.dtype), row_max
  fill = jnp.min(solve[..., :k], axis=-1, keepdims=True) - 2.0 * regularization
  taus, maxes = [], []
  for q0, q1 in query_blocks(length, causal, k):
    rows = solve[..., q0:q1, :q1]
    if causal:
      rows = jnp.where(allowed[q0:q1, :q1], rows, fill[..., q0:q1, :])
    maxes.append(jnp.max(rows, axis=-1, keepdims=True))
    # With q1 <= k every row keeps all its keys (below): τ is not used.
    taus.append(maxes[-1] if q1 <= k else threshold.solve_threshold(
        rows, k, regularization, p, magnitude=False))
  tau, row_max = (t[0] if len(t) == 1 else jnp.concatenate(t, axis=-2)
                  for t in (taus, maxes))
  mask = topk.topk_mask_at_threshold(s, tau, k, regularization=regularization,
                                     p=p, where=allowed if causal else None)
  counts = allowed_keys_per_query(length, causal)
  return jnp.where(counts <= k, allowed.astype(s.dtype), mask), row_max


def hard_topk_support(s: Array, k: int, causal: bool) -> Array:
  """`[..., L, L]` 0/1: the k largest allowed logits of each row (all the
  allowed ones in a row with at most k), no gradient."""
  allowed = allowed_edges(s.shape[-1], causal)
  if k >= s.shape[-1]:
    return jnp.broadcast_to(allowed, s.shape).astype(s.dtype)
  keep_all = allowed_keys_per_query(s.shape[-1], causal) <= k
  mask = topk.hard_topk_mask(jnp.where(allowed, s, -jnp.inf), k)
  return jax.lax.stop_gradient(jnp.where(
      keep_all, allowed.astype(s.dtype), jnp.where(allowed, mask, 0.0)))


def sample_gates(logits: Array, rng: Array | None, estimator: str,
                 temperature: float) -> Array:
  """Edge gates z from gate logits g (see the module docstring).

  Args:
    logits: `[..., L, L]` gate logits g.
    rng: PRNG key at train time; None: the deterministic eval gates
      1[σ(g) > 0.5].
    estimator: "straight_through" or "relaxed".
    temperature: T of the relaxed estimator.

  Returns:
    `[..., L, L]` gates: 0/1 (straight-through, eval) or in (0, 1) (relaxed).
  """
  prob = jax.nn.sigmoid(logits)
  if rng is None:
    return jax.lax.stop_gradient((prob > 0.5).astype(logits.dtype))
  tiny = jnp.finfo(logits.dtype).tiny
  u = jax.random.uniform(rng, logits.shape, logits.dtype, minval=tiny,
                         maxval=1.0)
  if estimator == "relaxed":
    noise = jnp.log(u) - jnp.log1p(-jnp.minimum(u, 1.0 - tiny))
    return jax.nn.sigmoid((logits + noise) / temperature)
  hard = (u < prob).astype(logits.dtype)
  return hard + (prob - jax.lax.stop_gradient(prob))


def edge_metrics(w: Array, allowed: Array, num_allowed: int,
                 gate_prob: Array | None) -> Metrics:
  """`edge_fraction` [H], `expected_edges` [H] and `allowed_edges` (scalar).

  Args:
    w: `[B, H, L, L]` attention weights.
    allowed: `[L, L]` allowed edges.
    num_allowed: their number (`num_allowed_edges`).
    gate_prob: `[B, H, L, L]` σ(g) of the gated attention, else None.

  Returns:
    float32 metrics: active edges (w != 0) over allowed edges, mean over the
    batch; the expected active edges Σ_allowed σ(g) (gated) or the active
    edges (others), mean over the batch; the number of allowed edges.
  """
  active = jnp.sum((w != 0) & allowed, axis=(-2, -1), dtype=jnp.float32)
  num_allowed = jnp.float32(num_allowed)
  expected = active
  if gate_prob is not None:
    expected = jnp.sum(jnp.where(allowed, gate_prob, 0.0), axis=(-2, -1),
                       dtype=jnp.float32)
  return {"edge_fraction": jnp.mean(active, axis=0) / num_allowed,
          "expected_edges": jnp.mean(expected, axis=0),
          "allowed_edges": num_allowed}


def _check_number(value: Any, field: str, low: float, allowed: str) -> None:
  if (not isinstance(value, numbers.Real) or isinstance(value, bool)
      or not value > low or value == float("inf")):
    raise ValueError(f"{field} must be a finite number {allowed}, got "
                     f"{value!r}.")


class SelfAttention(nn.Module):
  """Multi-head self-attention `[B, L, D] -> [B, L, D]` with edge sparsity.

  Attributes:
    num_heads: H; must divide D.
    sparsity: one of `SPARSITIES` (see the module docstring).
    causal: query i attends to keys j <= i only.
    keys_per_query: k >= 1 of "sparse_topk" and "hard_topk"; a query with
      fewer allowed keys keeps all of them.
    regularization: λ > 0 of "sparse_topk" (smaller: closer to hard top-k).
    p: p > 1 of "sparse_topk".
    gate_estimator: "straight_through" or "relaxed" ("gated").
    gate_temperature: T > 0 of the relaxed estimator.
    gate_bias_init: initial b_h of the gate logits (gates start open).
    dropout_rate: dropout on the attention weights at train time.
    kernel_init: initialiser of the projection kernels.
    dtype: computation dtype of the projections (the weights are computed
      in float32, or float64 for float64).
  """
  num_heads: int
  sparsity: str = "dense"
  causal: bool = False
  keys_per_query: int = 8
  regularization: float = 0.1
  p: float = 4 / 3
  gate_estimator: str = "straight_through"
  gate_temperature: float = 0.5
  gate_bias_init: float = 3.0
  dropout_rate: float = 0.0
  kernel_init: Callable[..., Array] = nn.initializers.xavier_uniform()
  dtype: Any = jnp.float32

  def __post_init__(self):
    schema.check_int(self.num_heads, "num_heads", 1)
    schema.check_choice(self.sparsity, "sparsity", SPARSITIES)
    schema.check_int(self.keys_per_query, "keys_per_query", 1)
    _check_number(self.regularization, "regularization", 0.0, "> 0")
    _check_number(self.p, "p", 1.0, "> 1 (e.g. 4/3, 2)")
    schema.check_choice(self.gate_estimator, "gate_estimator",
                        GATE_ESTIMATORS)
    _check_number(self.gate_temperature, "gate_temperature", 0.0, "> 0")
    if (not isinstance(self.dropout_rate, numbers.Real)
        or not 0.0 <= self.dropout_rate < 1.0):
      raise ValueError(f"dropout_rate must be in [0, 1), got "
                       f"{self.dropout_rate!r}.")
    super().__post_init__()

  def _gated_weights(self, s: Array, allowed: Array, train: bool
                     ) -> tuple[Array, Array]:
    heads = (self.num_heads, 1, 1)
    scale = self.param("gate_scale", nn.initializers.zeros, (self.num_heads,))
    bias = self.param("gate_bias", nn.initializers.constant(
        self.gate_bias_init), (self.num_heads,))
    logits = (scale.reshape(heads).astype(s.dtype) * s
              + bias.reshape(heads).astype(s.dtype))
    rng = self.make_rng("dropout") if train else None
    gates = sample_gates(logits, rng, self.gate_estimator,
                         self.gate_temperature)
    gates = jnp.where(allowed, gates, 0.0)
    return renormalised_softmax(s, gates, allowed), jax.nn.sigmoid(logits)

  def attention_weights(self, s: Array, allowed: Array, train: bool
                        ) -> tuple[Array, Array | None]:
    """The weights `[B, H, L, L]` of the logits s, and σ(g) when gated."""
    if self.sparsity == "gated":
      return self._gated_weights(s, allowed, train)
    if self.sparsity == "dense":
      return dense_weights(s, allowed), None
    k = self.keys_per_query
    if self.sparsity == "sparse_topk":
      mask, row_max = sparse_topk_support_and_max(
          s, k, self.regularization, self.p, self.causal)
      return renormalised_softmax(s, mask, allowed, row_max), None
    hard = renormalised_softmax(
        s, hard_topk_support(s, k, self.causal), allowed)
    dense = renormalised_softmax(s, allowed.astype(s.dtype), allowed)
    return dense + jax.lax.stop_gradient(hard - dense), None

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False
               ) -> tuple[Array, Metrics]:
    """Attends.

    Args:
      x: `[B, L, D]` tokens.
      train: whether dropout and gate sampling are active (rng "dropout").

    Returns:
      `[B, L, D]` outputs and the metrics of `edge_metrics`. The weights
      `[B, H, L, L]` (before dropout) are sown as
      `intermediates/attention_weights`.
    """
    if x.ndim != 3 or x.shape[-1] % self.num_heads:
      raise ValueError(f"x must have shape [B, L, D] with D divisible by "
                       f"num_heads={self.num_heads}, got shape {x.shape}.")
    width, length = x.shape[-1], x.shape[1]
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype,
        features=(self.num_heads, width // self.num_heads),
        kernel_init=self.kernel_init)
    query, key, value = (dense(name=name)(x)
                         for name in ("query", "key", "value"))
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    compute = topk.compute_dtype(query.dtype)
    s = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(compute)
    allowed = allowed_edges(length, self.causal)
    w, gate_prob = self.attention_weights(s, allowed, train)
    metrics = edge_metrics(w, allowed, num_allowed_edges(length, self.causal),
                           gate_prob)
    self.sow("intermediates", "attention_weights", w)
    w = nn.Dropout(self.dropout_rate)(w, deterministic=not train)
    y = jnp.einsum("bhqk,bkhd->bqhd", w.astype(value.dtype), value)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=self.kernel_init, name="out")(y)
    return y, metrics


# The fields of `SelfAttention` that the encoder passes (its own), and those
# that `config.model.encoder.attention` sets.
ENCODER_FIELDS = ("num_heads", "dropout_rate")
ATTENTION_CONFIG_FIELDS = tuple(
    name for name in schema.field_names(SelfAttention)
    if name not in ENCODER_FIELDS)
