"""The embedded addition dataset: every `ab+cd=` with its 5-digit sum.

Generated, not read: the 10,000 pairs (a, b) with a, b in 0..99, each
written as the 11 characters `f"{a:02d}+{b:02d}={a + b:05d}"`, e.g.
"36+28=00064" (operands as 2 digits, the sum zero-padded to 5 digits, most
significant digit first, not reversed).

Vocabulary (`VOCAB`, V = 12 tokens; id = position in the string):

  "0".."9"  ids 0..9 (a digit's id is its value)
  "+"       id 10
  "="       id 11

No padding, start or end token is needed: every sequence has the same
length 11 and a model never predicts the first token. Token layout of a row
(`SEQUENCE_LENGTH` = 11):

  positions 0-1  a        position 2  "+"    positions 3-4  b
  position 5     "="      positions 6-10  the answer a + b (5 digits)

Rows: row `a * 100 + b` holds the pair (a, b) (`all_examples`).

Splits (`split_rows`): the 10,000 rows are permuted by
`np.random.RandomState(seed).permutation` (a stream numpy keeps frozen
across versions); the first `round(10_000 * test_fraction)` rows of the
permutation are "test" (held out; default 20 %, 2,000 pairs), the others
"train"; each split is sorted by row. Same seed, same split; "all" is every
row. The task (`moe.train.sequence_task`) serves them through
`moe.data.ArrayTrainIterator` and `ArrayEvalData`, the data layer's
in-memory path (resumable, per-process).

Shapes: N rows, L = 11 tokens.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VOCAB = "0123456789+="
VOCAB_SIZE = len(VOCAB)
PLUS = VOCAB.index("+")
EQUALS = VOCAB.index("=")
OPERAND_DIGITS = 2
ANSWER_DIGITS = 5
SEQUENCE_LENGTH = 2 * OPERAND_DIGITS + 2 + ANSWER_DIGITS
# Position of the first answer token (the one after "=").
ANSWER_START = SEQUENCE_LENGTH - ANSWER_DIGITS
NUM_PAIRS = (10 ** OPERAND_DIGITS) ** 2
TOKENS = "tokens"
SPLITS = ("train", "test", "all")
DEFAULT_TEST_FRACTION = 0.2
_ID = {char: index for index, char in enumerate(VOCAB)}


def encode(text: str) -> np.ndarray:
  """Returns the token ids of `text`.

  Args:
    text: characters of `VOCAB`, e.g. "36+28=00064".

  Returns:
    int32 `[len(text)]`.

  Raises:
    TypeError: if `text` is not a string.
    ValueError: for a character outside the vocabulary.
  """
  if not isinstance(text, str):
    raise TypeError(f"encode takes a string, got {text!r}.")
  unknown = sorted(set(text) - set(VOCAB))
  if unknown:
    raise ValueError(f"encode: {text!r} has character(s) {unknown} outside "
                     f"the vocabulary {VOCAB!r}.")
  return np.asarray([_ID[char] for char in text], np.int32)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Returns the text of token ids: the inverse of `encode`.

  Args:
    tokens: int `[L]`, ids in 0..V-1.

  Returns:
    The string of L characters.

  Raises:
    ValueError: for an array that is not 1-D integers in 0..V-1.
  """
  ids = np.asarray(tokens)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"decode takes a 1-D sequence of int token ids, got "
                     f"shape {ids.shape} and dtype {ids.dtype}.")
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"decode: token ids must be in 0..{VOCAB_SIZE - 1}, got "
                     f"{ids.tolist()}.")
  return "".join(VOCAB[i] for i in ids.tolist())


def _digits(values: np.ndarray, width: int) -> np.ndarray:
  """The `width` decimal digits `[N, width]` of `values` `[N]`, most
  significant first."""
  powers = 10 ** np.arange(width - 1, -1, -1)
  return (values[:, None] // powers) % 10


def all_examples() -> np.ndarray:
  """Returns every pair as tokens: int32 `[10_000, 11]`, row a * 100 + b."""
  a, b = np.divmod(np.arange(NUM_PAIRS), 10 ** OPERAND_DIGITS)
  column = np.ones((NUM_PAIRS, 1), np.int64)
  return np.concatenate([
      _digits(a, OPERAND_DIGITS), PLUS * column, _digits(b, OPERAND_DIGITS),
      EQUALS * column, _digits(a + b, ANSWER_DIGITS)], axis=1).astype(np.int32)


def check_split(seed: int, test_fraction: float, field: str) -> int:
  """Checks the split's seed and held-out fraction; returns the test size.

  Args:
    seed: int in [0, 2**32).
    test_fraction: in (0, 1), such that both splits have a row.
    field: the config section holding them, e.g. "config.task", named as
      `<field>.split_seed` and `<field>.test_fraction` in errors.

  Returns:
    `round(10_000 * test_fraction)`, the number of test rows.

  Raises:
    ValueError: naming the field and the allowed range.
  """
  if (not isinstance(seed, int) or isinstance(seed, bool)
      or not 0 <= seed < 2**32):
    raise ValueError(f"{field}.split_seed must be an int in [0, 2**32), got "
                     f"{seed!r}.")
  is_number = (isinstance(test_fraction, (int, float))
               and not isinstance(test_fraction, bool)
               and math.isfinite(test_fraction))
  num_test = round(NUM_PAIRS * test_fraction) if is_number else 0
  if not 0 < num_test < NUM_PAIRS:
    raise ValueError(
        f"{field}.test_fraction must be a number in (0, 1) whose share of "
        f"the {NUM_PAIRS} pairs, round({NUM_PAIRS} * test_fraction), is in "
        f"1..{NUM_PAIRS - 1}; got {test_fraction!r}.")
  return num_test


def split_rows(seed: int = 0,
               test_fraction: float = DEFAULT_TEST_FRACTION,
               field: str = "addition") -> dict[str, np.ndarray]:
  """Returns the rows of each split (module docstring).

  Args:
    seed: the split's seed, in [0, 2**32).
    test_fraction: the held-out fraction, in (0, 1).
    field: the config section of the two, for errors (`check_split`).

  Returns:
    {"train": int64 `[N_train]`, "test": int64 `[N_test]`, "all": int64
    `[10_000]`}, each sorted; train and test are disjoint and cover all.
  """
  num_test = check_split(seed, test_fraction, field)
  order = np.random.RandomState(seed).permutation(NUM_PAIRS)
  return {"train": np.sort(order[num_test:]),
          "test": np.sort(order[:num_test]),
          "all": np.arange(NUM_PAIRS)}


def load_split(split: str, *, seed: int = 0,
               test_fraction: float = DEFAULT_TEST_FRACTION,
               field: str = "addition") -> dict[str, np.ndarray]:
  """Returns a split as arrays for `ArrayTrainIterator` / `ArrayEvalData`.

  Args:
    split: "train", "test" or "all".
    seed: the split's seed.
    test_fraction: the held-out fraction.
    field: the config section of the two, for errors.

  Returns:
    {`TOKENS`: int32 `[N, 11]`}, rows in increasing order.
  """
  if split not in SPLITS:
    raise ValueError(f"The addition dataset has splits {', '.join(SPLITS)}; "
                     f"got {split!r}.")
  rows = split_rows(seed, test_fraction, field)[split]
  return {TOKENS: all_examples()[rows]}
