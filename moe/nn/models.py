"""Model registry: builds a model from `config.model` by its `name`."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from moe.config import schema
from moe.nn import decoder
from moe.nn import mlp
from moe.nn import vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit": vit.create_model,
    "mlp": mlp.create_model,
    "decoder": decoder.create_model,
}


def build_model(config: Any) -> nn.Module:
  """Returns the model `config.name` built from `config`.

  Args:
    config: `config.model`; `name` is a key of `MODELS` ("vit" covers ViT
      and V-MoE), the other fields are those of that model's constructor
      (for "vit" see `moe.nn.vit`, for "mlp" `moe.nn.mlp`, for "decoder",
      the causal token model, `moe.nn.decoder`).

  Returns:
    An unbound flax module whose `apply(variables, inputs, train=...)` returns
    `(logits, metrics)`.
  """
  fields = schema.to_dict(config, "config.model")
  schema.check_choice(fields.get("name"), "config.model.name", tuple(MODELS))
  return MODELS[fields["name"]](fields)
