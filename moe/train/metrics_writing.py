"""Metric writing and progress reports for the training loop (clu).

`Reporter` bundles what a loop needs: clu metric writers (TensorBoard event
files in the workdir and the console/absl log) and clu periodic actions
(progress with steps/s and ETA, optional profiling). Only process 0 writes;
on the other processes every method is a no-op, so the loop calls them
unconditionally:

  reporter = Reporter(workdir, total_steps=total_steps)
  reporter.write_hparams(config)
  reporter.log_parameter_overview(params)
  for step in range(first_step, total_steps + 1):
    ...
    reporter.on_step(step)
    if step % log_every == 0:
      reporter.write_scalars(step, {"train_loss": loss, "lr": lr})
    if step % eval_every == 0:
      with reporter.timed("eval"):
        reporter.write_scalars(step, evaluate())
  reporter.close()
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from moe.parallel import multihost


class Reporter:
  """Writes metrics and reports progress; only process 0 writes.

  Attributes:
    writer: the clu MetricWriter (TensorBoard + logging on process 0, one
      that writes nothing elsewhere).
    is_writing: whether this process writes.
  """

  def __init__(self, workdir: os.PathLike | str, total_steps: int | None, *,
               progress_every_steps: int | None = None,
               progress_every_secs: float | None = 60.0,
               profile: bool = False,
               asynchronous: bool = True):
    """Creates the writers and periodic actions.

    Args:
      workdir: directory of the TensorBoard event files (and profiles).
      total_steps: last step of the run, used for the ETA.
      progress_every_steps: report progress (steps/s, ETA) every so many
        steps; None: only by time.
      progress_every_secs: report progress at most this often in seconds;
        None: only by steps.
      profile: capture a few steps with the jax profiler (clu's default
        schedule: shortly after the start, then hourly) into the workdir.
      asynchronous: write in a background thread.
    """
    self.is_writing = multihost.is_main_process()
    self._actions = []
    if not self.is_writing:
      self.writer = metric_writers.MultiWriter([])
      return
    self.writer = metric_writers.create_default_writer(
        os.fspath(workdir), asynchronous=asynchronous)
    self._progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=self.writer,
        every_steps=progress_every_steps, every_secs=progress_every_secs)
    self._actions.append(self._progress)
    if profile:
      self._actions.append(periodic_actions.Profile(logdir=os.fspath(workdir)))

  def on_step(self, step: int) -> None:
    """Runs the periodic actions; call once after every train step."""
    for action in self._actions:
      action(step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalars (Python numbers, numpy or replicated jax arrays)."""
    if self.is_writing:
      self.writer.write_scalars(step, {
          name: to_host_scalar(value) for name, value in scalars.items()})

  def write_hparams(self, config: ml_collections.ConfigDict | Mapping[str, Any]
                    ) -> None:
    """Writes the flattened config as TensorBoard hyper-parameters."""
    if not self.is_writing:
      return
    values = config.to_dict() if isinstance(
        config, ml_collections.ConfigDict) else dict(config)
    self.writer.write_hparams(_flatten_hparams(values))

  def log_parameter_overview(self, params: Any,
                             include_stats: bool = True) -> None:
    """Logs a table of parameter names, shapes, sizes (and statistics).

    Args:
      params: the parameters; arrays, or `jax.ShapeDtypeStruct`s without
        `include_stats`.
      include_stats: also log mean and std, which reads the values (they
        must be fully addressable by this process).
    """
    if self.is_writing:
      parameter_overview.log_parameter_overview(params,
                                                include_stats=include_stats)

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Measures a part of the loop (e.g. 'eval'), shown in progress reports."""
    if not self.is_writing:
      yield
      return
    with self._progress.timed(name):
      yield

  def flush(self) -> None:
    """Writes out everything buffered."""
    self.writer.flush()

  def close(self) -> None:
    """Flushes and closes the writers."""
    self.writer.close()


def to_host_scalar(value: Any) -> float | int:
  """Returns a scalar as a Python number.

  A jax Array spanning several processes must be replicated (as reductions
  out of a jitted step are); its local copy is read.

  Args:
    value: a Python number, numpy scalar or scalar jax Array.

  Returns:
    A Python float or int.
  """
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = value.addressable_data(0)
  return np.asarray(value).item()


def _flatten_hparams(values: Mapping[str, Any], prefix: str = ""
                     ) -> dict[str, Any]:
  """Flattens nested dicts to 'a.b' keys; non-scalar values become strings."""
  flat = {}
  for key, value in values.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten_hparams(value, f"{name}."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


def read_scalars(logdir: os.PathLike | str) -> dict[str, list[tuple[int, float]]]:
  """The scalars a `Reporter` wrote to the event files in `logdir`.

  Args:
    logdir: a run's workdir.

  Returns:
    {tag: [(step, value), ...]} in the order written, e.g.
    `read_scalars(workdir)["eval_loss"]`; tags of other tensors (hparams)
    are left out.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(
      os.fspath(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()[event_accumulator.TENSORS]:
    values = [(event.step, tensor_util.make_ndarray(event.tensor_proto))
              for event in accumulator.Tensors(tag)]
    if all(value.ndim == 0 and value.dtype.kind in "fiu"
           for _, value in values):
      scalars[tag] = [(step, float(value)) for step, value in values]
  return scalars
