"""End-to-end tests of moe.train.trainer on 8 fake CPU devices.

Runs of the runlocal digits V-MoE (2 data x 4 expert partitions): training,
metrics and event files; preemption by SIGTERM; resumption past a truncated
checkpoint, bitwise equal to a run that never stopped; NaN losses; errors.
Each run compiles its steps, so runs are shared between tests.
"""
import contextlib
import io
import logging
import os
import shutil
import signal

from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from moe import checkpoints
from moe.train import train_metrics
from moe.train import trainer
import test_train_infra_checkpoints
import train_testing

STEPS = 20
PREEMPT_AT = 7
EVERY = 10


def _config(data_dir, *overrides):
  """The runlocal V-MoE with a frozen, hook-initialised patch embedding."""
  return train_testing.tiny_config(
      data_dir, f"--config.total_steps={STEPS}",
      f"--config.checkpoint.every_steps={EVERY}",
      f"--config.evaluation.every_steps={EVERY}",
      "--config.logging.every_steps=5",
      "--config.optimizer.frozen_params=('embedding/kernel',)",
      # λ of the SparseTopK routers from 0.1 at step 0 to 0.05 at step 20.
      "--config.model.encoder.moe.router.regularization_end=0.05",
      f"--config.model.encoder.moe.router.regularization_steps={STEPS}",
      "--config.model.encoder.moe.router.regularization_schedule=linear",
      *overrides)


def _double_embedding(params):
  """Init hook: twice the fresh patch embedding kernel."""
  embedding = dict(params["embedding"])
  embedding["kernel"] = 2 * np.asarray(embedding["kernel"])
  return {**params, "embedding": embedding}


def _send_sigterm_at(step):
  def hook(current_step, state):
    del state
    if current_step == step:
      os.kill(os.getpid(), signal.SIGTERM)
  return hook


@pytest.fixture(scope="module")
def straight_run(digits_data_dir, tmp_path_factory, eight_devices):
  """A run of STEPS steps that is never interrupted, and its initial params."""
  workdir = tmp_path_factory.mktemp("straight")
  initial = {}

  def init_params_fn(params):
    initial.update(_double_embedding(params))
    return initial

  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    result = trainer.train_and_evaluate(
        _config(digits_data_dir), str(workdir), init_params_fn=init_params_fn)
  return workdir, result, initial, stdout.getvalue()


@pytest.fixture(scope="module")
def preempted_run(digits_data_dir, tmp_path_factory, eight_devices):
  """The same run, stopped by SIGTERM after step PREEMPT_AT."""
  workdir = tmp_path_factory.mktemp("preempted")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    result = trainer.train_and_evaluate(
        _config(digits_data_dir), str(workdir),
        init_params_fn=_double_embedding,
        hooks=[_send_sigterm_at(PREEMPT_AT)])
  return workdir, result, stdout.getvalue()


