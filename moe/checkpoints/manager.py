"""Checkpoints of the train state and the data iterator, with orbax.

One format: an orbax `CheckpointManager` directory, `WORKDIR/checkpoints`,
with one sub-directory per saved step:

  WORKDIR/checkpoints/<step>/state/     the train state (any pytree of jax
                                        Arrays: params, optimizer state,
                                        step, rng), orbax StandardSave.
  WORKDIR/checkpoints/<step>/data/process_<i>.json
                                        the data iterator state of process i
                                        (a JSON-able dict).
  WORKDIR/checkpoints/<step>/integrity/process_<i>.json
                                        the checksum of every array of the
                                        state (`moe.checkpoints.integrity`;
                                        the same in every process's file).

A state with NaN or infinite values is never saved. Restoring verifies the
checksums, the finiteness and (with `check_data_state`) the data state;
`restore_latest` skips a checkpoint that fails, with a one-line warning
naming the step and why, and can set it aside as `<step>.unreadable`.

Orbax writes a step to a temporary directory and renames it when every
process has finished, so a step directory is complete or absent. Every
process calls `save` and `restore` (arrays are written cooperatively, each
process its own shards); each process writes and reads only its own
iterator-state file, so a job must be resumed with the same number of
processes.

Typical use in a trainer:

  ckpt = Checkpointer.from_config(workdir, config.checkpoint)
  restored = ckpt.restore_latest(abstract_state)   # None on a fresh start
  ...
  ckpt.save(step, state, data_state, force=step == total_steps)
  ckpt.close()

`restore_checkpoint(path, abstract_state)` and `restore_params(path)` read a
checkpoint given as a workdir, its checkpoint directory or a step directory;
the latter reads only the parameters, as numpy arrays with their saved
shapes, for initialising another run (`moe.checkpoints.init_from`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy
from orbax.checkpoint.checkpoint_managers import save_decision_policy

from moe.checkpoints import integrity
from moe.config import schema
from moe.parallel import multihost

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
INTEGRITY_ITEM = "integrity"
BEST_MODES = ("max", "min")
UNREADABLE_SUFFIX = ".unreadable"

PyTree = Any
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpointing, `config.checkpoint`.

  Attributes:
    every_steps: save when the step is a multiple of this, when
      `save(..., force=True)` is called (e.g. at the end), and at the
      preemption sync point of a multi-process job (jax's preemption
      notice service).
    keep: number of most recent checkpoints kept.
    best_metric: also keep the checkpoint with the best value of this metric
      among those saved with metrics (e.g. 'eval_accuracy'); None: only the
      most recent ones.
    best_mode: 'max' or 'min', whether a larger `best_metric` is better.
    asynchronous: write in a background thread while training goes on.
  """
  every_steps: int = 1000
  keep: int = 3
  best_metric: str | None = None
  best_mode: str = "max"
  asynchronous: bool = True

  def __post_init__(self):
    schema.check_int(self.every_steps, "config.checkpoint.every_steps",
                     1)
    schema.check_int(self.keep, "config.checkpoint.keep", 1)
    schema.check_choice(self.best_mode, "config.checkpoint.best_mode",
                        BEST_MODES)


