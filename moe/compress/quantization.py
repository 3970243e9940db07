"""Fake quantization for quantization-aware training (QAT).

Weights: symmetric, per output channel (the last axis of a kernel): with
qmax = 2^(b-1) - 1 and s = max |W| over the other axes / qmax, the codes are
q = clip(round(W / s), -qmax, qmax) in b bits and the weight seen by the
forward pass is q s. Activations: the same scheme per row (per example or
token, over the feature axis), computed from the batch (dynamic range), at
the inputs of every `nn.Dense` / `nn.DenseGeneral` / `nn.Conv`.

Both use a straight-through estimator: the forward pass sees the quantized
value (exactly), the backward pass the identity:
stop_gradient(Q(x)) + (x - stop_gradient(x)).

Bits 32 means "not quantized". Kernels are quantized in the parameter tree
before `apply`, so any model's kernels can be; activations are quantized by
intercepting the layers' calls (`flax.linen.intercept_methods`), so einsums
written with raw parameters (the MoE experts) see float inputs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FLOAT_BITS = 32
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
QUANTIZED_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def check_bits(bits, field: str) -> int:
  """Returns `bits` if it is one of VALID_BITS, else raises naming `field`."""
  if isinstance(bits, bool) or bits not in VALID_BITS:
    raise ValueError(f"{field} must be an integer in 2..8, or 32 (not "
                     f"quantized); got {bits!r}.")
  return int(bits)


def qmax(bits: int) -> int:
  """The largest code of symmetric b-bit quantization, 2^(b-1) - 1."""
  return 2 ** (bits - 1) - 1


def _codes_and_scales(x: jax.Array, bits: int, reduce_axes: Sequence[int]
                      ) -> tuple[jax.Array, jax.Array]:
  """Integer-valued float codes and the scales they multiply (keepdims)."""
  absmax = jnp.max(jnp.abs(x), axis=tuple(reduce_axes), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax(bits), 1.0).astype(x.dtype)
  codes = jnp.clip(jnp.round(x / scale), -qmax(bits), qmax(bits))
  return codes, scale


def _channel_reduce_axes(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1))


def quantize_kernel(w: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Per-channel codes of a kernel, for export.

  Args:
    w: `[..., O]` kernel (O output channels; a vector is one channel).
    bits: 2..8.

  Returns:
    `(codes, scales)`: int8 codes of w's shape in [-qmax, qmax] and float
    scales `[O]`; `codes * scales` is the weight QAT trains with.
  """
  check_bits(bits, "bits")
  if bits == FLOAT_BITS:
    raise ValueError("bits=32 is not quantized; there are no codes.")
  codes, scale = _codes_and_scales(w, bits, _channel_reduce_axes(w.ndim))
  return codes.astype(jnp.int8), scale.reshape(w.shape[-1:])


def _straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
  """`quantized` exactly in the forward pass, the identity's gradient."""
  return jax.lax.stop_gradient(quantized) + (x - jax.lax.stop_gradient(x))


def fake_quantize_kernel(w: jax.Array, bits: int) -> jax.Array:
  """W's per-channel b-bit value, with the straight-through gradient."""
  if bits == FLOAT_BITS:
    return w
  codes, scale = _codes_and_scales(w, bits, _channel_reduce_axes(w.ndim))
  return _straight_through(w, codes * scale)


def fake_quantize_rows(x: jax.Array, bits: int) -> jax.Array:
  """x's per-row (last axis) b-bit value, with the straight-through gradient."""
  if bits == FLOAT_BITS:
    return x
  codes, scale = _codes_and_scales(x, bits, (x.ndim - 1,))
  return _straight_through(x, codes * scale)


@contextlib.contextmanager
def quantized_layer_inputs(bits: int, enabled: jax.Array | bool = True
                           ) -> Iterator[None]:
  """Within the context, the inputs of QUANTIZED_LAYERS are fake-quantized.

  Args:
    bits: activation bits; 32 leaves every input as it is.
    enabled: a (possibly traced) boolean; False passes the inputs through,
      so one compiled step can switch quantization on at a phase boundary.

  Yields:
    Nothing; wrap `model.apply(...)` in it.
  """
  if bits == FLOAT_BITS:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and args
        and isinstance(context.module, QUANTIZED_LAYERS)):
      x = args[0]
      x = jnp.where(enabled, fake_quantize_rows(x, bits), x)
      args = (x,) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