@pytest.mark.slow
def test_trains_evaluates_and_writes_events_with_sharded_experts(
    straight_run):
  workdir, result, initial, stdout = straight_run
  assert result.step == STEPS and not result.preempted
  experts = result.state.params["Transformer"]["encoderblock_1"]["MoeBlock_3"][
      "Experts"]
  assert experts["Dense_0"]["kernel"].sharding.spec == P("expert")
  assert experts["Dense_0"]["kernel"].shape[0] == 8
  # The init hook's embedding, frozen by config.optimizer.frozen_params.
  np.testing.assert_array_equal(result.state.params["embedding"]["kernel"],
                                initial["embedding"]["kernel"])

  events = train_testing.summaries(workdir)
  losses = [value for _, value in events["train_loss"]]
  assert [step for step, _ in events["train_loss"]] == [5, 10, 15, 20]
  assert losses[-1] < losses[0] - 0.1
  for name in ("eval_accuracy", "eval_top5", "eval_loss",
               "eval_encoderblock_1/dropped_fraction",
               "eval_encoderblock_1/tokens_per_expert_cv",
               "train_encoderblock_1/support_size", "train_learning_rate",
               "steps_per_sec"):
    assert name in events, name
  assert [step for step, _ in events["eval_accuracy"]] == [10, 20]
  # The routers see the step: evaluations at the state's step, train metrics
  # averaged over the steps 0-4, ..., 15-19 of each logging window.
  np.testing.assert_allclose(
      [v for _, v in events["eval_encoderblock_1/regularization"]],
      [0.075, 0.05], rtol=1e-6)
  np.testing.assert_allclose(
      [v for _, v in events["train_encoderblock_1/regularization"]],
      [0.1 - 0.0025 * (5 * i + 2) for i in range(4)], rtol=1e-6)
  assert result.eval_metrics["eval_accuracy"] > 0.2
  assert result.eval_metrics["eval_top5"] >= result.eval_metrics[
      "eval_accuracy"]
  assert dict(events["eval_accuracy"])[STEPS] == pytest.approx(
      result.eval_metrics["eval_accuracy"])
  assert any(name.startswith("events.out.tfevents.")
             for name in os.listdir(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]

  line = trainer.final_line(STEPS, result.eval_metrics, result.wall_s)
  assert stdout.splitlines()[-1] == line
  assert line.startswith(
      f"final: step=20 eval_accuracy={result.eval_metrics['eval_accuracy']:.4f}"
      " eval_top5=")


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_stops(preempted_run):
  workdir, result, stdout = preempted_run
  assert result.preempted and result.step == PREEMPT_AT
  assert "final:" not in stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(PREEMPT_AT)]
  restored = checkpoints.restore_checkpoint(workdir, result.state)
  assert restored.step == PREEMPT_AT
  assert restored.data_state == {"epoch": 0, "index_in_epoch": PREEMPT_AT * 64}
  train_testing.assert_trees_equal(restored.state, result.state)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _truncate_files(step_dir):
  """Every file of the state cut to 0 bytes (e.g. by a full disk)."""
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      os.truncate(os.path.join(root, name), 0)


def _flip_largest_file(step_dir):
  """4,000 bytes inverted in the middle of the largest array-data file (its
  size unchanged): silent corruption. The state has two `d/` directories of
  data files (orbax's per-process OCDBT database and the merged one that is
  read); both are hit."""
  files = test_train_infra_checkpoints.data_files(step_dir / "state")
  for directory in {os.path.dirname(path) for path in files}:
    largest = max((path for path in files if path.startswith(directory + "/")),
                  key=os.path.getsize)
    test_train_infra_checkpoints.flip_bytes(largest)


def _empty_data_state(step_dir):
  """A data state that parses but has the wrong keys."""
  (step_dir / "data" / "process_0.json").write_text("{}")


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_files, _flip_largest_file,
                                     _empty_data_state])
def test_resume_skips_a_corrupt_checkpoint_and_equals_the_straight_run(
    digits_data_dir, straight_run, preempted_run, tmp_path, caplog, corrupt):
  straight_dir, straight, _, _ = straight_run
  workdir = tmp_path / "preempted"
  shutil.copytree(preempted_run[0], workdir)
  # A later checkpoint, corrupted.
  checkpoint_dir = workdir / "checkpoints"
  shutil.copytree(checkpoint_dir / str(PREEMPT_AT), checkpoint_dir / "9")
  corrupt(checkpoint_dir / "9")

  with caplog.at_level(logging.WARNING):
    resumed = trainer.train_and_evaluate(_config(digits_data_dir),
                                         str(workdir))

  skipped = [record.getMessage() for record in caplog.records
             if "Skipping unreadable checkpoint" in record.getMessage()]
  assert len(skipped) == 1 and "checkpoints/9" in skipped[0], skipped
  assert "\n" not in skipped[0] and len(skipped[0]) < 600, skipped[0]
  logging.getLogger(__name__).warning("corruption found: %s", skipped[0])
  assert sorted(os.listdir(checkpoint_dir)) == ["10", "20", "9.unreadable"]
  assert resumed.step == straight.step == STEPS
  train_testing.assert_trees_equal(resumed.state, straight.state)
  assert resumed.eval_metrics == straight.eval_metrics
  assert resumed.train_metrics == straight.train_metrics
  ours, theirs = (train_testing.summaries(d) for d in (workdir, straight_dir))
  for name in ("train_loss", "eval_accuracy", "eval_loss"):
    assert dict(ours[name])[STEPS] == dict(theirs[name])[STEPS], name


