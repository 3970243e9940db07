"""Typed views of `ml_collections.ConfigDict` sections.

Each `moe.train` module describes its config section as a frozen dataclass
whose fields and defaults are the allowed config fields. `parse_section`
turns a ConfigDict (or a plain dict) into that dataclass, so that a misspelt
field is an error naming the allowed ones instead of a silently ignored
setting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, TypeVar

import ml_collections

T = TypeVar("T")


def section_to_dict(section: Any) -> dict[str, Any]:
  """Returns a ConfigDict, a mapping or None (empty section) as a plain dict."""
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ValueError(f"expected a ConfigDict or a dict, got {section!r}.")


def parse_section(cls: type[T], section: Any, field: str) -> T:
  """Builds the dataclass `cls` from the config section `field`.

  Args:
    cls: a dataclass whose fields are the allowed config fields.
    section: the ConfigDict (or dict) given for the section.
    field: dotted name of the section (e.g. 'config.optimizer'), quoted in
      error messages.

  Returns:
    An instance of `cls`; fields missing from `section` take their defaults.

  Raises:
    ValueError: if `section` has a field `cls` does not know, or lacks one
      without a default.
  """
  values = section_to_dict(section)
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ValueError(
        f"{field} has unknown field(s) {', '.join(unknown)}; allowed fields: "
        f"{', '.join(allowed)}.")
  required = [f.name for f in dataclasses.fields(cls)
              if f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING]
  missing = [name for name in required if name not in values]
  if missing:
    raise ValueError(f"{field} must set {', '.join(missing)}.")
  return cls(**values)


def check_choice(value: Any, field: str, allowed: Sequence[str]) -> None:
  """Raises a ValueError naming `field` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(
        f"{field} must be one of {', '.join(repr(a) for a in allowed)}; "
        f"got {value!r}.")


def check_int(value: Any, field: str, minimum: int) -> None:
  """Raises a ValueError naming `field` unless `value` is an int >= minimum."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}.")


def check_number(value: Any, field: str, minimum: float = 0.0,
                 strict: bool = False) -> None:
  """Raises unless `value` is a number >= minimum (> minimum when `strict`)."""
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not is_number or value < minimum or (strict and value == minimum):
    bound = ">" if strict else ">="
    raise ValueError(f"{field} must be a number {bound} {minimum}, got "
                     f"{value!r}.")
