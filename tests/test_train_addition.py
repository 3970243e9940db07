"""The causal decoder and the addition task through the trainer.

The runs are configs/addition.py:runlocal (a 2-block D=32 decoder, 20
steps of 64 rows, evaluation on the 2,000 held-out pairs at steps 10, 20).
"""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.data import addition
from moe.nn import models
from moe.train import sequence_task
from moe.train import tasks
from moe.train import trainer
import train_testing

PREEMPT_AT = 12
TINY = {"name": "decoder", "vocab_size": 12, "hidden_size": 16,
        "encoder": {"num_layers": 2, "mlp_dim": 32, "num_heads": 2}}


def _config(*overrides):
  return train_testing.load_config("addition.py:runlocal", *overrides)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, eight_devices):
  workdir = tmp_path_factory.mktemp("addition")
  return trainer.train_and_evaluate(_config(), str(workdir)), workdir


def test_decoder_defaults_and_shapes():
  model = models.build_model({"name": "decoder", "vocab_size": 12})
  tokens = jnp.zeros((3, 10), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  blocks = [name for name in params["Transformer"] if "block" in name]
  block = params["Transformer"]["encoderblock_0"]
  assert len(blocks) == 4
  assert params["embedding"]["embedding"].shape == (12, 128)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, 10, 128)
  assert block["MlpBlock_3"]["Dense_0"]["kernel"].shape == (128, 512)
  assert block["MultiHeadDotProductAttention_1"]["query"]["kernel"].shape == (
      128, 4, 32)
  assert params["head"]["kernel"].shape == (128, 12)
  (logits, metrics) = jax.eval_shape(
      lambda p: model.apply({"params": p}, tokens), params)
  assert logits.shape == (3, 10, 12)
  assert metrics["encoderblock_3/attention/edge_fraction"].shape == (4,)
  assert metrics["auxiliary_loss"].shape == ()


