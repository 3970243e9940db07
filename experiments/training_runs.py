"""Running `moe.train` experiments from the paper scripts.

The training experiments (`moe_router.py`, `topk_loss_vit.py`) run configs
of `configs/` through `moe.train.trainer.train_and_evaluate`, exactly as
`python -m moe.main --config configs/<file>.py[:arg] --config.a.b=...` would,
with overrides set in Python:

  config = training_runs.load_config("digits_vmoe.py")
  config.model.encoder.moe.router.name = "TopItemsPerExpert"
  timer = training_runs.StepTimer()
  result = training_runs.train(config, hooks=[timer])   # fresh temp workdir
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from moe.train import trainer

import results_io

CONFIGS_DIR = results_io.REPO_ROOT / "configs"


def load_config(file_name: str,
                arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `configs/<file_name>`, loaded by path (unlocked).

  Args:
    file_name: e.g. "digits_vmoe.py".
    arg: the config's preset argument (the text after ':' of `--config`).

  Returns:
    The experiment config.
  """
  path = CONFIGS_DIR / file_name
  if not path.is_file():
    raise ValueError(f"no config {file_name!r} in {CONFIGS_DIR}")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_seed(config: ml_collections.ConfigDict, seed: int) -> None:
  """One seed for the parameters, the train rng and the data order."""
  config.seed = seed
  config.dataset.seed = seed


def evaluate_only_at_end(config: ml_collections.ConfigDict) -> None:
  """One evaluation and one checkpoint, after the last step (saves time)."""
  config.evaluation.every_steps = config.total_steps
  config.checkpoint.every_steps = config.total_steps
  config.checkpoint.keep = 1


def train(config: ml_collections.ConfigDict, workdir: str | None = None,
          hooks: Sequence[trainer.Hook] = ()) -> trainer.TrainResult:
  """Runs `train_and_evaluate`; in a fresh temporary workdir by default.

  Args:
    config: the experiment config.
    workdir: where checkpoints and event files go; it must not hold another
      run's checkpoints (the trainer would resume from them). None: a
      temporary directory, deleted afterwards.
    hooks: `hook(step, state)` after every train step.

  Returns:
    The `TrainResult`.
  """
  if workdir is not None:
    return trainer.train_and_evaluate(config, str(workdir), hooks=hooks)
  with tempfile.TemporaryDirectory(prefix="moe_experiment_") as tmp:
    return trainer.train_and_evaluate(config, tmp, hooks=hooks)


class StepTimer:
  """A train hook measuring the wall time of every step.

  Blocks on the state after each step, so an interval is the time of one
  whole step (input pipeline, dispatch, compute) and nothing overlaps
  between steps. Intervals containing an evaluation or a checkpoint save are
  outliers that the median ignores.

  Attributes:
    intervals: seconds between the ends of consecutive steps.
  """

  def __init__(self):
    self.intervals: list[float] = []
    self._last: float | None = None

  def __call__(self, step: int, state) -> None:
    del step
    jax.block_until_ready(state)
    now = time.perf_counter()
    if self._last is not None:
      self.intervals.append(now - self._last)
    self._last = now

  def median_ms(self, skip: int = 2) -> float:
    """Median step time in ms, without the first `skip` intervals.

    Args:
      skip: intervals left out (the first steps after compilation).

    Returns:
      The median, or NaN when no interval is left.
    """
    timed = self.intervals[skip:]
    return 1e3 * statistics.median(timed) if timed else float("nan")


def add_run_flags(parser: argparse.ArgumentParser,
                  presets: Mapping[str, Any]) -> None:
  """Adds the flags every training experiment takes.

  `--scale` (a key of `presets`, default "small"), `--config-arg` (the
  configs' preset argument, e.g. runlocal), `--seeds` (default 3) and
  `--seed` (the first seed).

  Args:
    parser: the script's parser.
    presets: the script's scales.
  """
  parser.add_argument("--scale", choices=tuple(presets), default="small")
  parser.add_argument("--config-arg", default=None,
                      help="the configs' preset argument, e.g. runlocal")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")


def check_at_least(value: int | Sequence[int], minimum: int,
                   flag: str) -> None:
  """Raises a ValueError naming `flag` unless every value is >= minimum."""
  values = [value] if isinstance(value, int) else list(value)
  if min(values) < minimum:
    raise ValueError(f"{flag} must be >= {minimum}, got {value}")
