"""The train loop: train, evaluate, checkpoint, resume, report.

`train_and_evaluate(config, workdir)` runs one experiment:

  1. builds the mesh (`config.mesh`), the task (`config.task`, with its data
     and model), the optimizer (`config.optimizer`) and the state layout;
  2. resumes from the latest readable checkpoint in WORKDIR/checkpoints
     (train state and data position), or initialises a fresh state (then
     `init_params_fn`, the fine-tuning hook, may replace the parameters;
     `config.init_from.checkpoint` builds that hook, see
     `moe.checkpoints.init_from`);
  3. runs the jitted train step until `config.total_steps`, writing train
     metrics every `config.logging.every_steps`, evaluating every
     `config.evaluation.every_steps` and saving checkpoints as
     `config.checkpoint` says; always evaluating and saving at the end;
  4. on SIGTERM, saves a checkpoint of the current step and returns early;
  5. prints, on process 0, the summary line
     `final: step=N eval_accuracy=A eval_top5=B eval_loss=L wall_s=W`, e.g.
     `final: step=1000 eval_accuracy=0.9528 eval_top5=1.0000 eval_loss=0.189
     wall_s=115` (accuracies with 4 decimals, loss with 3, seconds rounded);
     a task with `summary_metrics` (retrieval) prints those instead.

A restarted run resumes by itself and produces the same parameters and
metrics as one that never stopped. A NaN or infinite train loss, or a step
whose update makes the parameters or optimizer state non-finite, stops the
run with `train_metrics.NonFiniteLossError` / `NonFiniteStateError` before
that state is saved.

The config is parsed and checked as a whole first
(`moe.config.experiment.ExperimentConfig`, which lists every section and the
module that documents it), so a bad field fails before any work is done.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import ml_collections

from moe import checkpoints
from moe.checkpoints import init_from
from moe.config import experiment as experiment_lib
from moe.parallel import multihost
from moe.parallel import partitioning
from moe.train import evaluation
from moe.train import metrics_writing
from moe.train import optimizers
from moe.train import preemption
from moe.train import tasks
from moe.train import train_metrics
from moe.train import train_state
from moe.train import workdir_lock

Hook = Callable[[int, train_state.TrainState], None]


class TrainResult(NamedTuple):
  """What a run ends with.

  Attributes:
    step: the last train step done.
    state: the train state after it.
    train_metrics: the last written train metrics (`train_<name>`).
    eval_metrics: the last evaluation (`eval_<name>`); empty if the run was
      preempted before evaluating.
    wall_s: seconds this call took.
    preempted: whether the run stopped early on SIGTERM.
  """
  step: int
  state: train_state.TrainState
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  wall_s: float
  preempted: bool


SUMMARY_METRICS = ("eval_accuracy", "eval_top5", "eval_loss")


def final_line(step: int, eval_metrics: Mapping[str, float], wall_s: float,
               names: Sequence[str] = SUMMARY_METRICS) -> str:
  """Returns the summary line printed at the end of a run: the eval metrics
  `names` (a task's `summary_metrics`), losses to 3 decimals, others to 4."""
  values = " ".join(
      f"{name}={eval_metrics[name]:.{3 if name.endswith('loss') else 4}f}"
      for name in names)
  return f"final: step={step} {values} wall_s={round(wall_s)}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       task: tasks.Task | None = None,
                       init_params_fn: train_state.InitParamsFn | None = None,
                       hooks: Sequence[Hook] = ()) -> TrainResult:
  """Trains and evaluates as `config` says; resumes from `workdir`.

  Args:
    config: the experiment config (see the module docstring).
    workdir: directory of checkpoints and TensorBoard event files.
    task: the task to run; default `tasks.create_task(config)`.
    init_params_fn: applied to the fresh parameters of a run that does not
      resume (fine-tuning from a checkpoint); see `train_state.InitParamsFn`.
      Default: the one `config.init_from` describes (none without a
      checkpoint); giving both is an error.
    hooks: called as `hook(step, state)` after every train step.

  Returns:
    The `TrainResult`.

  Raises:
    workdir_lock.WorkdirLockedError: at once, if another run uses `workdir`.
  """
  start_time = time.monotonic()
  experiment = experiment_lib.ExperimentConfig.from_config(config)
  with workdir_lock.WorkdirLock(workdir):
    return _train_and_evaluate(config, experiment, workdir, task,
                               init_params_fn, hooks, start_time)


