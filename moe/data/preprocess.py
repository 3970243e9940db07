"""Preprocessing given as a string of registered ops.

A preprocessing string is a `|`-separated chain of op calls, for example

    "decode|resize(32)|value_range(-1, 1)|onehot(10, key_result='labels')"

Each op is a registered factory called with Python-literal arguments (an op
without arguments may omit the parentheses). The factory returns a function
that maps a feature dict of `tf.Tensor`s (one example, inside `tf.data`) to a
new feature dict. Ops are applied left to right.

Random ops are deterministic: the pipeline puts a stateless seed (int64 [2])
under `RNG_KEY` in every example, derived from the run seed and the example's
identity, and each random op draws its seed with `take_seed`, which also
replaces the stored seed so that the next random op gets a fresh one. The
pipeline removes `RNG_KEY` after the last op.

Register a new op with

    @preprocess.register()
    def my_op(arg, key="image"):
      def fn(data):
        return {**data, key: ...}
      return fn
"""
from __future__ import annotations

import ast
from typing import Callable, Mapping

import tensorflow as tf

Features = dict[str, tf.Tensor]
Op = Callable[[Features], Features]
OpFactory = Callable[..., Op]

RNG_KEY = "_rng"
_OPS: dict[str, OpFactory] = {}


def register(name: str | None = None) -> Callable[[OpFactory], OpFactory]:
  """Returns a decorator that registers an op factory under `name`.

  Args:
    name: the name used in preprocessing strings; defaults to the factory's
      `__name__`.

  Returns:
    A decorator that registers the factory and returns it unchanged.
  """

  def decorator(factory: OpFactory) -> OpFactory:
    op_name = name or factory.__name__
    if op_name in _OPS:
      raise ValueError(f"A preprocessing op named {op_name!r} is already "
                       f"registered ({_OPS[op_name].__module__}).")
    _OPS[op_name] = factory
    return factory

  return decorator


def registered_ops() -> list[str]:
  """Returns the names of all registered ops, sorted."""
  return sorted(_OPS)


def _literal(node: ast.AST, op_text: str):
  try:
    return ast.literal_eval(node)
  except ValueError as e:
    raise ValueError(f"Arguments of preprocessing op {op_text!r} must be "
                     f"Python literals.") from e


def parse_op(op_text: str) -> Op:
  """Returns the op function for one call such as `resize(32)`.

  Args:
    op_text: `name` or `name(args...)` with Python-literal arguments.

  Returns:
    The function `Features -> Features` that the registered factory builds.

  Raises:
    ValueError: on a syntax error, an unknown op or arguments the op rejects.
  """
  try:
    expr = ast.parse(op_text.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse preprocessing op {op_text!r}.") from e
  call = expr if isinstance(expr, ast.Call) else ast.Call(expr, [], [])
  if not isinstance(call.func, ast.Name):
    raise ValueError(f"Cannot parse preprocessing op {op_text!r}: expected "
                     f"`name` or `name(args...)`.")
  name = call.func.id
  if name not in _OPS:
    raise ValueError(f"Unknown preprocessing op {name!r} in {op_text!r}. "
                     f"Registered ops: {', '.join(registered_ops())}.")
  args = [_literal(arg, op_text) for arg in call.args]
  kwargs = {kw.arg: _literal(kw.value, op_text) for kw in call.keywords}
  try:
    return _OPS[name](*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for preprocessing op {op_text!r}: "
                     f"{e}") from e


def get_preprocess_fn(pp: str) -> Op:
  """Returns the function that applies the ops of a preprocessing string.

  Args:
    pp: ops separated by `|`; an empty string means no preprocessing.

  Returns:
    A function `Features -> Features` applying the ops left to right.

  Raises:
    ValueError: if an op is unknown or malformed (raised here, not when the
      function runs).
  """
  ops = [parse_op(text) for text in pp.split("|") if text.strip()]

  def preprocess(data: Features) -> Features:
    for op in ops:
      data = op(data)
    return data

  return preprocess


def example_seed(seed: int, *data: tf.Tensor) -> tf.Tensor:
  """Returns the stateless seed of one example.

  Args:
    seed: the run's data seed.
    *data: integer scalars that identify the example (e.g. process, epoch,
      example index), folded into the seed in order.

  Returns:
    int64 [2], usable as the `seed` of `tf.random.stateless_*` ops.
  """
  rng = tf.constant([seed, 0], tf.int64)
  for value in data:
    rng = tf.random.experimental.stateless_fold_in(rng, tf.cast(value,
                                                                tf.int64))
  return rng


def take_seed(data: Features) -> tuple[tf.Tensor, Features]:
  """Returns a seed for one random op and the features with a fresh seed.

  Args:
    data: features holding a stateless seed under `RNG_KEY`.

  Returns:
    (int64 [2] seed for this op, features whose `RNG_KEY` seed is new).

  Raises:
    KeyError: if `data` holds no seed (a random op outside the pipeline).
  """
  if RNG_KEY not in data:
    raise KeyError(f"Random preprocessing ops need a seed under {RNG_KEY!r}; "
                   f"apply them with `apply_seeded`.")
  op_seed, next_seed = tf.unstack(
      tf.random.experimental.stateless_split(data[RNG_KEY], 2))
  return op_seed, {**data, RNG_KEY: next_seed}


def apply_seeded(preprocess: Op, data: Mapping[str, tf.Tensor],
                 rng: tf.Tensor) -> Features:
  """Applies `preprocess` to one example with random ops seeded by `rng`.

  Args:
    preprocess: a function from `get_preprocess_fn`.
    data: the decoded features of one example.
    rng: int64 [2] stateless seed of the example (see `example_seed`).

  Returns:
    The preprocessed features, without `RNG_KEY`.
  """
  result = preprocess({**data, RNG_KEY: rng})
  return {k: v for k, v in result.items() if k != RNG_KEY}
