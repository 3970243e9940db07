"""Tests of the train loop's small parts: train metrics and preemption."""
import os
import signal

import numpy as np
import pytest

from moe.train import preemption
from moe.train import train_metrics


def test_train_metrics_are_averaged_between_flushes():
  pending = train_metrics.TrainMetrics()
  assert pending.flush() == {}
  for step, loss in [(1, 3.0), (2, 1.0)]:
    pending.add(step, {"loss": np.float32(loss), "accuracy": np.float32(step)})
  assert pending.flush() == {"train_loss": 2.0, "train_accuracy": 1.5}
  pending.add(3, {"loss": np.float32(0.5)})
  assert pending.flush() == {"train_loss": 0.5}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_loss_names_the_first_bad_step(bad):
  pending = train_metrics.TrainMetrics()
  for step, loss in [(4, 1.0), (5, bad), (6, np.nan)]:
    pending.add(step, {"loss": np.float32(loss),
                       "learning_rate": np.float32(0.5)})
  with pytest.raises(train_metrics.NonFiniteLossError,
                     match=rf"The train loss became {bad} at step 5 "
                     r"\(learning_rate=0.5\); training stops\. Lower "
                     r"config.optimizer.learning_rate"):
    pending.flush()


def test_preemption_watcher_records_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.reached(2)
    assert watcher.reached(3)
  assert signal.getsignal(signal.SIGTERM) is before
