"""Tests of moe.train.workdir_lock: one run per workdir."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from moe.train import trainer
from moe.train import workdir_lock
import train_testing


def test_a_second_lock_fails_at_once_naming_the_owner(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):
    owner = json.loads((tmp_path / "lock.json").read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"workdir {tmp_path} is in use by another run: "
                       rf"pid {os.getpid()} on host .*; stop it, or pass "
                       r"another --workdir\.$"):
      workdir_lock.WorkdirLock(tmp_path).acquire()
  # Released: the next run gets it, without a warning.
  with workdir_lock.WorkdirLock(tmp_path):
    pass


def _dead_pid():
  process = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      capture_output=True, text=True, check=True)
  return int(process.stdout)


@pytest.mark.parametrize("local", [True, False])
def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog,
                                                         monkeypatch, local):
  stale = {"host": socket.gethostname(), "pid": _dead_pid(),
           "started": "2026-01-01T00:00:00"}
  (tmp_path / "lock.json").write_text(json.dumps(stale))
  # The object protocol of remote storage, exercised on a local path.
  monkeypatch.setattr(workdir_lock.WorkdirLock, "_local", local)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(tmp_path):
      assert json.loads((tmp_path / "lock.json").read_text())["pid"] == (
          os.getpid())
  assert any(f"Taking over the lock of pid {stale['pid']}" in r.getMessage()
             for r in caplog.records)


def test_a_live_owner_on_remote_storage_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock.WorkdirLock, "_local", False)
  owner = {"host": "another-host", "pid": 1, "started": "2026-01-01T00:00:00"}
  (tmp_path / "lock.json").write_text(json.dumps(owner))
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=r"pid 1 on host another-host .*if it was killed, "
                     r"delete .*lock\.json"):
    workdir_lock.WorkdirLock(tmp_path).acquire()


def test_train_and_evaluate_refuses_a_workdir_in_use(digits_data_dir,
                                                     tmp_path):
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}")
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError, match="is in use"):
      trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