def test_nan_loss_stops_with_a_clear_error_before_saving(
    digits_data_dir, tmp_path, eight_devices):
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}",
      "--config.model.encoder.num_layers=1", "--config.optimizer.name=sgd",
      "--config.optimizer.learning_rate=1e12")
  with pytest.raises((train_metrics.NonFiniteLossError,
                      train_metrics.NonFiniteStateError),
                     match=r"(The train loss became (nan|inf) at|The update "
                     r"of) step \d+ .*learning_rate=.*e\+1\d, grad_norm=.*"
                     r"training stops"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not [name for name in os.listdir(tmp_path / "checkpoints")
              if name.isdigit()]


def test_non_finite_update_stops_before_it_is_saved(digits_data_dir,
                                                    tmp_path, eight_devices):
  # The loss of step 1 is finite (it is computed before the update); the
  # head's update, 1e30 x 1e10 x gradient, overflows float32. Checkpoints
  # every step: none may be written.
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}",
      "--config.model.encoder.num_layers=1", "--config.optimizer.name=sgd",
      "--config.optimizer.learning_rate=1e30",
      "--config.optimizer.lr_mults=(('head/.*', 1e10),)",
      "--config.optimizer.schedule.warmup_steps=0",
      "--config.checkpoint.every_steps=1")
  with pytest.raises(train_metrics.NonFiniteStateError,
                     match=r"The update of step 1 made the train state "
                     r"non-finite \(loss [0-9.]+, learning_rate=1e\+30, "
                     r"grad_norm=.*\): 2 non-finite arrays, first "
                     r"params/head/bias, params/head/kernel; training stops "
                     r"before saving it"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not [name for name in os.listdir(tmp_path / "checkpoints")
              if name.isdigit()]


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"),
                                          ("1e39", r"1e\+39")])
def test_non_finite_learning_rate_is_a_config_error(digits_data_dir, tmp_path,
                                                    value, shown):
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}",
      f"--config.optimizer.learning_rate={value}")
  with pytest.raises(ValueError, match=r"config.optimizer.learning_rate must "
                     r"be a number >= 0.0, finite in float32 \(<= 3.4e38\); "
                     rf"got {shown}"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("overrides, error, message", [
    (("--config.dataset.name=no_such_dataset",), FileNotFoundError,
     r"Dataset 'no_such_dataset' is not prepared in data dir .* \(tfds has no "
     r"builder code for it\)"),
    (("--config.mesh.expert=3",), ValueError,
     r"config.mesh.expert must divide the number of devices \(8\); allowed "
     r"values: \[1, 2, 4, 8\]; got 3"),
    (("--config.optimizer.accumulation_steps=3",), ValueError,
     r"config.total_steps=20 must be a multiple of "
     r"config.optimizer.accumulation_steps=3"),
    (("--config.task.loss=hinge",), ValueError,
     r"config.task.loss must be one of 'softmax_xent', 'sigmoid_xent', "
     r"'topk_xent'; got 'hinge'"),
    (("--config.dataset.batch_size=4",), ValueError,
     r"batch entry 'image' of shape \(4, 8, 8, 1\): the per-process batch "
     r"size must be a multiple of the 8 devices"),
])
def test_config_errors_are_clear(digits_data_dir, tmp_path, eight_devices,
                                 overrides, error, message):
  with pytest.raises(error, match=message):
    trainer.train_and_evaluate(_config(digits_data_dir, *overrides),
                               str(tmp_path))


def test_missing_data_dir_is_a_clear_error(digits_data_dir, tmp_path,
                                           eight_devices):
  config = _config(digits_data_dir, "--config.dataset.name=mnist",
                   f"--config.dataset.data_dir={tmp_path / 'nowhere'}")
  with pytest.raises(FileNotFoundError,
                     match=r"Dataset 'mnist' is not prepared in data dir "
                     r"'.*nowhere'.*tfds build mnist"):
    trainer.train_and_evaluate(config, str(tmp_path / "workdir"))


def test_unknown_top_level_field_is_an_error(digits_data_dir, tmp_path):
  config = _config(digits_data_dir)
  with config.unlocked():
    config.total_step = 10
  with pytest.raises(ValueError,
                     match=r"config has unknown field\(s\) total_step; "
                     r"allowed fields: seed, total_steps"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_final_line_format():
  line = trainer.final_line(
      600, {"eval_accuracy": 0.97222, "eval_top5": 1.0, "eval_loss": 0.10049},
      93.6)
  assert line == ("final: step=600 eval_accuracy=0.9722 eval_top5=1.0000 "
                  "eval_loss=0.100 wall_s=94")
