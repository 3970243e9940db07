r"""Dense ViT on the embedded digits: the baseline of `digits_vmoe.py`.

The same model, data and schedule as `configs/digits_vmoe.py`
(`moe.config.recipes.digits_config`) with a dense MLP in every block.

Command:

  python -m moe.main --config configs/digits_vit.py --workdir /tmp/digits_vit

Expected (measured on a 2-core CPU, 2026-11-21): about 2 minutes including
start-up, ending with

  final: step=1000 eval_accuracy=0.9639 eval_top5=0.9972 eval_loss=0.179 wall_s=101
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: `runlocal`: a 2-block model, 20 steps (a smoke test in seconds).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_arg(arg, runlocal=False)
  return recipes.digits_config(runlocal=arg.runlocal)
