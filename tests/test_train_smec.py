"""SMEC through the trainer: stages, frozen selections, S-XBM, resume.

The backbone is the runlocal ViT of configs/mnist5k_vit.py (D=32) trained
for 20 steps; SMEC runs configs/mnist5k_smec.py:runlocal, 3 stages of 10
steps keeping 16, 8 and 4 dimensions.
"""
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from moe import checkpoints
from moe.compress import retrieval
from moe.train import tasks
from moe.train import trainer
import train_testing

STAGE, PREEMPT_AT, DIMS = 10, 12, (16, 8, 4)


@pytest.fixture(scope="module")
def backbone(mnist5k_data_dir, tmp_path_factory, eight_devices):
  workdir = str(tmp_path_factory.mktemp("smec_backbone"))
  trainer.train_and_evaluate(train_testing.load_config(
      "mnist5k_vit.py:runlocal",
      f"--config.dataset.data_dir={mnist5k_data_dir}"), workdir)
  return workdir


def _config(backbone, data_dir, preset="runlocal,memory=true", *overrides):
  return train_testing.load_config(
      f"mnist5k_smec.py:{preset}", f"--config.task.backbone={backbone}",
      f"--config.dataset.data_dir={data_dir}",
      "--config.task.memory_size=128", "--config.task.memory_neighbors=8",
      *overrides)


@pytest.fixture(scope="module")
def straight_run(backbone, mnist5k_data_dir, tmp_path_factory):
  history = {}

  def record(step, state):
    history[step] = train_testing.host_tree(state.params)

  result = trainer.train_and_evaluate(
      _config(backbone, mnist5k_data_dir),
      str(tmp_path_factory.mktemp("smec")), hooks=[record])
  return result, history


def test_stages_cut_nested_selections_and_freeze_what_they_learned(
    straight_run, backbone, mnist5k_data_dir):
  result, history = straight_run
  for step in range(1, 3 * STAGE):
    params, after = history[step], history[step + 1]
    stage = step // STAGE              # The stage of the update step.
    for s in range(3):
      moved = np.any(after["logits"][s] != params["logits"][s])
      assert moved == (s == stage), (step, s)
      cut_now = step == (s + 1) * STAGE
      if step >= (s + 1) * STAGE and not cut_now:
        np.testing.assert_array_equal(after["kept"][s], params["kept"][s])
    head_moved = np.any(after["head"]["kernel"] != params["head"]["kernel"])
    assert head_moved == (stage == 0), step
  kept = history[3 * STAGE]["kept"]
  assert [int(k.sum()) for k in kept[:2]] == list(DIMS[:2])
  assert np.all(kept[1] <= kept[0])
  task = tasks.create_task(_config(backbone, mnist5k_data_dir))
  indices = task.compressed_indices(result.state.params,
                                    jnp.asarray(3 * STAGE))
  assert [len(v) for v in indices.values()] == list(DIMS)
  for big, small in zip(DIMS, DIMS[1:]):   # Nested: exactly d dims each.
    assert set(np.asarray(indices[small])) < set(np.asarray(indices[big]))
    assert len(set(np.asarray(indices[big]))) == big


def test_memory_fills_as_a_fifo_of_the_train_embeddings(straight_run):
  _, history = straight_run      # history[n]: after n steps of 64 rows.
  memory = [history[n]["memory"] for n in (1, 2, 3)]
  assert [m["filled"].sum() for m in memory] == [64, 128, 128]
  assert [int(m["pointer"]) for m in memory] == [64, 0, 64]
  np.testing.assert_array_equal(memory[2]["embeddings"][64:],
                                memory[1]["embeddings"][64:])
  assert np.any(memory[2]["embeddings"][:64] != memory[1]["embeddings"][:64])