def _train_and_evaluate(config: ml_collections.ConfigDict,
                        experiment: experiment_lib.ExperimentConfig,
                        workdir: str, task: tasks.Task | None,
                        init_params_fn: train_state.InitParamsFn | None,
                        hooks: Sequence[Hook],
                        start_time: float) -> TrainResult:
  """`train_and_evaluate` once the workdir is locked."""
  config_init_fn = init_from.create_init_params_fn(experiment.init_from)
  if config_init_fn is not None and init_params_fn is not None:
    raise ValueError("train_and_evaluate: pass init_params_fn or set "
                     "config.init_from.checkpoint, not both.")
  init_params_fn = init_params_fn or config_init_fn
  mesh = partitioning.create_mesh(experiment.mesh.expert)
  task = tasks.create_task(config) if task is None else task
  train_iter = task.make_train_iterator()
  first_batch = next(train_iter)
  batch_spec = {key: jax.ShapeDtypeStruct(x.shape, x.dtype) for key, x in
                partitioning.shard_batch(first_batch, mesh).items()}
  layout = create_layout(config, batch_spec, task=task, mesh=mesh)
  checkpointer = checkpoints.Checkpointer.from_config(workdir,
                                                      experiment.checkpoint)
  state, batches = _resume_or_start(checkpointer, layout, train_iter,
                                    first_batch, experiment.seed,
                                    init_params_fn)

  reporter = metrics_writing.Reporter(
      workdir, experiment.total_steps,
      progress_every_secs=experiment.logging.progress_every_secs,
      profile=experiment.logging.profile)
  reporter.write_hparams(config)
  single_process = jax.process_count() == 1
  reporter.log_parameter_overview(
      state.params if single_process else layout.abstract.params,
      include_stats=single_process)

  run = _Run(experiment=experiment, layout=layout, checkpointer=checkpointer,
             reporter=reporter, evaluator=evaluation.Evaluator(task, layout),
             train_iter=train_iter, hooks=tuple(hooks))
  try:
    result = run.train(state, batches, start_time)
  finally:
    checkpointer.close()
    reporter.close()
  if result.preempted:
    logging.warning("Preempted at step %d: checkpoint saved; run the same "
                    "command again to resume.", result.step)
  else:
    line = final_line(result.step, result.eval_metrics, result.wall_s,
                      getattr(task, "summary_metrics", SUMMARY_METRICS))
    logging.info("%s", line)
    if multihost.is_main_process():
      print(line, flush=True)
  return result


def create_layout(config: ml_collections.ConfigDict,
                  batch_spec: Mapping[str, jax.ShapeDtypeStruct], *,
                  task: tasks.Task | None = None,
                  mesh: jax.sharding.Mesh | None = None
                  ) -> train_state.StateLayout:
  """Returns the train state layout of `config` for global batches.

  Reads no data and allocates no state, so it also serves to inspect the
  compiled train step of any config and batch shape:
  `train_state.make_train_step(layout).lower(layout.abstract,
  layout.batch_spec).compile()` (`experiments/bench_expert_parallel.py`).

  Args:
    config: the experiment config.
    batch_spec: global shapes and dtypes of a train batch (shardings are
      set here: the batch is split over all devices).
    task: the task; default `tasks.create_task(config)`.
    mesh: the mesh; default the one of `config.mesh`.

  Returns:
    The layout: model, optimizer, mesh, abstract state and its shardings.
  """
  experiment = experiment_lib.ExperimentConfig.from_config(config)
  mesh = mesh or partitioning.create_mesh(experiment.mesh.expert)
  task = tasks.create_task(config) if task is None else task
  optimizer = optimizers.create_optimizer(
      experiment.optimizer,
      experiment.total_steps // experiment.optimizer.accumulation_steps)
  sharding = partitioning.batch_sharding(mesh)
  batch_spec = {key: jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                          sharding=sharding)
                for key, spec in batch_spec.items()}
  return train_state.StateLayout.create(task, optimizer, batch_spec, mesh,
                                        experiment.mesh)


