"""`python -m moe.main` reports user errors in one line with status 2."""
import os
import re
import subprocess
import sys

import pytest

import train_testing


def _run(tmp_path, *flags):
  command = [sys.executable, "-m", "moe.main", "--config",
             os.path.join(train_testing.CONFIGS, "digits_vit.py:runlocal"),
             f"--workdir={tmp_path / 'run'}", *flags]
  return subprocess.run(command, capture_output=True, text=True,
                        timeout=300, check=False, cwd=tmp_path)


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.learnin_rate=0.1",
     r'error: no such config field \'learnin_rate\' Did you mean '
     r'"learning_rate" instead of "learnin_rate"\?'),
    ("--config.optimizer.learning_rate=nan",
     r"error: config.optimizer.learning_rate must be a number >= 0.0, finite "
     r"in float32 \(<= 3.4e38\); got nan\."),
    ("--config.dataset.name=no_such_dataset",
     r"error: Dataset 'no_such_dataset' is not prepared in data dir .*"),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, flag, message):
  process = _run(tmp_path, flag, f"--config.dataset.data_dir={tmp_path}")
  assert process.returncode == 2, process.stderr[-3000:]
  assert "Traceback" not in process.stderr
  lines = process.stderr.rstrip().splitlines()
  assert lines[-1] == "(run again with --verbose_errors for the traceback)"
  assert re.fullmatch(message, lines[-2]), lines[-2]
  assert len(lines[-2]) < 700


def test_verbose_errors_shows_the_traceback(tmp_path):
  process = _run(tmp_path, "--config.optimizer.learning_rate=nan",
                 "--verbose_errors")
  assert process.returncode != 0
  assert "Traceback" in process.stderr and "ValueError" in process.stderr
