"""The generated addition dataset: content, vocabulary, split, iterators."""
import numpy as np
import pytest

from moe import data as data_lib
from moe.data import addition


def _reference_strings():
  """Every `ab+cd=` and its sum, from Python ints and string formatting."""
  return {f"{a:02d}+{b:02d}={a + b:05d}" for a in range(100)
          for b in range(100)}


def test_examples_are_exactly_all_pairs_with_correct_sums():
  tokens = addition.all_examples()
  assert tokens.shape == (10_000, addition.SEQUENCE_LENGTH) == (10_000, 11)
  assert tokens.dtype == np.int32
  texts = [addition.decode(row) for row in tokens]
  assert len(set(texts)) == 10_000
  assert set(texts) == _reference_strings()
  for text in texts:                  # Each sum checked by Python ints.
    question, answer = text.split("=")
    a, b = question.split("+")
    assert (len(a), len(b), len(answer)) == (2, 2, 5)
    assert int(a) + int(b) == int(answer)
  assert addition.decode(tokens[36 * 100 + 28]) == "36+28=00064"
  assert addition.decode(tokens[99 * 100 + 99]) == "99+99=00198"


def test_vocabulary_and_round_trip():
  assert addition.VOCAB == "0123456789+="
  assert addition.VOCAB_SIZE == 12
  assert (addition.PLUS, addition.EQUALS, addition.ANSWER_START) == (10, 11, 6)
  np.testing.assert_array_equal(addition.encode("36+28=00064"),
                                [3, 6, 10, 2, 8, 11, 0, 0, 0, 6, 4])
  for text in ("", "0", "+=", "99+99=00198", addition.VOCAB):
    assert addition.decode(addition.encode(text)) == text
  tokens = addition.all_examples()
  for row in tokens[::97]:
    np.testing.assert_array_equal(addition.encode(addition.decode(row)), row)


@pytest.mark.parametrize("text", ["36-28=00008", "3 6", "a"])
def test_encode_rejects_characters_outside_the_vocabulary(text):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    addition.encode(text)


def test_encode_and_decode_reject_bad_types():
  with pytest.raises(TypeError, match="encode takes a string"):
    addition.encode(36)
  with pytest.raises(ValueError, match=r"token ids must be in 0\.\.11"):
    addition.decode([3, 12])
  with pytest.raises(ValueError, match=r"token ids must be in 0\.\.11"):
    addition.decode([-1])
  with pytest.raises(ValueError, match="1-D sequence of int"):
    addition.decode(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="1-D sequence of int"):
    addition.decode([0.5])


def test_split_is_deterministic_disjoint_and_covering():
  rows = addition.split_rows(seed=3)
  again = addition.split_rows(seed=3)
  for name in addition.SPLITS:
    np.testing.assert_array_equal(rows[name], again[name])
  train, test = set(rows["train"].tolist()), set(rows["test"].tolist())
  assert (len(train), len(test)) == (8000, 2000)   # 20 % held out.
  assert not train & test
  assert train | test == set(range(10_000))
  np.testing.assert_array_equal(rows["all"], np.arange(10_000))
  for name in ("train", "test"):
    assert np.all(np.diff(rows[name]) > 0)


def test_different_seeds_and_fractions_give_different_splits():
  test_sets = [set(addition.split_rows(seed)["test"].tolist())
               for seed in (0, 1, 2)]
  assert len({frozenset(s) for s in test_sets}) == 3
  assert len(addition.split_rows(0, 0.1)["test"]) == 1000
  assert len(addition.split_rows(0, 0.5)["train"]) == 5000


def test_load_split_returns_the_rows_of_the_split():
  tokens = addition.all_examples()
  rows = addition.split_rows(seed=5, test_fraction=0.25)
  for name in addition.SPLITS:
    arrays = addition.load_split(name, seed=5, test_fraction=0.25)
    assert set(arrays) == {addition.TOKENS}
    np.testing.assert_array_equal(arrays[addition.TOKENS], tokens[rows[name]])


@pytest.mark.parametrize("seed, fraction, message", [
    (-1, 0.2, r"config\.task\.split_seed must be an int in \[0, 2\*\*32\)"),
    (2**32, 0.2, r"config\.task\.split_seed must be an int"),
    (1.5, 0.2, r"config\.task\.split_seed must be an int"),
    (0, 0.0, r"config\.task\.test_fraction must be a number in \(0, 1\)"),
    (0, 1.0, r"config\.task\.test_fraction must be a number in \(0, 1\)"),
    (0, 0.00001, r"round\(10000 \* test_fraction\), is in 1\.\.9999"),
    (0, float("nan"), r"config\.task\.test_fraction"),
    (0, "0.2", r"config\.task\.test_fraction"),
])
def test_bad_split_settings_raise_naming_the_field(seed, fraction, message):
  with pytest.raises(ValueError, match=message):
    addition.split_rows(seed, fraction, "config.task")


def test_unknown_split_is_an_error():
  with pytest.raises(ValueError, match="splits train, test, all; got 'val'"):
    addition.load_split("val")


def test_served_by_the_in_memory_data_layer():
  arrays = addition.load_split("train")
  stream = data_lib.ArrayTrainIterator(arrays, batch_size=64, seed=0)
  first = [next(stream)[addition.TOKENS] for _ in range(3)]
  state = stream.get_state()
  after = next(stream)[addition.TOKENS]
  resumed = data_lib.ArrayTrainIterator(arrays, batch_size=64, seed=0,
                                        state=state)
  np.testing.assert_array_equal(next(resumed)[addition.TOKENS], after)
  assert first[0].shape == (64, 11)
  evaluation = data_lib.ArrayEvalData(addition.load_split("test"),
                                      batch_size=512)
  batches = list(evaluation)
  assert evaluation.num_batches == len(batches) == 4
  real = np.concatenate([b[addition.TOKENS][b[data_lib.MASK_KEY]]
                         for b in batches])
  np.testing.assert_array_equal(real, addition.load_split("test")[
      addition.TOKENS])
