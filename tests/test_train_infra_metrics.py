"""Tests of moe.train.metrics_writing: event files, progress, process 0."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from moe.train import metrics_writing
from moe.parallel import partitioning


def _summaries(logdir):
  """Returns {tag: [(step, numpy value), ...]} from the events in `logdir`."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto))
                for e in accumulator.Tensors(tag)]
          for tag in accumulator.Tags()[event_accumulator.TENSORS]}


def test_writes_scalars_and_progress_to_tensorboard(tmp_path, eight_devices):
  reporter = metrics_writing.Reporter(tmp_path, total_steps=10,
                                      progress_every_steps=5,
                                      progress_every_secs=None)
  reporter.write_hparams({"optimizer": {"name": "sgd", "learning_rate": 0.1},
                          "mesh": {"partition_rules": (("a", ("expert",)),)}})
  reporter.log_parameter_overview({"dense": {"kernel": np.ones((2, 3))}})
  mesh = partitioning.create_mesh(2)
  for step in range(1, 11):
    reporter.on_step(step)
    loss = jax.device_put(jnp.float32(1.0 / step),
                          NamedSharding(mesh, P()))
    with reporter.timed("eval"):
      reporter.write_scalars(step, {"train_loss": loss, "lr": 0.5,
                                    "step_count": np.int32(step)})
  reporter.close()
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  summaries = _summaries(tmp_path)
  assert "_hparams_/session_start_info" in summaries
  np.testing.assert_allclose([v for _, v in summaries["train_loss"]],
                             [1.0 / s for s in range(1, 11)], rtol=1e-6)
  assert [s for s, _ in summaries["train_loss"]] == list(range(1, 11))
  assert [float(v) for _, v in summaries["lr"]] == [0.5] * 10
  assert [s for s, _ in summaries["steps_per_sec"]] == [5, 10]
  assert all(v > 0 for _, v in summaries["steps_per_sec"])
  scalars = metrics_writing.read_scalars(tmp_path)
  assert scalars["lr"] == [(step, 0.5) for step in range(1, 11)]
  assert scalars["train_loss"] == [
      (step, pytest.approx(1.0 / step)) for step in range(1, 11)]
  assert "_hparams_/session_start_info" not in scalars


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  reporter = metrics_writing.Reporter(tmp_path, total_steps=2)
  assert not reporter.is_writing
  reporter.write_hparams({"a": 1})
  for step in (1, 2):
    reporter.on_step(step)
    with reporter.timed("eval"):
      reporter.write_scalars(step, {"loss": 1.0})
  reporter.close()
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, expected", [
    (3, 3), (np.float32(0.25), 0.25), (jnp.array(2.5), 2.5)])
def test_to_host_scalar(value, expected):
  result = metrics_writing.to_host_scalar(value)
  assert result == expected and isinstance(result, (int, float))
