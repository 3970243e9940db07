"""Preemption: notice SIGTERM and agree on the step to checkpoint at.

Schedulers announce a preemption with SIGTERM and kill the job a little
later. The loop asks `PreemptionWatcher.reached(step)` after every step; when
it says yes, the loop saves a checkpoint of that step and stops.

- One process: the watcher installs a SIGTERM handler (while it is entered)
  that only records the signal; the next `reached` call returns True.
- Several processes: a signal reaches some processes and not others, yet all
  must save the same step. `jax.distributed.initialize` starts jax's
  preemption sync manager, which listens for SIGTERM itself and agrees with
  the other processes on a step (`multihost_utils.
  reached_preemption_sync_point`); `reached` returns True on every process
  at that step. The watcher then installs nothing.
"""
from __future__ import annotations

import signal
import threading
import types

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Context manager telling the loop when to save and stop.

  Attributes:
    signum: the signal that announces a preemption.
  """

  def __init__(self, signum: int = signal.SIGTERM):
    self.signum = signum
    self._received = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatcher":
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(self.signum, self._record)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(self.signum, self._previous)
      self._installed = False

  def _record(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    self._received = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint at `step` and stop; call after every step.

    Args:
      step: the number of train steps done; every process passes the same
        sequence of steps.

    Returns:
      True once a preemption notice has arrived (in a multi-process job: at
      the step all processes agreed on).
    """
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received
