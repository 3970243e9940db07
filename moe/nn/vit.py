"""Vision Transformer (ViT) and V-MoE, built from `config.model`.

Shapes: B batch, (h, w) image size, L tokens, D width, H MLP hidden width.

Parameter names follow the public ViT checkpoints, so that fine-tuning maps
`.npz` files onto them:

  embedding/{kernel [ph, pw, channels, D], bias [D]}
  cls                            [1, 1, D]   (classifier "token" only)
  Transformer/...                see `moe.nn.transformer`
  MAPHead_0/...                  (classifier "map" only, big_vision's names)
    probe                        [1, 1, D]
    MultiHeadDotProductAttention_0/{query,key,value,out}/...
    LayerNorm_0/{scale, bias}    [D]
    MlpBlock_0/Dense_{0,1}/...   [D, H], [H, D]
  pre_logits/{kernel, bias}      (only with a representation_size)
  head/{kernel [D, classes], bias [classes]}

A V-MoE is the same model where `encoder.moe` replaces the MLP of some
blocks by a `moe.nn.moe_layer.MoeMlpBlock`.

Config (`config.model`, a dict or `ml_collections.ConfigDict`):

  name: "vit" (the key in `moe.nn.models`; ignored here).
  variant: optional "<size>/<patch>", e.g. "S/16", "B/32", "tiny/4"; sizes
    are the keys of `VARIANTS`. It sets hidden_size, patch_size and
    encoder.{num_layers, mlp_dim, num_heads}; fields given explicitly win.
  num_classes: number of classes.
  patch_size: int or (ph, pw).
  hidden_size: D.
  classifier: "token" (class token), "gap" (global average pooling) or
    "map" (multi-head attention pooling: a learned probe attends over the
    encoded tokens, then a residual MLP, as big_vision's `pool_type="map"`).
  representation_size: None, or the width of a tanh pre-logits layer.
  head_zeroinit: zero-initialise the head kernel.
  encoder: attributes of `moe.nn.transformer.Encoder`: num_layers, mlp_dim,
    num_heads, dropout_rate, attention_dropout_rate, stochastic_depth, and
    moe (None for a dense ViT), itself with
      layers: tuple of block indices, or "every_2", "last_2" (any N).
      num_experts: E.
      num_selected_experts: K.
      group_size: S tokens per group (None: one image's tokens).
      dispatcher: "einsum" or "index".
      dtype: expert computation dtype, e.g. "bfloat16".
      router: name ("NoisyTopExpertsPerItem", "TopItemsPerExpert",
        "SparseTopK") and that router's attributes (capacity_factor,
        eval_capacity_factor, min_capacity, noise_std, ...), see
        `moe.nn.routers`.
    attention: None (dense attention, flax's module), or the attributes of
      `moe.nn.attention.SelfAttention` other than num_heads and
      dropout_rate: sparsity ("dense", "gated", "sparse_topk",
      "hard_topk"), causal, keys_per_query, regularization, p,
      gate_estimator, gate_temperature, gate_bias_init, dtype. Same
      parameter names; its metrics are `encoderblock_N/attention/<name>`.

The model is called as `model.apply(variables, images, train=...)` with
images `[B, h, w, channels]` and returns `(logits [B, num_classes],
metrics)`; `metrics["auxiliary_loss"]` sums the MoE layers' auxiliary losses
(the trainer weights it). At train time it needs the rngs "dropout" and,
with noisy routers, "gating". The representation the head reads (`[B, D]`,
or `[B, representation_size]`) is sown as `intermediates/representation`:
`model.apply(variables, images, mutable=["intermediates"])` returns it
(the frozen embeddings of `moe.train.smec_task`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import schema
from moe.nn import attention
from moe.nn import blocks
from moe.nn import moe_layer
from moe.nn import transformer

Array = jax.Array
Metrics = dict[str, Array]

# name: (hidden_size D, num_layers, mlp_dim H, num_heads). "mu" and "tiny"
# are for tests and laptops.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "tiny": (32, 2, 64, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
CLASSIFIERS = ("token", "gap", "map")
# Name of the sown representation (`intermediates/representation`).
REPRESENTATION = "representation"


def decode_variant(variant: str) -> dict[str, Any]:
  """Returns the config fields of a variant name such as "S/16".

  Args:
    variant: "<size>/<patch size>", size a key of `VARIANTS`.

  Returns:
    `{"hidden_size", "patch_size", "encoder": {"num_layers", "mlp_dim",
    "num_heads"}}`.
  """
  match = re.fullmatch(r"([A-Za-z]+)/([1-9][0-9]*)", str(variant))
  if match is None or match.group(1) not in VARIANTS:
    raise ValueError(f"variant must be '<size>/<patch size>' with size one of "
                     f"{list(VARIANTS)} (e.g. 'S/16', 'B/32'), got "
                     f"{variant!r}.")
  width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
  patch = int(match.group(2))
  return dict(hidden_size=width, patch_size=(patch, patch),
              encoder=dict(num_layers=depth, mlp_dim=mlp_dim,
                           num_heads=num_heads))


class MapHead(nn.Module):
  """Multi-head attention pooling: `[B, L, D]` tokens -> `[B, D]`.

  A learned probe `[1, 1, D]` attends over the tokens; the result `y` is
  `y + Mlp(LN(y))` (big_vision's `MAPHead`, with its parameter names).

  Attributes:
    mlp_dim: hidden width H of the MLP.
    num_heads: attention heads; must divide D.
  """
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Pools `[B, L, D]` tokens into `[B, D]`."""
    batch, _, width = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(),
                       (1, 1, width))
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        name="MultiHeadDotProductAttention_0")(
            jnp.tile(probe, (batch, 1, 1)), x)
    y = y + blocks.MlpBlock(self.mlp_dim, name="MlpBlock_0")(
        nn.LayerNorm(name="LayerNorm_0")(y))
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT, or V-MoE when `encoder["moe"]` is set.

  Attributes:
    num_classes: number of output classes.
    patch_size: (ph, pw), or an int for square patches.
    hidden_size: D.
    encoder: attributes of `moe.nn.transformer.Encoder`.
    classifier: "token", "gap" or "map".
    representation_size: width of a tanh pre-logits layer, or None.
    head_zeroinit: zero-initialise the head kernel (the ViT recipe).
  """
  num_classes: int
  patch_size: Union[int, Sequence[int]]
  hidden_size: int
  encoder: Mapping[str, Any]
  classifier: str = "token"
  representation_size: Optional[int] = None
  head_zeroinit: bool = True

  def __post_init__(self):
    schema.check_choice(self.classifier, "classifier", CLASSIFIERS)
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be an int >= 1, got "
                       f"{self.num_classes!r}.")
    super().__post_init__()

  @property
  def patch_shape(self) -> tuple[int, int]:
    if isinstance(self.patch_size, int):
      return (self.patch_size, self.patch_size)
    return tuple(self.patch_size)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               step: Optional[Array] = None) -> tuple[Array, Metrics]:
    """Classifies images.

    Args:
      images: `[B, h, w, channels]`; h and w multiples of the patch size.
      train: whether dropout, drop path and router noise are active.
      step: the train step, for router schedules (`moe.nn.routers`); None:
        their end values.

    Returns:
      `[B, num_classes]` logits and the encoder metrics (see
      `moe.nn.transformer.Encoder`).
    """
    if images.ndim != 4:
      raise ValueError(f"images must have shape [B, h, w, channels], got "
                       f"shape {images.shape}.")
    patch = self.patch_shape
    if images.shape[1] % patch[0] or images.shape[2] % patch[1]:
      raise ValueError(f"patch_size {patch} must divide the image size "
                       f"{images.shape[1:3]}.")
    x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID",
                name="embedding")(images)
    x = x.reshape(x.shape[0], -1, self.hidden_size)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
      x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)

    x, metrics = transformer.Encoder(name="Transformer", **self.encoder)(
        x, train=train, step=step)
    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = MapHead(self.encoder["mlp_dim"], self.encoder["num_heads"],
                  name="MAPHead_0")(x)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    self.sow("intermediates", REPRESENTATION, x)
    head_init = (nn.initializers.zeros if self.head_zeroinit
                 else nn.initializers.lecun_normal())
    logits = nn.Dense(self.num_classes, kernel_init=head_init, name="head")(x)
    return logits, metrics


def create_model(config: Any = None, **overrides) -> VisionTransformer:
  """Builds a ViT / V-MoE from `config.model` (see the module docstring).

  Args:
    config: a dict or `ml_collections.ConfigDict`, or None.
    **overrides: top-level fields that replace those of `config`.

  Returns:
    The unbound `VisionTransformer`.
  """
  fields = {**schema.to_dict(config, "config.model"), **overrides}
  fields.pop("name", None)
  variant = fields.pop("variant", None)
  if variant is not None:
    defaults = decode_variant(variant)
    encoder = {**defaults.pop("encoder"), **fields.get("encoder", {})}
    fields = {**defaults, **fields, "encoder": encoder}
  schema.check_unknown_fields(
      fields, ("name", "variant") + schema.field_names(VisionTransformer),
      "config.model")
  encoder = dict(fields.get("encoder", {}))
  schema.check_unknown_fields(encoder, schema.field_names(transformer.Encoder),
                              "config.model.encoder")
  if encoder.get("moe") is not None:
    schema.check_unknown_fields(
        encoder["moe"], ("layers",) + moe_layer.MOE_CONFIG_FIELDS,
        "config.model.encoder.moe")
  if encoder.get("attention") is not None:
    schema.check_unknown_fields(
        encoder["attention"], attention.ATTENTION_CONFIG_FIELDS,
        "config.model.encoder.attention")
  return VisionTransformer(**fields)
