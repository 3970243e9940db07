"""Names of pytree leaves, and regex rules matched against them.

A leaf is named by joining, with '/', the keys on the way from the root of the
tree to the leaf: 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' for a
Flax parameter, 'inner_state/0/mu/head/kernel' for an optimizer-state leaf.
Trees are the parameter collection itself (`variables['params']`), so names
do not start with 'params/'.

Every regex of the experiment config (frozen parameters, learning-rate
multipliers, weight-decay masks, partition rules, `init_from` rules) is
matched against such a name with `re.fullmatch`: 'head/.*' selects the whole
head, 'head' selects nothing but a top-level leaf called 'head', and '.*/bias'
every bias. A regex that selects nothing is an error naming it and its
config field (`check_every_pattern_matches`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax

PyTree = Any


def key_to_str(key) -> str:
  """Returns one entry of a `jax.tree_util` key path as a plain string."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_to_name(path: Sequence[Any]) -> str:
  """Returns the '/'-joined name of a `jax.tree_util` key path."""
  return "/".join(key_to_str(key) for key in path)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """Returns the (name, leaf) pairs of `tree` in flattening order."""
  leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_to_name(path), leaf) for path, leaf in leaves_with_paths]


def map_with_names(fn: Callable[..., Any], tree: PyTree,
                   *rest: PyTree) -> PyTree:
  """Like `jax.tree.map`, but calls fn(name, *leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, *leaves: fn(path_to_name(path), *leaves), tree, *rest)


def compile_regexes(regexes: Iterable[str], field: str) -> list[re.Pattern]:
  """Compiles `regexes`, or raises a ValueError naming the config `field`."""
  if isinstance(regexes, str):
    raise ValueError(
        f"{field} must be a list of regexes, got the single string "
        f"{regexes!r}; write ({regexes!r},) instead.")
  patterns = []
  for regex in regexes:
    if not isinstance(regex, str):
      raise ValueError(f"{field} must contain regex strings, got {regex!r}.")
    try:
      patterns.append(re.compile(regex))
    except re.error as e:
      raise ValueError(f"{field}: invalid regex {regex!r}: {e}.") from e
  return patterns


def compile_rules(rules: Iterable[Sequence[Any]],
                  field: str) -> list[tuple[re.Pattern, Any]]:
  """Compiles ordered (regex, value) rules, or raises naming `field`."""
  if isinstance(rules, str):
    raise ValueError(f"{field} must be a list of (regex, value) pairs, got "
                     f"the string {rules!r}.")
  pairs = []
  for rule in rules:
    if (isinstance(rule, str) or not isinstance(rule, Sequence)
        or len(rule) != 2):
      raise ValueError(
          f"{field} must be a list of (regex, value) pairs, got the entry "
          f"{rule!r}.")
    regex, value = rule
    (pattern,) = compile_regexes([regex], field)
    pairs.append((pattern, value))
  return pairs


def matches_any(patterns: Sequence[re.Pattern], name: str) -> bool:
  """Whether `name` fully matches one of `patterns`."""
  return any(pattern.fullmatch(name) for pattern in patterns)


def first_matching_rule(rules: Sequence[tuple[re.Pattern, Any]],
                        name: str) -> tuple[re.Pattern, Any] | None:
  """Returns the first (pattern, value) rule fully matching `name`, or None."""
  for pattern, value in rules:
    if pattern.fullmatch(name):
      return pattern, value
  return None


def check_every_pattern_matches(patterns: Sequence[re.Pattern],
                                names: Sequence[str], field: str,
                                what: str = "parameter") -> None:
  """Raises a ValueError if a pattern of the config `field` matches no name.

  A regex that selects nothing is almost always a typo (a frozen layer that
  keeps training, a learning-rate multiplier that is never applied), so it is
  an error rather than a no-op.

  Args:
    patterns: compiled regexes from the config field.
    names: the names they are meant to select.
    field: config field the regexes come from, quoted in the error.
    what: what the names are, quoted in the error.
  """
  for pattern in patterns:
    if not any(pattern.fullmatch(name) for name in names):
      examples = ", ".join(repr(name) for name in list(names)[:5])
      raise ValueError(
          f"{field}: regex {pattern.pattern!r} matches no {what} (matching "
          f"uses re.fullmatch on '/'-joined names such as {examples}).")