def test_eval_metrics_equal_retrieval_of_the_frozen_embeddings(
    straight_run, backbone, mnist5k_data_dir):
  result, _ = straight_run
  config = _config(backbone, mnist5k_data_dir)
  task = tasks.create_task(config)
  train, test = task.splits["train"], task.splits["eval"]
  assert train["embedding"].shape == (4000, 32)
  assert test["embedding"].shape == (1000, 32)
  params = checkpoints.restore_params(backbone)
  first = next(iter(task.make_eval_data()))
  assert set(first) == {"embedding", "label", "mask"}
  images = np.zeros((2, 28, 28, 1), np.float32)
  logits, state = task.model.apply({"params": params}, jnp.asarray(images),
                                   train=False, mutable=["intermediates"])
  assert state["intermediates"]["representation"][0].shape == (2, 32)
  del logits
  full = retrieval.retrieval_metrics(
      jnp.asarray(test["embedding"]), jnp.asarray(test["label"]),
      jnp.asarray(train["embedding"]), jnp.asarray(train["label"]))
  assert result.eval_metrics["eval_ndcg10_full"] == pytest.approx(
      float(jnp.mean(full["ndcg@10"])), abs=1e-6)
  for d in DIMS:
    assert 0.15 < result.eval_metrics[f"eval_ndcg10_d{d}"] <= 1   # Chance: 0.1.
  line = trainer.final_line(30, result.eval_metrics, 1,
                            task.summary_metrics)
  assert line.startswith("final: step=30 eval_ndcg10_full=")


def test_a_killed_stage_resumes_identically(straight_run, backbone,
                                            mnist5k_data_dir, tmp_path):
  straight, _ = straight_run

  def sigterm(step, state):
    del state
    if step == PREEMPT_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  config = _config(backbone, mnist5k_data_dir)
  stopped = trainer.train_and_evaluate(config, str(tmp_path),
                                       hooks=[sigterm])
  assert stopped.preempted and stopped.step == PREEMPT_AT   # In stage 2.
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  train_testing.assert_trees_equal(resumed.state, straight.state)
  assert resumed.eval_metrics == straight.eval_metrics


def test_mrl_trains_the_head_and_keeps_prefixes(backbone, mnist5k_data_dir,
                                               tmp_path):
  config = _config(backbone, mnist5k_data_dir, "runlocal,method=mrl")
  result = trainer.train_and_evaluate(config, str(tmp_path))
  task = tasks.create_task(config)
  assert set(result.state.params) == {"head"}
  assert not np.allclose(result.state.params["head"]["kernel"], np.eye(32))
  for d, indices in task.compressed_indices(result.state.params, 30).items():
    np.testing.assert_array_equal(indices, np.arange(d))


@pytest.mark.parametrize("override, message", [
    ("--config.task.dims=(32, 8)", r"config.task.dims: every size must be "
     r"an int in 1..31"),
    ("--config.task.selector=random", r"config.task.selector"),
    ("--config.task.memory_size=0", r"config.task.memory_size must be an int "
     r">= 1, got 0"),
    ("--config.total_steps=31", r"multiple of the 3 stages"),
    ("--config.task.method=pca", r"config.task.method"),
])
def test_bad_smec_configs_are_clear_errors(override, message, tmp_path):
  config = _config(str(tmp_path), str(tmp_path), "runlocal", override)
  with pytest.raises(ValueError, match=message):
    tasks.create_task(config)


def test_a_missing_or_mismatched_backbone_is_a_clear_error(
    backbone, mnist5k_data_dir, tmp_path):
  missing = tasks.create_task(_config(str(tmp_path / "none"),
                                      mnist5k_data_dir))
  with pytest.raises(checkpoints.CheckpointError, match="none"):
    missing.make_train_iterator()
  empty = tasks.create_task(_config("", mnist5k_data_dir))
  with pytest.raises(ValueError, match="config.task.backbone must name"):
    empty.make_train_iterator()
  wrong = tasks.create_task(_config(backbone, mnist5k_data_dir, "runlocal",
                                    "--config.model.hidden_size=48"))
  with pytest.raises(ValueError, match=r"does not hold the parameters of "
                     r"config.model"):
    wrong.make_train_iterator()
