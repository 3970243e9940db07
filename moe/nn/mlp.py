"""A multilayer perceptron classifier (LeNet-300-100 and the like).

Shapes: B batch; inputs of any shape `[B, ...]` are flattened to `[B, F]`.

Parameters: `Dense_0, ..., Dense_{n-1}` for the hidden layers (ReLU) and
`head` for the logits, each `{kernel [in, out], bias [out]}`.

Config (`config.model`): name "mlp", `hidden_sizes` (e.g. (300, 100), the
LeNet-300-100 of LeCun et al. 1998 on 784 MNIST pixels), `num_classes`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import schema


class Mlp(nn.Module):
  """Flatten, ReLU hidden layers, linear head.

  Attributes:
    num_classes: C.
    hidden_sizes: widths of the hidden layers.
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (300, 100)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False,
               step: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns `(logits [B, C], metrics)`; metrics hold `auxiliary_loss` 0."""
    del train, step  # No dropout, no schedules.
    x = inputs.reshape(inputs.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"Dense_{i}")(x))
    logits = nn.Dense(self.num_classes, name="head")(x)
    return logits, {"auxiliary_loss": jnp.zeros((), jnp.float32)}


def create_model(config: Any = None) -> Mlp:
  """Builds an `Mlp` from `config.model` (see the module docstring)."""
  fields = schema.to_dict(config, "config.model")
  fields.pop("name", None)
  schema.check_unknown_fields(fields, schema.field_names(Mlp),
                              "config.model")
  return Mlp(**fields)
