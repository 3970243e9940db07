"""A causal decoder-only transformer language model, built from `config.model`.

Shapes: B batch, L tokens, V vocabulary, D width, H heads.

Tokens `[B, L]` (int ids in 0..V-1) are embedded, go through a
`moe.nn.transformer.Encoder` whose every block attends causally (query i
sees keys j <= i; `moe.nn.attention.SelfAttention`), and a dense head maps
each position to logits over the vocabulary: the logits at position t
depend on tokens 0..t only, and predict token t + 1. The positions are the
Encoder's learned position embedding `[1, L, D]`, so a model runs on the
sequence length it was initialised with. (An MoE encoder whose experts have
a capacity limit is not exactly causal: later tokens compete for capacity.)

Parameters:

  embedding/embedding       [V, D]
  Transformer/...           see `moe.nn.transformer` (posembed_input,
                            encoderblock_N, encoder_norm)
  head/{kernel [D, V], bias [V]}

Config (`config.model`, a dict or `ml_collections.ConfigDict`):

  name: "decoder" (the key in `moe.nn.models`; ignored here).
  vocab_size: V.
  hidden_size: D (default 128).
  encoder: attributes of `moe.nn.transformer.Encoder` other than
    `attention`: num_layers (default 4), mlp_dim (512), num_heads (4),
    dropout_rate, attention_dropout_rate, stochastic_depth, moe.
  attention: attributes of `moe.nn.attention.SelfAttention` other than
    num_heads and dropout_rate (`sparsity`, `keys_per_query`,
    `regularization`, `p`, `gate_*`, `dtype`), for every block; `causal` is
    always True (giving False is an error). Empty: dense causal attention.
    Changing them keeps the parameters (except "gated", which adds
    `gate_scale`, `gate_bias` per block), so a post-training run can switch
    the sparsity of a trained model.

The model is called as `model.apply(variables, tokens, train=..., step=...)`
and returns `(logits [B, L, V], metrics)`, the metrics of the Encoder:
`auxiliary_loss` and `encoderblock_N/attention/{edge_fraction [H],
expected_edges [H], allowed_edges}` (and MoE metrics). At train time it
needs the rng "dropout" (and "gating" with noisy routers).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import schema
from moe.nn import attention as attention_lib
from moe.nn import moe_layer
from moe.nn import transformer

Array = jax.Array
Metrics = dict[str, Array]

DEFAULT_ENCODER = flax.core.FrozenDict(num_layers=4, mlp_dim=512, num_heads=4)
# The Encoder fields `config.model.encoder` sets: all but the attention.
ENCODER_FIELDS = tuple(name for name in schema.field_names(transformer.Encoder)
                       if name != "attention")
ATTENTION_FIELDS = attention_lib.ATTENTION_CONFIG_FIELDS


def _check_attention(fields: Mapping[str, Any]) -> None:
  """Checks the values of `config.model.attention` now, not at init.

  Builds a detached `SelfAttention` of them (one head; the encoder checks
  the heads) and names the config field in its error.
  """
  try:
    attention_lib.SelfAttention(num_heads=1, parent=None, **fields)
  except ValueError as e:
    raise ValueError(f"config.model.attention.{e}") from e


class Decoder(nn.Module):
  """Causal decoder-only LM: `tokens [B, L] -> (logits [B, L, V], metrics)`.

  Attributes:
    vocab_size: V.
    hidden_size: D.
    encoder: attributes of `moe.nn.transformer.Encoder` but `attention`.
    attention: attributes of `moe.nn.attention.SelfAttention` but
      `num_heads` and `dropout_rate`; `causal` is set (True).
  """
  vocab_size: int
  hidden_size: int = 128
  encoder: Mapping[str, Any] = DEFAULT_ENCODER
  attention: Mapping[str, Any] = flax.core.FrozenDict()

  def __post_init__(self):
    schema.check_int(self.vocab_size, "config.model.vocab_size", 1)
    schema.check_int(self.hidden_size, "config.model.hidden_size", 1)
    if "attention" in self.encoder:
      raise ValueError("The decoder takes its attention from "
                       "config.model.attention, not config.model.encoder."
                       "attention.")
    schema.check_unknown_fields(self.encoder, ENCODER_FIELDS,
                                "config.model.encoder")
    schema.check_unknown_fields(self.attention, ATTENTION_FIELDS,
                                "config.model.attention")
    if self.attention.get("causal", True) is not True:
      raise ValueError("config.model.attention.causal must be True for the "
                       f"decoder, got {self.attention['causal']!r}.")
    _check_attention(self.attention)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: Array, *, train: bool = False,
               step: Optional[Array] = None) -> tuple[Array, Metrics]:
    """Returns the next-token logits of every position.

    Args:
      tokens: int `[B, L]` ids in 0..V-1.
      train: whether dropout, drop path and router noise are active.
      step: the train step (router schedules); None: their end.

    Returns:
      `[B, L, V]` logits (position t: the distribution of token t + 1) and
      the encoder's metrics.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int ids of shape [B, L], got shape "
                       f"{tokens.shape} and dtype {tokens.dtype}.")
    x = nn.Embed(self.vocab_size, self.hidden_size,
                 embedding_init=nn.initializers.normal(stddev=0.02),
                 name="embedding")(tokens)
    x, metrics = transformer.Encoder(
        name="Transformer", **self.encoder,
        attention={**self.attention, "causal": True})(
            x, train=train, step=step)
    return nn.Dense(self.vocab_size, name="head")(x), metrics


def create_model(config: Any = None, **overrides) -> Decoder:
  """Builds the decoder from `config.model` (see the module docstring).

  Args:
    config: a dict or `ml_collections.ConfigDict`, or None.
    **overrides: top-level fields that replace those of `config`.

  Returns:
    The unbound `Decoder`; `encoder` fields not given take
    `DEFAULT_ENCODER`'s values.
  """
  fields = {**schema.to_dict(config, "config.model"), **overrides}
  fields.pop("name", None)
  schema.check_unknown_fields(fields,
                              ("name",) + schema.field_names(Decoder),
                              "config.model")
  if "vocab_size" not in fields:
    raise ValueError("config.model must set vocab_size.")
  encoder = {**DEFAULT_ENCODER, **(fields.get("encoder") or {})}
  if encoder.get("moe") is not None:
    schema.check_unknown_fields(
        encoder["moe"], ("layers",) + moe_layer.MOE_CONFIG_FIELDS,
        "config.model.encoder.moe")
  fields["encoder"] = flax.core.FrozenDict(encoder)
  fields["attention"] = flax.core.FrozenDict(fields.get("attention") or {})
  return Decoder(**fields)