@pytest.mark.parametrize("sparsity", ["dense", "sparse_topk", "hard_topk",
                                      "gated"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(sparsity):
  model = models.build_model({**TINY, "attention": {
      "sparsity": sparsity, "keys_per_query": 3}})
  tokens = jnp.asarray(addition.all_examples()[[3628, 517, 9999], :-1])
  params = model.init(jax.random.key(1), tokens)["params"]
  apply = jax.jit(lambda x: model.apply({"params": params}, x)[0])
  logits = apply(tokens)
  for t in (3, 7, 9):
    other = apply(tokens.at[:, t].set((tokens[:, t] + 5) % 12))
    np.testing.assert_array_equal(other[:, :t], logits[:, :t])
    # Position t sees its own token; later ones may skip it when sparse.
    later = slice(t, None) if sparsity == "dense" else t
    assert np.all(np.any(other[:, later] != logits[:, later], axis=-1)), t


def test_decoder_rejects_bad_tokens():
  model = models.build_model(TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens must be int ids of shape "
                     r"\[B, L\]"):
    model.apply(params, jnp.zeros((1, 10), jnp.float32))


def test_answer_scores_count_only_the_answer():
  tokens = jnp.asarray(addition.all_examples()[[3628, 9999]])
  logits = jax.nn.one_hot(tokens[:, 1:], 12) * 10.0       # [2, 10, 12]
  logits = logits.at[:, :5].set(0.0)                     # Question: ignored.
  logits = logits.at[1, 7].set(jax.nn.one_hot(0, 12) * 10.0)  # Wrong digit.
  scores = sequence_task.answer_scores(logits, tokens)
  np.testing.assert_allclose(scores["token_accuracy"], [1.0, 0.8])
  np.testing.assert_allclose(scores["exact_match"], [1.0, 0.0])
  assert float(scores["loss"][0]) < 1e-3 < float(scores["loss"][1])


def test_training_lowers_the_loss_and_reports_the_metrics(straight_run):
  result, workdir = straight_run
  scalars = train_testing.summaries(workdir)
  losses = [value for _, value in scalars["train_loss"]]
  assert [step for step, _ in scalars["train_loss"]] == [5, 10, 15, 20]
  assert losses[-1] < losses[0] - 0.3
  assert result.step == 20 and not result.preempted
  for name in ("eval_exact_match", "eval_token_accuracy", "eval_loss"):
    assert name in result.eval_metrics
  assert result.eval_metrics["eval_token_accuracy"] > 0.4   # Chance: ~0.1.
  assert result.eval_metrics["eval_edge_fraction"] == pytest.approx(1.0)
  assert result.train_metrics["train_edge_fraction"] == pytest.approx(1.0)
  assert result.eval_metrics[
      "eval_encoderblock_1/attention/allowed_edges"] == 55   # 10 * 11 / 2.
  line = trainer.final_line(20, result.eval_metrics, 1,
                            tasks.create_task(_config()).summary_metrics)
  assert line.startswith("final: step=20 eval_exact_match=")


def _greedy_answers(task, params, tokens):
  """Decodes the 5 answer tokens one by one from the model's own argmax."""
  apply = jax.jit(lambda x: task.eval_model.apply({"params": params}, x)[0])
  rows = np.array(tokens)
  rows[:, addition.ANSWER_START:] = 0
  for position in range(addition.ANSWER_START, addition.SEQUENCE_LENGTH):
    logits = apply(jnp.asarray(rows[:, :-1]))
    rows[:, position] = np.argmax(logits[:, position - 1], axis=-1)
  return rows[:, addition.ANSWER_START:]


def test_exact_match_equals_greedy_decoding(straight_run):
  result, _ = straight_run
  task = tasks.create_task(_config())
  params = train_testing.host_tree(result.state.params)
  tokens = task.split("test")[addition.TOKENS]
  logits, _ = task.eval_model.apply({"params": params},
                                    jnp.asarray(tokens[:, :-1]))
  forced = sequence_task.answer_scores(logits, jnp.asarray(tokens))
  greedy = np.all(_greedy_answers(task, params, tokens)
                  == tokens[:, addition.ANSWER_START:], axis=-1)
  np.testing.assert_array_equal(np.asarray(forced["exact_match"]) == 1,
                                greedy)
  assert result.eval_metrics["eval_exact_match"] == pytest.approx(
      greedy.mean(), abs=1e-6)


@pytest.mark.slow
def test_a_killed_run_resumes_identically(straight_run, tmp_path):
  straight, _ = straight_run

  def sigterm(step, state):
    del state
    if step == PREEMPT_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = trainer.train_and_evaluate(_config(), str(tmp_path),
                                       hooks=[sigterm])
  assert stopped.preempted and stopped.step == PREEMPT_AT
  resumed = trainer.train_and_evaluate(_config(), str(tmp_path))
  train_testing.assert_trees_equal(resumed.state, straight.state)
  assert resumed.eval_metrics == straight.eval_metrics


def test_the_task_reads_its_split_and_sections():
  config = _config("--config.task.split_seed=7",
                   "--config.task.test_fraction=0.1",
                   "--config.dataset.eval_split=train")
  task = tasks.create_task(config)
  assert set(tasks.default_task_config("addition")) == {
      "name", "split_seed", "test_fraction", "aux_loss_weight"}
  rows = addition.split_rows(7, 0.1)
  evaluation = task.make_eval_data()
  assert evaluation.num_examples == len(rows["train"]) == 9000
  first = next(iter(task.make_train_iterator()))[addition.TOKENS]
  assert first.shape == (64, 11)
  train_rows = {tuple(row) for row in addition.all_examples()[rows["train"]]}
  assert all(tuple(row) in train_rows for row in first)


@pytest.mark.parametrize("override, error, message", [
    ("--config.dataset.name=digits", ValueError,
     r"config.dataset.name must be one of 'addition'; got 'digits'"),
    ("--config.dataset.eval_split=validation", ValueError,
     r"config.dataset.eval_split must be one of 'train', 'test', 'all'"),
    ("--config.task.test_fraction=1.5", ValueError,
     r"config.task.test_fraction must be a number in \(0, 1\)"),
    ("--config.task.split_seed=-1", ValueError,
     r"config.task.split_seed must be an int in \[0, 2\*\*32\)"),
    ("--config.task.aux_loss_weight=-1.0", ValueError,
     r"config.task.aux_loss_weight must be a number >= 0"),
    ("--config.model.vocab_size=10", ValueError,
     r"config.model.vocab_size must be 12, the addition vocabulary"),
    ("--config.model.attention.sparsity=random", ValueError,
     r"config.model.attention.sparsity must be one of 'dense', 'gated'"),
    ("--config.model.attention.keys_per_query=0", ValueError,
     r"config.model.attention.keys_per_query must be an int >= 1"),
    ("--config.model.hidden_size=0", ValueError,
     r"config.model.hidden_size must be an int >= 1"),
])
def test_bad_addition_configs_are_clear_errors(override, error, message):
  with pytest.raises(error, match=message):
    tasks.create_task(_config(override))


def test_a_non_token_model_or_non_causal_attention_is_an_error():
  config = _config()
  with config.unlocked():
    config.model = train_testing.load_config("digits_vit.py:runlocal").model
  with pytest.raises(TypeError, match=r"needs a token model "
                     r"\(config.model.name 'decoder'\)"):
    tasks.create_task(config)
  with pytest.raises(ValueError, match="attention.causal must be True"):
    models.build_model({**TINY, "attention": {"causal": False}})
  with pytest.raises(ValueError, match="from config.model.attention"):
    models.build_model({**TINY, "encoder": {"attention": {}}})
  with pytest.raises(ValueError, match="config.model must set vocab_size"):
    models.build_model({"name": "decoder"})