def _resume_or_start(
    checkpointer: checkpoints.Checkpointer, layout: train_state.StateLayout,
    train_iter: tasks.TrainIterator, first_batch: dict[str, Any], seed: int,
    init_params_fn: train_state.InitParamsFn | None
) -> tuple[train_state.TrainState, Iterator[dict[str, Any]]]:
  """Returns the state to train from and the local batches to train on.

  The latest checkpoint that reads and verifies (checksums, finite values,
  a data state the iterator accepts) gives the state and the data position;
  without one, the state is fresh and the batches start with `first_batch`
  (already taken from `train_iter` to learn the batch shapes).
  """
  restored = checkpointer.restore_latest(layout.abstract,
                                         set_aside_unreadable=True,
                                         check_data_state=train_iter.set_state)
  if restored is None:
    logging.info("No checkpoint in %s: starting from scratch.",
                 checkpointer.directory)
    state = layout.initialize(seed, init_params_fn)
    return state, itertools.chain([first_batch], train_iter)
  # restore_latest checked the data state with train_iter.set_state, which
  # left the iterator at the restored position.
  logging.info("Resuming from the checkpoint of step %d%s.", restored.step,
               "" if init_params_fn is None else
               " (config.init_from applies to fresh starts only)")
  return restored.state, train_iter


@dataclasses.dataclass
class _Run:
  """The parts the loop drives; `train` runs the steps."""
  experiment: experiment_lib.ExperimentConfig
  layout: train_state.StateLayout
  checkpointer: checkpoints.Checkpointer
  reporter: metrics_writing.Reporter
  evaluator: evaluation.Evaluator
  train_iter: tasks.TrainIterator
  hooks: tuple[Hook, ...]

  def train(self, state: train_state.TrainState,
            batches: Iterator[dict[str, Any]],
            start_time: float) -> TrainResult:
    """Runs the steps from `state.step` to `total_steps`."""
    total_steps = self.experiment.total_steps
    train_step = train_state.make_train_step(self.layout)
    pending = train_metrics.TrainMetrics()
    step = int(metrics_writing.to_host_scalar(state.step))
    train_scalars, eval_scalars = {}, {}
    preempted = False
    with preemption.PreemptionWatcher() as watcher:
      while step < total_steps and not preempted:
        batch = partitioning.shard_batch(next(batches), self.layout.mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = train_step(state, batch)
        step += 1
        pending.add(step, metrics)
        self.reporter.on_step(step)
        for hook in self.hooks:
          hook(step, state)

        preempted = watcher.reached(step)
        last = step == total_steps
        # A preempted job saves at once: the grace period is short.
        evaluate = not preempted and (
            last or step % self.experiment.evaluation.every_steps == 0)
        save = preempted or last or self.checkpointer.should_save(step)
        if save or evaluate or step % self.experiment.logging.every_steps == 0:
          train_scalars = pending.flush(state)
          self.reporter.write_scalars(step, train_scalars)
        if evaluate:
          with self.reporter.timed("eval"):
            eval_scalars = self.evaluator(state.params, state.step)
          self.reporter.write_scalars(step, eval_scalars)
        if save:
          self.checkpointer.save(
              step, state, self.train_iter.get_state(),
              metrics=eval_scalars if evaluate else None,
              force=preempted or last)
    if not eval_scalars and not preempted:
      eval_scalars = self.evaluator(state.params, state.step)
    return TrainResult(step=step, state=state, train_metrics=train_scalars,
                       eval_metrics=eval_scalars,
                       wall_s=time.monotonic() - start_time,
                       preempted=preempted)
