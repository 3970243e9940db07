"""PQK through the trainer: phases, gradient masks, resume, export.

The runlocal MLP of configs/mnist5k_pqk_mlp.py (784-32-16-10) for 20 steps:
dense 0-5, prune 6-11 (rounds at 6 and 9), warm-up 12-13, mutual 14-19.
"""
import io
import logging
import os
import signal
import subprocess
import sys

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import data as data_lib
from moe.compress import phases
from moe.compress import pruning
from moe.compress import student_file
from moe.train import pqk_task
from moe.train import tasks
from moe.train import trainer
import train_testing

STEPS, EVERY, PREEMPT_AT = 20, 5, 8
NAMES = ("Dense_0/kernel", "Dense_1/kernel", "head/kernel")


def _config(data_dir, *overrides):
  return train_testing.load_config(
      "mnist5k_pqk_mlp.py:runlocal", f"--config.dataset.data_dir={data_dir}",
      f"--config.checkpoint.every_steps={EVERY}",
      f"--config.evaluation.every_steps={EVERY}",
      "--config.logging.every_steps=2", *overrides)


def _flat(tree):
  return {name: np.asarray(value) for name, value in
          pqk_task._flat(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def straight_run(mnist5k_data_dir, tmp_path_factory, eight_devices):
  """The run never stopped, with host copies of the params after each step."""
  workdir = tmp_path_factory.mktemp("pqk_straight")
  history = {}

  def record(step, state):
    history[step] = (_flat(state.params["model"]), _flat(
        state.params["masks"]))

  log = io.StringIO()
  handler = logging.StreamHandler(log)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().addHandler(handler)
  try:
    result = trainer.train_and_evaluate(_config(mnist5k_data_dir),
                                        str(workdir), hooks=[record])
  finally:
    logging.getLogger().removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
  return workdir, result, history, log.getvalue()


def test_masks_are_exact_and_each_phase_updates_only_its_weights(
    straight_run):
  _, result, history, _ = straight_run
  schedule = tasks.create_task(_config("unused")).schedule
  sizes = {name: history[1][0][name].size for name in NAMES}
  for step in range(1, STEPS):
    weights, masks = history[step]
    next_weights, next_masks = history[step + 1]
    phase = int(schedule.phase(step))   # The phase of the update step -> +1.
    events = dict(schedule.mask_events)
    if step in events:
      keep = pruning.keep_counts(sizes, events[step], "layer")
      for name in NAMES:
        assert next_masks[name].sum() == keep[name], (step, name)
        assert np.all(next_masks[name] <= masks[name])
    else:
      for name in NAMES:
        np.testing.assert_array_equal(next_masks[name], masks[name])
    for name in NAMES:
      moved = next_weights[name] != weights[name]
      mask = next_masks[name] > 0
      if phase == phases.PRUNE:
        assert not np.any(moved & ~mask), (step, name)   # Frozen: bit-exact.
        assert np.any(moved & mask)
      else:
        assert moved.mean() > 0.5, (step, name, phases.PHASES[phase])
  final = result.eval_metrics
  for name in NAMES:
    expected = 1 - pruning.keep_count(sizes[name], 0.9) / sizes[name]
    assert final[f"eval_sparsity/{name}"] == pytest.approx(expected,
                                                           abs=1e-7)


def test_student_and_teacher_gradients_reach_only_their_weights(
    straight_run):
  _, result, _, _ = straight_run
  task = tasks.create_task(_config("unused"))
  params = jax.device_get(result.state.params)
  batch = {"image": jnp.asarray(np.random.default_rng(0).random(
      (8, 28, 28, 1)), jnp.float32),
           "labels": jax.nn.one_hot(jnp.arange(8) % 10, 10)}

  def objective(which, step):
    def fn(p):
      _, metrics = task.train_loss(p, batch, jax.random.key(0),
                                   jnp.asarray(step))
      if which == "student":
        return metrics["student_loss"] + metrics["student_kd"]
      return metrics["teacher_loss"] + metrics["teacher_kd"]
    return jax.grad(fn)(params)["model"]

  masks = _flat(params["masks"])
  for step in (12, 15):                     # Warm-up and mutual.
    student, teacher = (_flat(objective(w, step))
                        for w in ("student", "teacher"))
    for name, grad in student.items():
      if name in masks:
        assert np.all(grad[masks[name] == 0] == 0), name
        assert np.all(teacher[name][masks[name] > 0] == 0), name
        assert np.any(teacher[name] != 0) and np.any(grad != 0)
      else:   # Biases belong to the student.
        assert np.all(teacher[name] == 0), name
  for name, grad in _flat(objective("student", 3)).items():   # Dense phase.
    assert np.all(grad == 0), name


def test_phase_and_sparsity_are_in_tensorboard_and_the_log(straight_run):
  workdir, result, _, log = straight_run
  events = train_testing.summaries(workdir)
  # Averaged over the steps since the last report (every 2 steps and at
  # every evaluation): steps 4-5, 6-7, 12-13, 14.
  phase = dict(events["train_phase"])
  assert [phase[s] for s in (6, 8, 14, 15)] == [0, 1, 2, 3]
  target = dict(events["train_target_sparsity"])
  assert target[8] == pytest.approx(pruning.cubic_sparsity(1, 2, 0, 0.9))
  assert dict(events["eval_phase"])[STEPS] == phases.MUTUAL
  for name in ("train_sparsity/Dense_0/kernel", "train_target_sparsity",
               "train_student_kd", "train_teacher_accuracy",
               "train_weight_bits", "eval_teacher_accuracy",
               "eval_sparsity/head/kernel"):
    assert name in events, name
  assert dict(events["train_weight_bits"])[STEPS] == 4
  assert "train_phase=1" in log and "eval_teacher_accuracy=" in log, log[:2000]
  assert result.eval_metrics["eval_teacher_accuracy"] > 0.3


def test_exported_student_reloads_with_equal_accuracy(straight_run, tmp_path,
                                                      mnist5k_data_dir):
  _, result, _, _ = straight_run
  config = _config(mnist5k_data_dir)
  task = tasks.create_task(config)
  path = tmp_path / "student.npz"
  size = task.export_student(result.state.params, STEPS, str(path),
                             config.model)
  assert size == os.path.getsize(path)
  student = student_file.read_student(path)
  float_bytes = 4 * sum(np.prod(v.shape) for v in jax.tree.leaves(
      result.state.params["model"]))
  assert size < float_bytes / 4
  correct = total = 0
  for batch in task.make_eval_data():
    logits = student_file.predict(student, batch["image"])
    hits = np.argmax(logits, -1) == np.argmax(batch["labels"], -1)
    correct += np.sum(hits & batch[data_lib.MASK_KEY])
    total += np.sum(batch[data_lib.MASK_KEY])
  assert correct / total == pytest.approx(
      result.eval_metrics["eval_accuracy"], abs=1e-9)
  evaluated = task.eval_student_params(result.state.params,
                                       jnp.asarray(STEPS))
  for name, value in _flat(evaluated).items():
    np.testing.assert_array_equal(
        _flat(student.params)[name], value, err_msg=name)


def test_a_killed_run_resumes_identically_across_a_phase_boundary(
    straight_run, mnist5k_data_dir, tmp_path):
  _, straight, _, _ = straight_run
  workdir = str(tmp_path)

  def sigterm(step, state):
    del state
    if step == PREEMPT_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = trainer.train_and_evaluate(_config(mnist5k_data_dir), workdir,
                                       hooks=[sigterm])
  assert stopped.preempted and stopped.step == PREEMPT_AT   # In the prune
  resumed = trainer.train_and_evaluate(_config(mnist5k_data_dir), workdir)
  assert resumed.step == STEPS                 # phase, before round 2.
  train_testing.assert_trees_equal(resumed.state, straight.state)
  assert resumed.eval_metrics == straight.eval_metrics


@pytest.mark.parametrize("override, message", [
    ("--config.task.sparsity=1.0", r"config.task.sparsity must be a number "
     r"in \[0, 1\)"),
    ("--config.task.weight_bits=9", r"config.task.weight_bits must be an "
     r"integer in 2..8, or 32"),
    ("--config.task.warmup_steps=30", r"do not fit config.total_steps=20"),
    ("--config.task.pruning_method=random", r"config.task.pruning_method"),
    ("--config.task.prune_params=('encoder/.*',)",
     r"config.task.prune_params"),
])
def test_bad_pqk_configs_are_clear_errors(override, message, tmp_path):
  config = _config(str(tmp_path), override)
  with pytest.raises(ValueError, match=message):
    task = tasks.create_task(config)
    task.init(jax.random.key(0), {"image": jnp.zeros((2, 28, 28, 1))})


def test_export_command_writes_the_student_of_the_checkpoint(
    straight_run, tmp_path, mnist5k_data_dir):
  workdir, result, _, _ = straight_run
  out = tmp_path / "cli.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(
      [sys.executable, "-m", "moe.export", f"--workdir={workdir}",
       f"--out={out}",
       f"--pqk_config={train_testing.CONFIGS}/mnist5k_pqk_mlp.py:runlocal",
       f"--pqk_config.dataset.data_dir={mnist5k_data_dir}",
       f"--pqk_config.checkpoint.every_steps={EVERY}"],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"wrote {out}: the PQK student" in run.stdout
  task = tasks.create_task(_config(mnist5k_data_dir))
  evaluated = task.eval_student_params(result.state.params,
                                       jnp.asarray(STEPS))
  student = student_file.read_student(out)
  for name, value in _flat(evaluated).items():
    np.testing.assert_array_equal(_flat(student.params)[name], value,
                                  err_msg=name)
