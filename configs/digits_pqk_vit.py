r"""PQK on the digits ViT: prune, quantize, distil the dense tiny ViT.

Command (embedded data, no network):

  python -m moe.main --config configs/digits_pqk_vit.py --workdir /tmp/pqk_vit

Expected (measured on a 2-core CPU, 2026-12-03, jax 0.10.2): about 6.5
minutes including start-up (4 steps/s: the student and the teacher are two
forward passes), ending with

  final: step=1000 eval_accuracy=0.9528 eval_top5=0.9972 eval_loss=0.186 wall_s=366

on the 360 test images: the student (80% of every kernel pruned, 8-bit);
the teacher has eval_teacher_accuracy=0.9472, the dense `digits_vit.py`
0.95-0.96. Another CPU may end a few images away.

The model is the dense ViT of `configs/digits_vit.py` (D=64, 4 blocks);
the task `moe.train.pqk_task`: 1000 steps of 128 images, 333 dense, 333
pruning every kernel (patch embedding, attention, MLP, head) in 4 cubic
rounds to 80% sparsity per kernel with 8-bit weights and activations
(QAT), 100 of warm-up, 234 of mutual distillation (T = 4); Adam 1e-3.
`eval_accuracy` is the student's, `eval_teacher_accuracy` the full net's.

Presets (`--config configs/digits_pqk_vit.py:ARG`, comma-separated):
`runlocal` (the 2-block runlocal ViT, 20 steps), `sparsity=S`, `bits=B`
(weights), `method=hard|soft`.
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets (module docstring).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_pqk_arg(arg, sparsity=0.8, bits=8)
  config = recipes.digits_config(runlocal=arg.runlocal)
  return recipes.pqk_config(config, arg, learning_rate=1e-3)