class Restored(NamedTuple):
  """A restored checkpoint.

  Attributes:
    step: the step it was saved at.
    state: the train state, with the structure and shardings of the target.
    data_state: this process's data iterator state.
  """
  step: int
  state: PyTree
  data_state: dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint path that is missing, empty or unreadable."""


def absolute_path(path: os.PathLike | str) -> epath.Path:
  """`path`, a local one made absolute against the current directory
  (orbax refuses relative paths); URLs such as `gs://...` unchanged."""
  if "://" in str(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


class Checkpointer:
  """Saves and restores train states in one checkpoint directory.

  Attributes:
    directory: the checkpoint directory (WORKDIR/checkpoints).
    config: the `CheckpointConfig`.
  """

  def __init__(self, directory: os.PathLike | str,
               config: CheckpointConfig = CheckpointConfig(),
               read_only: bool = False):
    """Opens (or creates, unless `read_only`) the checkpoint directory."""
    self.directory = absolute_path(directory)
    self.config = config
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: _process_json_handler(),
            INTEGRITY_ITEM: _process_json_handler(),
        },
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_policy.AnySavePolicy([
                save_decision_policy.FixedIntervalPolicy(config.every_steps),
                save_decision_policy.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=_preservation_policy(config),
            enable_async_checkpointing=config.asynchronous,
            create=not read_only,
            read_only=read_only,
        ))

  @classmethod
  def from_config(cls, workdir: os.PathLike | str,
                  config: Any = None) -> "Checkpointer":
    """Opens WORKDIR/checkpoints with `config.checkpoint` (a ConfigDict, a
    dict, None or a `CheckpointConfig`)."""
    config = schema.parse_section(CheckpointConfig, config,
                                  "config.checkpoint")
    return cls(epath.Path(workdir) / CHECKPOINT_SUBDIR, config)

  def all_steps(self) -> list[int]:
    """Returns the saved steps, ascending (pending async saves excluded)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the most recent saved step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would write a checkpoint (without `force`)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree,
           data_state: Mapping[str, Any] | None = None, *,
           metrics: Mapping[str, float] | None = None,
           force: bool = False) -> bool:
    """Saves a checkpoint if `step` is due (or `force`); every process calls it.

    Args:
      step: the train step.
      state: the train state, a pytree of jax Arrays.
      data_state: this process's data iterator state, a JSON-able dict.
      metrics: scalars (Python or numpy numbers, or fully addressable jax
        scalars) ranking this checkpoint for `best_metric`; they must contain
        it when given.
      force: save even if `step` is not a multiple of `every_steps`.

    Returns:
      Whether a save was started (it may still be running; see
      `wait_until_finished`).

    Raises:
      CheckpointError: if `state` holds NaN or infinite values (nothing is
        written).
    """
    best_metric = self.config.best_metric
    if metrics is not None and best_metric and best_metric not in metrics:
      raise ValueError(
          f"config.checkpoint.best_metric={best_metric!r} is missing from the "
          f"metrics given to save(): {sorted(metrics)}.")
    if not (force or self.should_save(step)):
      return False
    digest = integrity.digest(state)
    non_finite = integrity.non_finite(digest)
    if non_finite:
      raise CheckpointError(
          f"refusing to save step {step}: {len(non_finite)} arrays of the "
          f"state are not finite, first {', '.join(non_finite[:3])}.")
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
        INTEGRITY_ITEM: ocp.args.JsonSave(
            {"algorithm": integrity.ALGORITHM,
             "checksums": digest.checksums}),
    })
    if metrics is not None:
      metrics = {name: float(value) for name, value in metrics.items()}
    return self._manager.save(step, args=args, force=force, metrics=metrics)

  def restore(self, step: int, abstract_state: PyTree,
              with_data_state: bool = True,
              check_data_state: Callable[[dict[str, Any]], None] | None = None
              ) -> Restored:
    """Restores the checkpoint of `step` and verifies it.

    Verification: every array's checksum equals the one recorded at save
    time (`moe.checkpoints.integrity`; checkpoints written before checksums
    were recorded are restored with a warning), every float is finite, and
    `check_data_state` accepts the data state. The checksums and the
    finiteness are computed on the global arrays, so every process of a
    multi-host job reaches the same verdict; the data states (one per
    process) are agreed on across processes.

    Args:
      step: a saved step.
      abstract_state: the target structure: a tree of jax.ShapeDtypeStruct
        with shardings (see `partitioning.abstract_arrays`), or of arrays
        whose shapes, dtypes and shardings are used.
      with_data_state: also read this process's data iterator state; False
        (e.g. to initialise a fine-tuning run) returns an empty dict.
      check_data_state: raises ValueError / TypeError / KeyError for a data
        state the iterator cannot use (e.g. `TrainIterator.set_state`).

    Returns:
      The `Restored` checkpoint.

    Raises:
      CheckpointError: if the step is not saved, cannot be read or fails
        verification (the message says why).
    """
    if step not in self.all_steps():
      raise CheckpointError(
          f"no checkpoint of step {step} in {self.directory}; saved steps: "
          f"{self.all_steps()}.")
    items = {STATE_ITEM: ocp.args.StandardRestore(_abstract(abstract_state))}
    if with_data_state:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    if (self.directory / str(step) / INTEGRITY_ITEM).exists():
      items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many error types.
      raise CheckpointError(
          f"cannot restore the checkpoint {self.directory / str(step)}: "
          f"{_short(e)}") from e
    data_state = dict(restored[DATA_ITEM]) if with_data_state else {}
    record = restored.get(INTEGRITY_ITEM) if INTEGRITY_ITEM in items else None
    problems = _state_problems(restored[STATE_ITEM], record,
                               self.directory / str(step))
    local = _data_state_problem(data_state, check_data_state)
    if multihost.any_process(local is not None):
      problems.append(local or "another process cannot use its data state")
    if problems:
      raise CheckpointError(
          f"the checkpoint {self.directory / str(step)} fails verification: "
          f"{'; '.join(problems)}.")
    return Restored(step, restored[STATE_ITEM], data_state)

  def restore_latest(
      self, abstract_state: PyTree, with_data_state: bool = True,
      set_aside_unreadable: bool = False,
      check_data_state: Callable[[dict[str, Any]], None] | None = None
  ) -> Restored | None:
    """Restores the most recent readable checkpoint, or returns None if none.

    A checkpoint that cannot be read (truncated) or fails verification
    (checksums, non-finite values, an unusable data state; see `restore`)
    is skipped with a one-line warning naming the step and why, and the
    previous one is tried. In a multi-process job the checkpoint directory
    must be shared storage, so that every process sees the same failures and
    falls back to the same step.

    Args:
      abstract_state: the target structure, as in `restore`.
      with_data_state: as in `restore`.
      check_data_state: as in `restore`.
      set_aside_unreadable: after falling back to an older step, rename the
        skipped step directories to `<step>.unreadable[.<n>]` (kept for
        inspection, ignored as checkpoints), so that a resumed run can save
        those steps again.

    Returns:
      The `Restored` checkpoint, or None if the directory holds no step.

    Raises:
      CheckpointError: if steps exist but none of them can be read.
    """
    return self.latest_readable(
        lambda step: self.restore(step, abstract_state, with_data_state,
                                  check_data_state),
        set_aside_unreadable)

  def restore_params(self, step: int) -> PyTree:
    """Restores only the parameters of `step`, as host numpy arrays.

    Nothing about the run that saved them is needed: shapes and dtypes come
    from the checkpoint's metadata, and the optimizer state, step and rng are
    not read (the saving run may have used another optimizer). Every process
    reads the whole arrays.

    Args:
      step: a saved step.

    Returns:
      The `params` subtree of the saved train state, numpy arrays with their
      saved shapes and dtypes.

    Raises:
      CheckpointError: if the step is not saved, cannot be read or holds no
        `params`.
    """
    if step not in self.all_steps():
      raise CheckpointError(
          f"no checkpoint of step {step} in {self.directory}; saved steps: "
          f"{self.all_steps()}.")
    state_dir = self.directory / str(step) / STATE_ITEM
    try:
      with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(state_dir).item_metadata
        if "params" not in metadata:
          raise CheckpointError(
              f"the checkpoint {state_dir} holds no 'params' (its top-level "
              f"entries: {sorted(metadata)}).")
        target = {"params": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
            metadata["params"])}
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except CheckpointError:
      raise
    except Exception as e:  # orbax and tensorstore raise many error types.
      raise CheckpointError(
          f"cannot restore the parameters of {self.directory / str(step)}: "
          f"{_short(e)}") from e
    record = _read_integrity_record(self.directory / str(step))
    if record is not None:
      record = dict(record, checksums={
          name: value for name, value in record["checksums"].items()
          if name.startswith("params/")})
    problems = _state_problems({"params": restored["params"]}, record,
                               self.directory / str(step))
    if problems:
      raise CheckpointError(
          f"the parameters of {self.directory / str(step)} fail "
          f"verification: {'; '.join(problems)}.")
    return restored["params"]

  def latest_readable(self, restore_step: Callable[[int], T],
                      set_aside_unreadable: bool = False) -> T | None:
    """Returns `restore_step(step)` for the most recent readable step.

    Unreadable steps are skipped as in `restore_latest`, whose arguments and
    errors these are; `restore_step` raises `CheckpointError` for them.
    """
    errors, unreadable = [], []
    for step in reversed(self.all_steps()):
      try:
        restored = restore_step(step)
      except CheckpointError as e:
        logging.warning("Skipping unreadable checkpoint: %s", e)
        errors.append(str(e))
        unreadable.append(step)
        continue
      if set_aside_unreadable and unreadable:
        self._set_aside(unreadable)
      return restored
    if errors:
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}:\n" + "\n".join(errors))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames step directories out of the way (process 0), then syncs."""
    if jax.process_index() == 0:
      for step in steps:
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
        copies = 0
        while target.exists():
          copies += 1
          target = self.directory / f"{step}{UNREADABLE_SUFFIX}.{copies}"
        logging.warning("Renaming the unreadable checkpoint %s to %s.",
                        self.directory / str(step), target)
        (self.directory / str(step)).rename(target)
    multihost_utils.sync_global_devices("moe_checkpoints_set_aside")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_checkpoint(path: os.PathLike | str, abstract_state: PyTree,
                       with_data_state: bool = True) -> Restored:
  """Restores a checkpoint from a workdir, a checkpoint dir or a step dir.

  Args:
    path: a run's WORKDIR, its WORKDIR/checkpoints (both: the latest readable
      step), or one step directory WORKDIR/checkpoints/<step>.
    abstract_state: the target structure, as in `Checkpointer.restore`.
    with_data_state: as in `Checkpointer.restore`.

  Returns:
    The `Restored` checkpoint.

  Raises:
    CheckpointError: if `path` does not exist or holds no readable checkpoint.
  """
  return _restore_from_path(
      path, lambda checkpointer, step: checkpointer.restore(
          step, abstract_state, with_data_state))


