r"""Dense ViT on the embedded mnist5k: the baseline of `mnist5k_vmoe.py`.

The same model, data and schedule as `configs/mnist5k_vmoe.py`
(`moe.config.recipes.mnist5k_config`) with a dense MLP in every block.

Command:

  python -m moe.main --config configs/mnist5k_vit.py --workdir /tmp/mnist5k_vit

Expected (measured on a 2-core CPU, 2026-12-03, jax 0.10.2): about 6
minutes including start-up (3 steps/s), ending with

  final: step=1000 eval_accuracy=0.9100 eval_top5=0.9940 eval_loss=0.397 wall_s=337

on the 1,000 test images (one image is 0.001); the V-MoE of
`mnist5k_vmoe.py` ends at 0.9210 with the same data and schedule.
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
  return recipes.mnist5k_config(runlocal=arg.runlocal)
