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
"""
import logging as std_logging
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moe.parallel import multihost
from moe.train import trainer

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
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Libraries whose INFO messages (orbax: dozens per checkpoint) bury the
# trainer's; their warnings and errors still show.
_QUIET_LIBRARIES = ("/orbax/",)


def _drop_library_info(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or not any(
      library in record.pathname for library in _QUIET_LIBRARIES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_drop_library_info)
  multihost.maybe_initialize_distributed(force=_MULTIPROCESS.value)
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