def restore_params(path: os.PathLike | str) -> PyTree:
  """Restores only the parameters of a checkpoint, as host numpy arrays.

  For initialising another run (fine-tuning): see
  `Checkpointer.restore_params`.

  Args:
    path: a run's WORKDIR, its WORKDIR/checkpoints (both: the latest readable
      step), or one step directory WORKDIR/checkpoints/<step>.

  Returns:
    The saved `params` tree of numpy arrays.

  Raises:
    CheckpointError: if `path` does not exist or holds no readable checkpoint.
  """
  return _restore_from_path(
      path, lambda checkpointer, step: checkpointer.restore_params(step))


def _restore_from_path(path: os.PathLike | str,
                       restore_step: Callable[["Checkpointer", int], T]) -> T:
  """Calls `restore_step` on the step that a workdir, checkpoint or step
  directory designates (for a directory of steps: the latest readable)."""
  path = epath.Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist.")
  if (path / STATE_ITEM).exists() and path.name.isdigit():
    with Checkpointer(path.parent, read_only=True) as checkpointer:
      return restore_step(checkpointer, int(path.name))
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  with Checkpointer(path, read_only=True) as checkpointer:
    restored = checkpointer.latest_readable(
        lambda step: restore_step(checkpointer, step))
  if restored is None:
    raise CheckpointError(
        f"{path} holds no checkpoint: expected a workdir, its "
        f"'{CHECKPOINT_SUBDIR}' directory or a step directory inside it.")
  return restored


