"""Typed config sections: parsing, the unknown-field check, value checks.

Every config section is described by a dataclass (a frozen dataclass of
`moe.config.experiment`, a task, or a flax module of `moe.nn`) whose fields
and defaults are the allowed config fields and their only defaults.
`parse_section` turns a ConfigDict (or a plain dict) into that dataclass, so
that a misspelt field is an error naming the allowed ones instead of a
silently ignored setting, and `section_defaults` turns the dataclass back
into a ConfigDict for `base_config()`. The helpers here import nothing from
the rest of `moe`, so every module can use them.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import flax.linen
import ml_collections
from ml_collections import config_dict
import numpy as np

T = TypeVar("T")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Attributes every flax module has that are not config fields.
_FLAX_MODULE_FIELDS = ("parent", "name")


def _config_dataclass_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of a dataclass that config sets (flax's parent, name: not)."""
  fields = dataclasses.fields(cls)
  if isinstance(cls, type) and issubclass(cls, flax.linen.Module):
    fields = [f for f in fields if f.name not in _FLAX_MODULE_FIELDS]
  return list(fields)


def to_dict(section: Any, field: str = "config section") -> dict[str, Any]:
  """Returns a section as a plain nested dict.

  Args:
    section: a ConfigDict, a mapping (e.g. a flax FrozenDict) or None (an
      empty section); nested mappings become dicts too.
    field: the section's dotted name, quoted in the error.

  Returns:
    A new dict.

  Raises:
    TypeError: if `section` is neither.
  """
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    section = section.to_dict()
  if not isinstance(section, Mapping):
    raise TypeError(f"{field} must be a ConfigDict or a dict, got "
                    f"{section!r}.")
  return {key: to_dict(value, f"{field}.{key}")
          if isinstance(value, (Mapping, ml_collections.ConfigDict)) else value
          for key, value in section.items()}


def field_names(cls: type) -> tuple[str, ...]:
  """Returns the config fields of a dataclass (flax's parent/name excluded)."""
  return tuple(f.name for f in _config_dataclass_fields(cls))


def required_fields(cls: type) -> tuple[str, ...]:
  """Returns the fields of a dataclass that have no default."""
  return tuple(f.name for f in _config_dataclass_fields(cls)
               if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING)


def check_unknown_fields(fields: Iterable[str], allowed: Sequence[str],
                         field: str) -> None:
  """Raises a ValueError naming the section if `fields` has unknown names.

  Args:
    fields: the names given in the config.
    allowed: the names the section accepts, in their documented order.
    field: the section's dotted name, e.g. 'config.optimizer'.
  """
  unknown = sorted(set(fields) - set(allowed))
  if unknown:
    raise ValueError(
        f"{field} has unknown field(s) {', '.join(unknown)}; allowed fields: "
        f"{', '.join(allowed) or 'none'}.")


def parse_section(cls: type[T], section: Any, field: str,
                  **values: Any) -> T:
  """Builds the dataclass `cls` from the config section `field`.

  A field whose type is itself a dataclass (e.g. `optimizer.schedule`) is
  parsed the same way, as the section `field.<name>`. A field given as None
  while `cls` requires it counts as missing, so that `base_config()` can
  hold required fields as typed placeholders.

  Args:
    cls: a dataclass whose fields are the allowed config fields.
    section: the ConfigDict (or dict, or None) given for the section, or an
      instance of `cls`, returned as it is.
    field: dotted name of the section (e.g. 'config.optimizer'), quoted in
      error messages.
    **values: fields the caller has parsed already, replacing those of
      `section`.

  Returns:
    An instance of `cls`; fields missing from `section` take their defaults.

  Raises:
    ValueError: if a section has a field its dataclass does not know, or
      lacks one without a default.
  """
  if isinstance(section, cls) and not values:
    return section
  given = {**to_dict(section, field), **values}
  check_unknown_fields(given, field_names(cls), field)
  required = required_fields(cls)
  for name, hint in typing.get_type_hints(cls).items():
    nested = _value_type(hint)
    if dataclasses.is_dataclass(nested) and (name in given
                                             or name in required):
      given[name] = parse_section(nested, given.get(name), f"{field}.{name}")
  missing = [name for name in required if given.get(name) is None]
  if missing:
    raise ValueError(f"{field} must set {', '.join(missing)}.")
  return cls(**given)


