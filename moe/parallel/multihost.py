"""Multi-process start-up: `jax.distributed` only for multi-process jobs.

`maybe_initialize_distributed()` must run before anything touches a jax
backend (first thing in `main`). It calls `jax.distributed.initialize` when,
in this order of precedence:

1. Explicit settings say so: the arguments, else the environment variables
   MOE_COORDINATOR_ADDRESS ('host:port' of process 0), MOE_NUM_PROCESSES and
   MOE_PROCESS_ID. With more than one process, all three are required and
   passed to `initialize`; a process count of 1 means single-process.
2. A cluster environment with more than one process, which jax then detects
   on its own (`initialize()` without arguments):
   - SLURM: SLURM_JOB_ID set and SLURM_NTASKS > 1 (run under `srun`);
   - Open MPI: OMPI_COMM_WORLD_SIZE > 1 (run under `mpirun`);
   - Cloud TPU on GKE or multi-slice: TPU_WORKER_HOSTNAMES listing several
     hosts, or MEGASCALE_COORDINATOR_ADDRESS set.
3. `force=True` (e.g. a `--multiprocess` flag), for clusters jax detects but
   this module cannot, like multi-host Cloud TPU VMs started with
   `gcloud ... --worker=all`: `initialize()` without arguments.

Otherwise nothing is called, so one process on a laptop or a single TPU/GPU
host just works. Local multi-process test on one machine (two terminals):

  MOE_COORDINATOR_ADDRESS=localhost:12355 MOE_NUM_PROCESSES=2 \\
      MOE_PROCESS_ID=0 python -m moe.main ...
  MOE_COORDINATOR_ADDRESS=localhost:12355 MOE_NUM_PROCESSES=2 \\
      MOE_PROCESS_ID=1 python -m moe.main ...
"""
from __future__ import annotations

import os
from typing import Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

COORDINATOR_ADDRESS_VAR = "MOE_COORDINATOR_ADDRESS"
NUM_PROCESSES_VAR = "MOE_NUM_PROCESSES"
PROCESS_ID_VAR = "MOE_PROCESS_ID"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
    environ: Mapping[str, str] | None = None) -> bool:
  """Initialises `jax.distributed` if this job runs on several processes.

  Args:
    coordinator_address: 'host:port' of process 0; overrides
      MOE_COORDINATOR_ADDRESS.
    num_processes: number of processes; overrides MOE_NUM_PROCESSES.
    process_id: index of this process; overrides MOE_PROCESS_ID.
    force: initialise (with jax's own cluster detection) even if no
      multi-process environment is recognised.
    environ: the environment to inspect; default `os.environ`.

  Returns:
    Whether `jax.distributed` is initialised after the call (False: a
    single-process job).

  Raises:
    ValueError: if explicit settings ask for several processes but miss the
      coordinator address or the process id, or are not integers.
  """
  environ = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return True
  explicit = _explicit_settings(coordinator_address, num_processes,
                                process_id, environ)
  if explicit is not None:
    if explicit["num_processes"] == 1:
      return False
    logging.info("Initialising jax.distributed with %s.", explicit)
    jax.distributed.initialize(**explicit)
    return True
  cluster = detect_cluster(environ)
  if cluster is None and not force:
    return False
  logging.info("Initialising jax.distributed (detected: %s).",
               cluster or "forced")
  jax.distributed.initialize()
  return True


def _explicit_settings(coordinator_address: str | None,
                       num_processes: int | None, process_id: int | None,
                       environ: Mapping[str, str]) -> dict | None:
  """Returns the explicit initialize() arguments, or None if none are set."""
  address = coordinator_address or environ.get(COORDINATOR_ADDRESS_VAR) or None
  count = _as_int(num_processes if num_processes is not None
                  else environ.get(NUM_PROCESSES_VAR), NUM_PROCESSES_VAR)
  index = _as_int(process_id if process_id is not None
                  else environ.get(PROCESS_ID_VAR), PROCESS_ID_VAR)
  if address is None and count is None and index is None:
    return None
  if count is None:
    raise ValueError(
        f"{NUM_PROCESSES_VAR} (or num_processes) must be set when "
        f"{COORDINATOR_ADDRESS_VAR} or {PROCESS_ID_VAR} is.")
  if count < 1:
    raise ValueError(f"{NUM_PROCESSES_VAR} must be >= 1, got {count}.")
  if count > 1:
    if address is None or index is None:
      raise ValueError(
          f"{NUM_PROCESSES_VAR}={count} needs {COORDINATOR_ADDRESS_VAR} "
          f"('host:port' of process 0) and {PROCESS_ID_VAR} (0..{count - 1}).")
    if not 0 <= index < count:
      raise ValueError(
          f"{PROCESS_ID_VAR} must be in 0..{count - 1}, got {index}.")
  return dict(coordinator_address=address, num_processes=count,
              process_id=index)


def _as_int(value, name: str) -> int | None:
  """Returns `value` (an int or a decimal string) as an int, or None."""
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be an integer, got {value!r}.") from e


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the multi-process cluster environment jax will detect, or None.

  Args:
    environ: the environment to inspect; default `os.environ`.

  Returns:
    'slurm', 'openmpi' or 'cloud_tpu' when the environment describes more
    than one process of that kind, else None.
  """
  environ = os.environ if environ is None else environ
  if "SLURM_JOB_ID" in environ and _count(environ, "SLURM_NTASKS") > 1:
    return "slurm"
  if _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  tpu_hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
               if h.strip()]
  if len(tpu_hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "cloud_tpu"
  return None


def _count(environ: Mapping[str, str], name: str) -> int:
  """Returns the integer value of an environment variable, 0 if unset/bad."""
  try:
    return int(environ.get(name, "0"))
  except ValueError:
    return 0


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes logs and summaries."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process must call this)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