def _state_problems(state: PyTree, record: Mapping[str, Any] | None,
                    step_dir: epath.Path) -> list[str]:
  """What is wrong with a restored state: checksums, non-finite values."""
  digest = integrity.digest(state)
  problems = []
  if record is None:
    logging.warning("The checkpoint %s has no checksums (written before they "
                    "were recorded); restored without verifying them.",
                    step_dir)
  elif record.get("algorithm") != integrity.ALGORITHM:
    problems.append(f"checksums of unknown algorithm "
                    f"{record.get('algorithm')!r}")
  else:
    changed = integrity.mismatches(dict(record["checksums"]), digest)
    if changed:
      problems.append(f"{len(changed)} arrays differ from their checksums, "
                      f"first {', '.join(changed[:3])}")
  non_finite = integrity.non_finite(digest)
  if non_finite:
    problems.append(f"{len(non_finite)} arrays hold NaN or infinity, first "
                    f"{', '.join(non_finite[:3])}")
  return problems


def _short(error: Exception, limit: int = 300) -> str:
  """One line for a storage error: its type and message, without
  tensorstore's spec dumps, at most `limit` characters."""
  text = " ".join(str(error).split(" [tensorstore_spec")[0].split())
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}"


def _read_integrity_record(step_dir: epath.Path) -> dict[str, Any] | None:
  """This process's checksum record of a step, or None if it has none."""
  path = step_dir / INTEGRITY_ITEM / f"process_{jax.process_index()}.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise CheckpointError(f"cannot read the checksums {path}: {e}") from e


def _data_state_problem(
    data_state: dict[str, Any],
    check: Callable[[dict[str, Any]], None] | None) -> str | None:
  if check is None:
    return None
  try:
    check(data_state)
  except (ValueError, TypeError, KeyError) as e:
    return f"data state {data_state!r} unusable: {e}"
  return None


def _process_json_handler() -> ocp.JsonCheckpointHandler:
  """Returns a JSON handler where every process writes its own file."""
  return ocp.JsonCheckpointHandler(
      filename=f"process_{jax.process_index()}.json",
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=None))


def _preservation_policy(
    config: CheckpointConfig) -> preservation_policy.PreservationPolicy:
  """Keeps the last `keep` checkpoints, plus the best one if configured."""
  latest = preservation_policy.LatestN(n=config.keep)
  if config.best_metric is None:
    return latest
  best = preservation_policy.BestN(
      get_metric_fn=lambda metrics: metrics[config.best_metric],
      reverse=config.best_mode == "min",
      n=1,
      keep_checkpoints_without_metrics=False)
  return preservation_policy.AnyPreservationPolicy([latest, best])


def _abstract(tree: PyTree) -> PyTree:
  """Returns ShapeDtypeStructs (with shardings) for arrays; keeps the others."""
  def to_abstract(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(to_abstract, tree)
