r"""Trains and evaluates one experiment: the project's only entry point.

  python -m moe.main --config configs/digits_vmoe.py --workdir /tmp/moe_digits
  python -m moe.main --config configs/digits_vmoe.py:runlocal \
      --workdir /tmp/moe_digits --config.total_steps=200 \
      --config.model.encoder.moe.router.name=NoisyTopExpertsPerItem
  python -m moe.main --config configs/digits_ft_vmoe.py \
      --workdir /tmp/digits_ft --config.init_from.checkpoint=/tmp/digits_vit

`--config` is a Python file with `get_config(arg=None)`; the text after ':'
is passed as `arg`. `--config.a.b=value` overrides a field; the config is
locked, so a misspelt field is an error. Running the same command again
resumes from the checkpoints in `--workdir`; `--config.init_from.checkpoint`
(a run's workdir or a public ViT `.npz`, see `moe.checkpoints.init_from`) sets the
initial parameters of a run that does not resume. Multi-process jobs (several
hosts, or `launch/local.sh` on one machine) initialise `jax.distributed`
from the environment (see `moe.parallel.multihost`) or with `--multiprocess`.
A job stopped by SIGTERM saves a checkpoint and exits with status 143
(128 + SIGTERM).

User errors (a bad config value or field, a bad flag, a missing file or
dataset, a bad checkpoint, a workdir in use, a diverged run) print one line,
`error: ...`, and a hint, and exit with status 2 (`USAGE_EXIT_CODE`);
`--verbose_errors` shows their traceback instead. Anything else is a bug and
keeps its traceback.
"""
import ast
import logging as std_logging
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moe.parallel import multihost
from moe.train import trainer
from moe.train import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`get_config(arg)`).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of checkpoints and TensorBoard event files.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False,
    "Initialise jax.distributed with jax's own cluster detection even if the "
    "environment does not announce several processes (e.g. multi-host Cloud "
    "TPU VMs started by hand with `gcloud ... --worker=all`; launch/tpu.py "
    "sets the MOE_* variables instead).")
_VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors", False,
    "Show the traceback of user errors (bad config, missing files, bad "
    "checkpoints) instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
USAGE_EXIT_CODE = 2
# What a user can cause and fix; the message says how.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError,
               workdir_lock.WorkdirLockedError)
_HINT = "(run again with --verbose_errors for the traceback)"
# Libraries whose INFO messages (orbax: dozens per checkpoint) bury the
# trainer's; their warnings and errors still show.
_QUIET_LIBRARIES = ("/orbax/",)


def _drop_library_info(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or not any(
      library in record.pathname for library in _QUIET_LIBRARIES)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line; a missing field's repr unquoted."""
  text = str(error)
  if isinstance(error, (KeyError, AttributeError)):
    if text[:1] in "'\"":
      try:
        text = str(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        pass
    text = f"no such config field {text}"
  return " ".join(text.split())


def _fail(error: BaseException) -> None:
  print(f"error: {one_line(error)}\n{_HINT}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags; a bad flag or config is one line and status 2.

  Loading the config file and applying `--config.*` overrides happen here
  (a misspelt field, a value of the wrong type, a `get_config` error).
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose_errors" in argv:
      raise
    _fail(e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_drop_library_info)
  multihost.maybe_initialize_distributed(force=_MULTIPROCESS.value)
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    if _VERBOSE_ERRORS.value:
      raise
    _fail(e)
  if result.preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
