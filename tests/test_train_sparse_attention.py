"""Sparse attention post-training through the trainer: GECO, resume, errors.

The base is configs/addition.py:runlocal (a 2-block D=32 decoder, 20
steps); post-training is configs/addition_sparse.py:runlocal (20 steps).
"""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import checkpoints
from moe.data import addition
from moe.nn import models
from moe.train import sparse_attention_task as sat
from moe.train import tasks
from moe.train import trainer
import train_testing

PREEMPT_AT = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory, eight_devices):
  workdir = str(tmp_path_factory.mktemp("addition_base"))
  trainer.train_and_evaluate(
      train_testing.load_config("addition.py:runlocal"), workdir)
  return workdir


def _config(base, preset="runlocal,sparsity=gated", *overrides):
  return train_testing.load_config(
      f"addition_sparse.py:{preset}", f"--config.init_from.checkpoint={base}",
      *overrides)


@pytest.fixture(scope="module")
def gated_run(base, tmp_path_factory):
  history = {}

  def record(step, state):
    history[step] = train_testing.host_tree(state.params[sat.GECO])

  result = trainer.train_and_evaluate(
      _config(base), str(tmp_path_factory.mktemp("gated")), hooks=[record])
  return result, history


def test_geco_update_is_the_formula():
  state = {sat.MULTIPLIER: jnp.float32(2.0), sat.CONSTRAINT: jnp.float32(0.5)}
  new = sat.geco_update(state, jnp.float32(-1.0), rate=0.1, decay=0.9,
                        bounds=(1e-3, 1e4))
  ema = 0.9 * 0.5 + 0.1 * -1.0
  np.testing.assert_allclose(new[sat.CONSTRAINT], ema, rtol=1e-6)
  np.testing.assert_allclose(new[sat.MULTIPLIER], 2.0 * np.exp(0.1 * ema),
                             rtol=1e-6)
  clipped = sat.geco_update(state, jnp.float32(1e3), rate=1.0, decay=0.0,
                            bounds=(1e-3, 10.0))
  assert float(clipped[sat.MULTIPLIER]) == 10.0


def test_expected_edge_fraction_averages_blocks():
  metrics = {"encoderblock_0/attention/expected_edges": jnp.float32(3.0),
             "encoderblock_0/attention/allowed_edges": jnp.float32(6.0),
             "encoderblock_1/attention/expected_edges": jnp.float32(1.5),
             "encoderblock_1/attention/allowed_edges": jnp.float32(6.0),
             "auxiliary_loss": jnp.float32(0.0)}
  assert float(sat.expected_edge_fraction(metrics)) == pytest.approx(
      (0.5 + 0.25) / 2)
  with pytest.raises(ValueError, match="no attention edges"):
    sat.expected_edge_fraction({"auxiliary_loss": jnp.float32(0.0)})


def test_base_loss_is_the_base_runs_train_cross_entropy(base):
  config = _config(base)
  task = tasks.create_task(config)
  params = checkpoints.restore_params(base)
  dense = models.build_model(
      train_testing.load_config("addition.py:runlocal").model)
  tokens = addition.load_split("train", seed=0, test_fraction=0.2,
                               field="test")[addition.TOKENS]
  logits, _ = dense.apply({"params": params}, tokens[:, :-1])
  log_probs = np.asarray(logits[:, addition.ANSWER_START - 1:], np.float64)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  answers = tokens[:, addition.ANSWER_START:]
  expected = -np.take_along_axis(log_probs, answers[..., None], -1).mean()
  assert task.base_loss == pytest.approx(expected, rel=1e-4)
  given = tasks.create_task(_config(base, "runlocal,sparsity=gated",
                                    "--config.task.base_loss=0.5"))
  assert given.base_loss == 0.5


def test_gated_run_moves_the_multiplier_by_geco(gated_run, base):
  result, history = gated_run
  task = tasks.create_task(_config(base))
  previous = {sat.MULTIPLIER: task.multiplier_init, sat.CONSTRAINT: 0.0}
  for step in sorted(history):
    state = history[step]
    # λ_t = λ_{t-1} exp(α c̄_t) with c̄_t the stored moving average.
    np.testing.assert_allclose(
        state[sat.MULTIPLIER], previous[sat.MULTIPLIER] * np.exp(
            task.multiplier_rate * state[sat.CONSTRAINT]), rtol=1e-5)
    previous = state
  assert len(history) == result.step == 20
  assert history[20][sat.MULTIPLIER] != task.multiplier_init
  evals = result.eval_metrics
  for name in ("eval_penalty", "eval_edge_fraction", "eval_multiplier",
               "eval_exact_match", "eval_loss",
               "eval_edge_fraction_encoderblock_1_head0"):
    assert np.isfinite(evals[name]), name
  assert 0 < evals["eval_edge_fraction"] <= 1


def test_a_killed_post_training_resumes_identically(gated_run, base,
                                                    tmp_path):
  straight, _ = gated_run

  def sigterm(step, state):
    del state
    if step == PREEMPT_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = trainer.train_and_evaluate(_config(base), str(tmp_path),
                                       hooks=[sigterm])
  assert stopped.preempted and stopped.step == PREEMPT_AT
  resumed = trainer.train_and_evaluate(_config(base), str(tmp_path))
  train_testing.assert_trees_equal(resumed.state, straight.state)
  assert resumed.eval_metrics == straight.eval_metrics


def test_sparse_topk_post_training_reports_the_nonzero_edges(base, tmp_path):
  config = _config(base, "runlocal,sparsity=sparse_topk,k=2")
  result = trainer.train_and_evaluate(config, str(tmp_path))
  task = tasks.create_task(config)
  tokens = task.split("test")[addition.TOKENS]
  _, state = task.eval_model.apply(
      {"params": sat.model_params(result.state.params)}, tokens[:, :-1],
      mutable="intermediates")
  weights = jax.tree.leaves(state["intermediates"])   # [B, H, L, L] each.
  length = addition.SEQUENCE_LENGTH - 1
  nonzero = np.stack([np.asarray(w) != 0 for w in weights])
  assert not np.any(np.triu(nonzero, k=1))             # Causal edges only.
  # The soft mask sums to k = 2 with entries <= 1: at least min(2, i + 1)
  # keys per query, fewer than all of them for most queries.
  per_query = nonzero.sum(-1)
  assert np.all(per_query >= np.minimum(2, np.arange(1, length + 1)))
  fraction = nonzero.sum() / (nonzero.size / length ** 2
                              * length * (length + 1) / 2)
  assert fraction < 0.9
  assert result.eval_metrics["eval_edge_fraction"] == pytest.approx(
      fraction, rel=1e-5)
  assert result.eval_metrics["eval_multiplier"] == pytest.approx(1.0)


def test_bad_post_training_configs_are_clear_errors(base):
  with pytest.raises(ValueError, match="config.init_from.checkpoint is empty"):
    tasks.create_task(_config("", "runlocal,sparsity=gated"))
  with pytest.raises(ValueError, match="multiplier_bounds"):
    tasks.create_task(_config(base, "runlocal,sparsity=gated",
                              "--config.task.multiplier_init=1e5"))
  with pytest.raises(ValueError, match="config.task.tolerance"):
    tasks.create_task(_config(base, "runlocal,sparsity=gated",
                              "--config.task.tolerance=0"))
  with pytest.raises(checkpoints.CheckpointError,
                     match="/nonexistent/run does not exist"):
    tasks.create_task(_config("/nonexistent/run", "runlocal,sparsity=gated"))
