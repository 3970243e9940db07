"""Model registry: builds a model from `config.model` by its `name`."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from moe.nn import config_util
from moe.nn import vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit": vit.create_model,
}


def build_model(config: Any) -> nn.Module:
  """Returns the model `config.name` built from `config`.

  Args:
    config: `config.model`; `name` is a key of `MODELS` ("vit" covers ViT
      and V-MoE), the other fields are those of that model's constructor
      (for "vit" see `moe.nn.vit`).

  Returns:
    An unbound flax module whose `apply(variables, inputs, train=...)` returns
    `(logits, metrics)`.
  """
  fields = config_util.to_dict(config)
  name = fields.get("name")
  if name not in MODELS:
    raise ValueError(f"model.name must be one of {sorted(MODELS)}, got "
                     f"{name!r}.")
  return MODELS[name](fields)