def field_defaults(cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
  """Returns field -> default of a dataclass; None where there is none."""
  defaults = {}
  for f in _config_dataclass_fields(cls):
    if f.name in exclude:
      continue
    if f.default_factory is not dataclasses.MISSING:
      defaults[f.name] = f.default_factory()
    else:
      defaults[f.name] = None if f.default is dataclasses.MISSING else f.default
  return defaults


def section_defaults(cls: type, exclude: Iterable[str] = (), **first: Any
                     ) -> ml_collections.ConfigDict:
  """Returns a ConfigDict of every field of `cls` at its default.

  A nested dataclass (a default instance, or the type of a required field)
  becomes a nested section; any other field that defaults to None or has no
  default becomes a typed placeholder (None that the command line can set,
  e.g. `--config.optimizer.learning_rate=0.1`).

  Args:
    cls: a dataclass of config fields.
    exclude: fields the config does not set (the caller passes them).
    **first: fields to put first, with their values (e.g. a model's `name`).

  Returns:
    The section.
  """
  hints = {**{name: type(value) for name, value in first.items()},
           **typing.get_type_hints(cls)}
  return as_section({**first, **field_defaults(cls, exclude)}, hints)


def as_section(values: Mapping[str, Any],
               hints: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Returns field values as a ConfigDict, None as a typed placeholder.

  Args:
    values: field -> value; a dataclass instance becomes a nested section.
    hints: field -> type annotation (`typing.get_type_hints` of the
      dataclass), which types the placeholders.

  Returns:
    The section.
  """
  section = ml_collections.ConfigDict()
  for name, value in values.items():
    if dataclasses.is_dataclass(value):
      value = as_section(
          {f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
          typing.get_type_hints(type(value)))
    elif isinstance(value, Mapping):
      value = ml_collections.ConfigDict(dict(value))
    elif value is None and dataclasses.is_dataclass(_value_type(hints[name])):
      value = section_defaults(_value_type(hints[name]))
    elif value is None:
      value = config_dict.placeholder(_value_type(hints[name]))
    section[name] = value
  return section


def _value_type(hint: Any) -> type:
  """The type of a placeholder: X of `X | None`, or X itself."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
  return typing.get_origin(hint) or hint


def check_choice(value: T, field: str, allowed: Sequence[Any]) -> T:
  """Returns `value` if it is one of `allowed`, else raises naming `field`."""
  if value not in allowed:
    raise ValueError(
        f"{field} must be one of {', '.join(repr(a) for a in allowed)}; "
        f"got {value!r}.")
  return value


def check_int(value: Any, field: str, minimum: int) -> None:
  """Raises a ValueError naming `field` unless `value` is an int >= minimum."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}.")


def check_number(value: Any, field: str, minimum: float = 0.0,
                 strict: bool = False,
                 maximum: float = FLOAT32_MAX) -> None:
  """Raises unless `value` is a finite number >= minimum (> when `strict`)
  and <= maximum (default: the largest float32, so that it stays finite on
  the device)."""
  is_number = (isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value))
  if (not is_number or value < minimum or (strict and value == minimum)
      or value > maximum):
    bound = ">" if strict else ">="
    upper = ("finite in float32 (<= 3.4e38)" if maximum == FLOAT32_MAX
             else f"<= {maximum}")
    raise ValueError(f"{field} must be a number {bound} {minimum}, "
                     f"{upper}; got {value!r}.")
