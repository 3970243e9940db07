"""Helpers to turn config sections into module keyword arguments."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


def to_dict(config: Any) -> dict[str, Any]:
  """Returns a plain nested dict of a mapping or `ml_collections.ConfigDict`."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return {key: to_dict(value) if _is_mapping(value) else value
          for key, value in dict(config).items()}


def _is_mapping(value: Any) -> bool:
  return isinstance(value, Mapping) or hasattr(value, "to_dict")


def field_names(cls: type) -> set[str]:
  """Returns the attribute names of a flax module class (a dataclass)."""
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def check_fields(cls: type, fields: Iterable[str], where: str,
                 exclude: Iterable[str] = ()) -> None:
  """Raises a ValueError if `fields` holds a name `cls` does not accept.

  Args:
    cls: a dataclass (e.g. a flax module class).
    fields: the config keys meant as its attributes.
    where: the config path of the section, used in the message
      (e.g. "model.encoder").
    exclude: attributes that the caller sets itself and config may not.
  """
  allowed = field_names(cls) - set(exclude)
  unknown = sorted(set(fields) - allowed)
  if unknown:
    raise ValueError(f"{where}.{unknown[0]} is not a field of "
                     f"{cls.__name__}; allowed fields: {sorted(allowed)}.")
