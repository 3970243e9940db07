"""Two jax processes on localhost (launch/local.sh) vs one process.

`bash launch/local.sh 2 4 -- <moe.main args>` trains the runlocal digits
V-MoE on 2 processes x 4 fake CPU devices, connected by jax.distributed with
CPU (gloo) collectives; each process reads its own half of the train split.
The same global batches, assembled in one process with 8 devices, must give
the same parameters and metrics up to float rounding.
"""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe import data as data_lib
from moe import checkpoints
from moe.train import evaluation
from moe.train import tasks
from moe.train import trainer
import train_testing

STEPS = 4
NUM_PROCESSES = 2


class _ProcessSlicesIterator:
  """The global batches of a multi-process run, read by one process."""

  def __init__(self, dataset_config):
    self._iterators = [
        data_lib.make_train_iterator(dataset_config, process_index=i,
                                     process_count=NUM_PROCESSES)
        for i in range(NUM_PROCESSES)]

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(iterator) for iterator in self._iterators]
    return {key: np.concatenate([batch[key] for batch in batches])
            for key in batches[0]}

  def get_state(self):
    return self._iterators[0].get_state()

  def set_state(self, state):
    for iterator in self._iterators:
      iterator.set_state(state)


class _TwoProcessDataTask(tasks.ClassificationTask):
  """The classification task fed as if by two processes."""

  def make_train_iterator(self):
    return _ProcessSlicesIterator(self.dataset)


@pytest.mark.slow
def test_two_processes_agree_with_one(digits_data_dir, tmp_path,
                                     eight_devices):
  # SGD: Adam would blow float rounding up to learning-rate-sized updates for
  # parameters whose gradient is zero up to rounding (attention key biases).
  overrides = [f"--config.total_steps={STEPS}",
               f"--config.evaluation.every_steps={STEPS}",
               "--config.model.encoder.num_layers=1",
               "--config.model.encoder.moe.layers=last_1",
               "--config.optimizer.name=sgd",
               "--config.optimizer.learning_rate=0.1"]
  workdir = tmp_path / "two_processes"
  command = ["bash", os.path.join(train_testing.REPO, "launch", "local.sh"),
             str(NUM_PROCESSES), "4", "--",
             "--config", os.path.join(train_testing.CONFIGS,
                                      "digits_vmoe.py:runlocal"),
             f"--workdir={workdir}",
             f"--config.dataset.data_dir={digits_data_dir}",
             "--config.mesh.expert=4", *overrides]
  env = dict(os.environ, MOE_LOG_DIR=str(tmp_path / "logs"),
             PYTHON=sys.executable)
  process = subprocess.run(command, capture_output=True, text=True, env=env,
                           timeout=300, check=False)
  assert process.returncode == 0, process.stderr[-5000:]
  # Gloo (CPU collectives across the processes) connected all 8 devices.
  logs = process.stderr + (tmp_path / "logs" / "process_1.log").read_text()
  assert "is connected to 7 peer ranks" in logs

  config = train_testing.tiny_config(digits_data_dir, *overrides)
  task = tasks.create_task(config)
  reference = trainer.train_and_evaluate(
      config, str(tmp_path / "one_process"),
      task=_TwoProcessDataTask(**vars(task)))

  restored = checkpoints.restore_checkpoint(workdir, reference.state,
                                            with_data_state=False)
  assert restored.step == STEPS
  train_testing.assert_trees_equal(restored.state.params,
                                   reference.state.params, rtol=1e-5,
                                   atol=1e-5)
  events = train_testing.summaries(workdir)
  # The evaluation of two processes equals the one of one process on the
  # same parameters. (Not the reference run's own evaluation: the parameters
  # agree only to rounding, as the processes sum gradients in another
  # order, and routing is discontinuous in them: a token within rounding of
  # a tie between two experts switches, which moved eval_loss by 8e-5 and
  # eval_top5 by one image on this machine.) Per-example metrics only: the
  # MoE metrics are means over eval batches, which hold other examples when
  # two processes each read half of the split.
  batch = next(task.make_train_iterator())
  layout = trainer.create_layout(
      config, {key: jax.ShapeDtypeStruct(value.shape, value.dtype)
               for key, value in batch.items()}, task=task)
  one_process_eval = evaluation.Evaluator(task, layout)(
      restored.state.params)
  for name in ("eval_loss", "eval_accuracy", "eval_top5"):
    np.testing.assert_allclose(dict(events[name])[STEPS],
                               one_process_eval[name], rtol=1e-5,
                               atol=1e-5, err_msg=name)
    np.testing.assert_allclose(dict(events[name])[STEPS],
                               reference.eval_metrics[name], rtol=1e-2,
                               atol=1e-2, err_msg=name)
  for name in ("train_loss", "train_accuracy"):
    np.testing.assert_allclose(dict(events[name])[STEPS],
                               reference.train_metrics[name], rtol=1e-5)
  final = re.findall(r"^final: .*$", process.stdout, re.MULTILINE)
  assert len(final) == 1
  expected = trainer.final_line(STEPS, one_process_eval, 0)
  assert final[0].rsplit(" wall_s=", 1)[0] == expected.rsplit(" wall_s=",
                                                              1)[0]
