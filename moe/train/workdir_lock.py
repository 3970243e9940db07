"""An exclusive lock on a workdir, so that two runs never share one.

Two runs writing the same checkpoints and event files corrupt both. A run
holds `WORKDIR/lock.json` (its owner: host, pid, start time) from start to
end (emptied at the end); a second run on the same workdir fails at once with one line naming
the owner.

  - Local (and NFS) directories: `fcntl.flock` on the file, which the kernel
    releases when the owner dies however it dies; a file left by a dead
    owner is taken over with a warning naming it.
  - Other storage (`gs://...`, where no lock primitive exists): the file is
    a lock object; it blocks a second run unless its owner is a process of
    this host that no longer exists (taken over with a warning). A run
    killed on another host leaves an object to delete by hand; the error
    says so. The object is checked, then written (no atomic create through
    `etils.epath`), so two runs started within the same moment could both
    pass.

In a multi-process job process 0 holds the lock and every process learns
whether it got it, so they all stop together.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, IO

from absl import logging
from etils import epath
import jax

from moe.parallel import multihost

LOCK_NAME = "lock.json"


class WorkdirLockedError(RuntimeError):
  """The workdir is in use by another run."""


def _owner() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _describe(owner: dict[str, Any]) -> str:
  return (f"pid {owner.get('pid')} on host {owner.get('host')} (started "
          f"{owner.get('started')})")


def _read_owner(text: str) -> dict[str, Any]:
  try:
    owner = json.loads(text)
  except ValueError:
    return {}
  return owner if isinstance(owner, dict) else {}


def _alive_here(owner: dict[str, Any]) -> bool:
  """Whether the owner is a live process of this host (or elsewhere)."""
  if owner.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(owner.get("pid", -1)), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError):
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock (see the module).

  Attributes:
    path: the lock file, `WORKDIR/lock.json`.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._file: IO[str] | None = None
    self._held = False

  @property
  def _local(self) -> bool:
    return "://" not in os.fspath(self.path)

  def acquire(self) -> None:
    """Takes the lock (process 0); every process raises if it failed.

    Raises:
      WorkdirLockedError: naming the owner, when another run holds it.
    """
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_local() if self._local else self._acquire_object()
        self._held = True
      except WorkdirLockedError as e:
        error = e
    failed = multihost.any_process(error is not None)
    if error is not None:
      raise error
    if failed:
      raise WorkdirLockedError(f"workdir {self.path.parent} is in use by "
                               "another run (process 0 could not lock it).")

  def _locked_error(self, owner: dict[str, Any], hint: str) -> None:
    raise WorkdirLockedError(
        f"workdir {self.path.parent} is in use by another run: "
        f"{_describe(owner)}; {hint}")

  def _acquire_local(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      handle.seek(0)
      owner = _read_owner(handle.read())
      handle.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      self._locked_error(owner, "stop it, or pass another --workdir.")
    handle.seek(0)
    previous = _read_owner(handle.read())
    if previous:
      logging.warning("Taking over the lock of %s, which no longer runs "
                      "(%s).", _describe(previous), self.path)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_owner()))
    handle.flush()
    self._file = handle

  def _acquire_object(self) -> None:
    if self.path.exists():
      owner = _read_owner(self.path.read_text())
      if _alive_here(owner):
        self._locked_error(owner, f"stop it, or if it was killed, delete "
                           f"{self.path}, or pass another --workdir.")
      logging.warning("Taking over the lock of %s, which no longer runs "
                      "(%s).", _describe(owner), self.path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(_owner()))

  def release(self) -> None:
    """Gives the lock back: empties the local file (kept, so that no other
    run can lock a file that is being removed) or deletes the object."""
    if not self._held:
      return
    self._held = False
    if self._file is None:
      self.path.unlink(missing_ok=True)
      return
    self._file.seek(0)
    self._file.truncate()
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
